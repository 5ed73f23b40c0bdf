"""Chat-template tokenisation of preference pairs (ORPO_SPEC.md, "Tokenisation").

    prompt ids = template(prompt, add_generation_prompt=True)
    full ids   = template(prompt + [assistant answer])
    answer ids = full ids after the prompt ids, cut after the end-of-turn token (a target)

User text is data, never template: the template is rendered with Jinja (which does not
re-evaluate message content). A conversation without special-token strings is tokenised
exactly as `apply_chat_template(..., tokenize=True)` does. Where message content contains
one (such as "<|im_start|>"), each occurrence is replaced by a placeholder, the template
is rendered (its own filters, `| trim` and the like, still apply), and the placeholders are
tokenised as ordinary text, never as a control token. Added tokens that are not special
(Qwen3's <think> and </think>) are ordinary vocabulary, left to the template and tokenizer.

The tokenizer is any Hugging Face tokenizer (mlx-lm wraps the same object); nothing here
imports torch or mlx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jinja2

from .data.formats import PreferencePair
from .templates import resolve_template

# End-of-turn tokens of common templates; whichever the vocabulary has counts as a stop token.
_EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_MARK = "\ue000{}\ue001"  # private-use code points: a placeholder for the special-token string number {}
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_CUT = "\ue002"  # where a truncated prompt's oldest kept text goes, to find the template around it


class TemplateError(ValueError):
    """The chat template cannot split this conversation into prompt and response."""


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    row: int = 0
    truncated: bool = False
    source: str = ""  # the file the row came from (a folder of files numbers rows per file)

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (what padding has to fit)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class TokenizeStats:
    pairs_in: int = 0
    pairs_out: int = 0
    truncated: int = 0
    dropped: int = 0
    boundary_fallbacks: int = 0  # prompt ids were not a prefix of full ids
    escaped: int = 0  # pairs whose text contained special-token strings
    dropped_rows: list[tuple[str, str]] = field(default_factory=list)  # ("file: row N", reason)


class ChatEncoder:
    """Renders and tokenises conversations with one tokenizer's chat template."""

    def __init__(self, tokenizer: Any, template: str = "auto"):
        """template: "auto" (the tokenizer's own; plain where it has none), a name of templates.NAMED, or a
        template's text (a run's chat_template.jinja). The tokenizer itself is left as it is."""
        self.template_name, self.template = resolve_template(tokenizer, template)
        self.tok = tokenizer
        vocab = tokenizer.get_vocab()
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        specials = set(getattr(tokenizer, "all_special_tokens", [])) | {t.content for t in added if t.special}
        self.special_strings = sorted((s for s in specials if s), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self.special_strings)) or "(?!)")  # longest first
        self._marks = {s: _MARK.format(i) for i, s in enumerate(self.special_strings)}
        self._control_ids = {vocab[s] for s in self.special_strings if s in vocab} - {tokenizer.unk_token_id}
        self._newline_ids = self._encode_text("\n")
        stop = {vocab[t] for t in _EOT_TOKENS if t in vocab}
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        self.stop_ids = stop
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop, default=0)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # ------------------------------------------------------------- rendering

    def has_special_text(self, messages: list[dict]) -> bool:
        return any(self._special_re.search(m["content"]) for m in messages)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def _render_marked(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The rendered conversation, each special-token string of the content as a placeholder."""
        marked = [{**m, "content": self._special_re.sub(lambda x: self._marks[x.group()], m["content"])} for m in messages]
        return self.render(marked, add_generation_prompt)

    def _encode_text(self, text: str, plain: bool = False) -> list[int]:
        if not text:
            return []
        kw = {"split_special_tokens": True} if plain else {}
        return list(self.tok(text, add_special_tokens=False, **kw)["input_ids"])

    def _encode_after(self, text: str, plain: bool = False) -> list[int]:
        """Ids of `text` where it follows other text. SentencePiece-style tokenizers give a string's start
        a "▁" (prepend_scheme, add_dummy_prefix) that the same text inside a longer string lacks: encode it
        after a newline and drop the newline's ids (as transformers' own sanitiser does)."""
        ids = self._encode_text("\n" + text, plain)
        if ids[: len(self._newline_ids)] == self._newline_ids:
            return ids[len(self._newline_ids):]
        return self._encode_text(text, plain)

    def _encode_marked(self, text: str, at_start: bool = True) -> list[int]:
        """Ids of rendered text: placeholders as plain text, the rest as the tokenizer splits it; at_start=False
        for text that continues earlier text. Without placeholders this is one plain call: the template's ids."""
        pieces = _MARK_RE.split(text)  # [text, number, text, number, ..., text]
        if len(pieces) > 1 and any("\ue000" in p or "\ue001" in p for p in pieces[::2]):  # a placeholder cut up
            raise TemplateError("the chat template rewrites message content; cannot keep special-token text inert")
        ids = self._encode_text(pieces[0]) if at_start else self._encode_after(pieces[0])
        for number, piece in zip(pieces[1::2], pieces[2::2]):
            special = self.special_strings[int(number)]
            typed = self._encode_after(special, plain=True)
            if self._control_ids.intersection(typed):
                raise TemplateError(f"the tokenizer maps the text {special!r} to a special token")
            ids += typed + self._encode_after(piece)
        return ids

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation; message content never yields control tokens."""
        return self._encode_marked(self._render_marked(messages, add_generation_prompt))

    def encode_cut(self, messages: list[dict], index: int, keep: int) -> list[int] | None:
        """The prompt ids of `messages` (with the generation prompt) in at most `keep` tokens, made to fit by
        cutting the start of message `index`'s text: the template around it (BOS, system turn, that turn's
        role header, the later turns) stays whole. None when that leaves no room for any of the text."""
        marked = [{**m, "content": self._special_re.sub(lambda x: self._marks[x.group()], m["content"])} for m in messages]
        marked[index] = {**marked[index], "content": _CUT}
        text = self.render(marked, True)
        if text.count(_CUT) != 1:
            raise TemplateError("the chat template rewrites message content; cannot cut a prompt inside its text")
        head_text, tail_text = text.split(_CUT)
        head, tail = self._encode_marked(head_text), self._encode_marked(tail_text, at_start=False)
        room = keep - len(head) - len(tail)
        if room < 1:
            return None
        body = self._encode_after(messages[index]["content"], plain=True)[-room:]
        for _ in range(3):  # a byte-level cut can split a character: start at the next whole one
            if not (len(body) > 1 and self.tok.decode(body[:4]).startswith("\ufffd")):
                break
            body = body[1:]
        return head + body + tail

    # ------------------------------------------------------------- pairs

    def encode_response(self, prompt_msgs: list[dict], prompt_ids: list[int], response: str, stats: TokenizeStats) -> list[int]:
        """Ids of `response` as the template places it after the prompt, ending with end-of-turn."""
        full_msgs = prompt_msgs + [{"role": "assistant", "content": response}]
        full = self.encode(full_msgs)
        if full[: len(prompt_ids)] == prompt_ids:
            answer = full[len(prompt_ids):]
        else:
            # The tokenizer merged across the boundary: tokenise the answer's text on its own, as the text
            # that continues the prompt's.
            stats.boundary_fallbacks += 1
            prompt_text = self._render_marked(prompt_msgs, True)
            full_text = self._render_marked(full_msgs, False)
            if not full_text.startswith(prompt_text):
                raise TemplateError("the template renders the prompt differently once an answer follows it")
            answer = self._encode_marked(full_text[len(prompt_text):], at_start=False)
        return self._cut_after_end_of_turn(answer)

    def _cut_after_end_of_turn(self, answer: list[int]) -> list[int]:
        """Up to and including the first stop token (answer text cannot contain one: it is escaped);
        templates that add more after it (Phi-3: <|end|> \n <|endoftext|>) do not add targets."""
        for i, token in enumerate(answer):
            if token in self.stop_ids:
                return answer[: i + 1]
        return answer + [self.eos_id]


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenise and truncate every pair; dropped pairs are counted with their row and reason."""
    enc = tokenizer if isinstance(tokenizer, ChatEncoder) else ChatEncoder(tokenizer)
    stats = TokenizeStats(pairs_in=len(pairs))
    out = []
    for pair in pairs:
        try:
            tp = _tokenize_one(enc, pair, max_length, max_prompt_length, stats)
        except (TemplateError, jinja2.TemplateError) as e:  # jinja2: the template's own raise_exception
            stats.dropped += 1
            stats.dropped_rows.append((_where(pair), f"chat template refused it: {e}"))
            continue
        if tp is None:
            continue
        stats.truncated += tp.truncated
        out.append(tp)
    stats.pairs_out = len(out)
    return out, stats


