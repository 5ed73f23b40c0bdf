"""What a dataset looks like to a model: counts, invalid rows, truncation, and rendered examples.

    check = check_data("prefs.jsonl", model="smollm2-135m-instruct", max_length=512)
    check.report.invalid      # every bad row with its reason
    check.stats.truncated     # pairs cut to fit max_length
    check.examples[0].prompt  # the prompt exactly as the model sees it (chat template applied)

`orpo-local data check` prints this; the web UI's Data tab shows it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .data import DataReport, inspect_data
from .tokenization import TokenizeStats


@dataclass
class Example:
    """One pair rendered through the chat template; `prompt` ends where the response targets begin."""

    row: int
    source: str
    prompt: str
    chosen: str
    rejected: str
    prompt_tokens: int
    chosen_tokens: int
    rejected_tokens: int
    truncated: bool


@dataclass
class DataCheck:
    report: DataReport
    model: str = ""
    template: str = ""  # the chat template used: auto, a named one, or plain for a tokenizer without one
    stats: TokenizeStats | None = None  # None when tokenisation was skipped or impossible
    tokenize_error: str = ""  # why there are no stats (no tokenizer, a template that refuses)
    lengths: dict = field(default_factory=dict)  # prompt/response token mean and max
    examples: list[Example] = field(default_factory=list)


def check_data(path: str, format: str = "auto", model: str | None = None, max_length: int = 512,
               max_prompt_length: int = 256, examples: int = 3, progress=lambda message: None,
               columns: dict | None = None, template: str = "auto") -> DataCheck:
    """Validate `path` (its columns renamed by `columns` first); with `model`, also tokenise through
    `template` (data.template) and render `examples` pairs.

    Raises DataFileError/OSError when the source cannot be read at all; bad rows never raise.
    """
    report = inspect_data(path, format=format, columns=columns or None)
    check = DataCheck(report, model or "")
    if not (model and report.pairs):
        return check
    from .models import ModelNotFound, load_tokenizer
    from .tokenization import ChatEncoder, TemplateError, tokenize_pairs

    try:
        tokenizer = load_tokenizer(model, progress=progress)
        encoder = ChatEncoder(tokenizer, template)
    except (ModelNotFound, OSError, TemplateError, ValueError) as e:
        check.tokenize_error = str(e)
        return check
    check.template = encoder.template_name
    tokenized, check.stats = tokenize_pairs(report.pairs, encoder, max_length, max_prompt_length)
    if tokenized:
        prompts = [len(t.prompt) for t in tokenized]
        responses = [len(x) for t in tokenized for x in (t.chosen, t.rejected)]
        check.lengths = {"prompt_mean": statistics.mean(prompts), "prompt_max": max(prompts),
                         "response_mean": statistics.mean(responses), "response_max": max(responses)}
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    for t in tokenized[:examples]:
        check.examples.append(Example(t.row, t.source, decode(t.prompt), decode(t.chosen), decode(t.rejected),
                                      len(t.prompt), len(t.chosen), len(t.rejected), t.truncated))
    return check