def _tokenize_one(enc: ChatEncoder, pair: PreferencePair, max_length: int, max_prompt_length: int,
                  stats: TokenizeStats) -> TokenizedPair | None:
    prompt_msgs = pair.prompt_messages()
    if enc.has_special_text(pair.messages(pair.chosen) + pair.messages(pair.rejected)[-1:]):
        stats.escaped += 1

    def encode(msgs):
        ids = enc.encode(msgs, add_generation_prompt=True)
        return ids, enc.encode_response(msgs, ids, pair.chosen, stats), enc.encode_response(msgs, ids, pair.rejected, stats)

    prompt, chosen, rejected = encode(prompt_msgs)
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return TokenizedPair(prompt, chosen, rejected, pair.row, source=pair.source)

    # 1. Drop the oldest user/assistant turns while that helps and keeps >= max_prompt_length tokens.
    system = prompt_msgs[:1] if prompt_msgs and prompt_msgs[0]["role"] == "system" else []
    turns = prompt_msgs[len(system):]
    while len(prompt) + longest > max_length and len(turns) > 2 and len(prompt) > max_prompt_length:
        shorter = system + turns[2:]
        s_prompt, s_chosen, s_rejected = encode(shorter)
        if len(s_prompt) < max_prompt_length:
            break
        turns, prompt, chosen, rejected = turns[2:], s_prompt, s_chosen, s_rejected
        longest = max(len(chosen), len(rejected))

    # 2. Keep the end of the prompt, never below max_prompt_length tokens: cut into the oldest kept text, keeping
    #    the template's head and that turn's role header. Where the later turns alone are too long for that, the
    #    oldest turn pair goes whole instead (whole turns beat a prompt of empty ones), as few as needed.
    keep = max(max_prompt_length, max_length - longest)
    while len(prompt) > keep:
        cut = enc.encode_cut(system + turns, len(system), keep)
        if cut is not None:
            prompt = cut
            break
        if len(turns) <= 2:
            return _drop(stats, pair, f"the prompt's template and last turn take more than {keep} tokens; raise max_length")
        turns = turns[2:]
        prompt, chosen, rejected = encode(system + turns)
        longest = max(len(chosen), len(rejected))
        keep = max(max_prompt_length, max_length - longest)
    # 3. Cut the responses from the end; never to zero tokens.
    room = max_length - len(prompt)
    if room < 1:
        return _drop(stats, pair, f"prompt alone has {len(prompt)} tokens, max_length is {max_length}")
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return _drop(stats, pair, f"chosen and rejected are identical in their first {room} tokens; raise max_length")
    return TokenizedPair(prompt, chosen, rejected, pair.row, truncated=True, source=pair.source)


def _where(pair: PreferencePair) -> str:
    return f"{pair.source}: row {pair.row}" if pair.source else f"row {pair.row}"


def _drop(stats: TokenizeStats, pair: PreferencePair, reason: str) -> None:
    stats.dropped += 1
    stats.dropped_rows.append((_where(pair), reason))
    return None
