"""Chat templates: the tokenizer's own (`auto`) or a named one, for base models and for models
whose format you want to choose (ORPO_SPEC.md, "Templates").

    name, text = apply_template(tokenizer, "zephyr")   # sets tokenizer.chat_template; refuses what cannot work

A named template is ordinary Jinja, the kind Hugging Face tokenizers carry as `chat_template`,
with the tokenizer's own BOS and EOS written into it. So a merged model folder saved with that
tokenizer formats prompts in plain `transformers` / `mlx_lm` exactly as training did, and the
run folder can record the text itself (`chat_template.jinja`).

A template that needs control tokens (`<|im_start|>`) the vocabulary lacks is refused before
anything trains: as text they would be split into pieces and the model could not learn where a
turn ends. `zephyr` and `plain` need only an end-of-sequence token, so they fit every base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class TemplateNotUsable(ValueError):
    """This tokenizer cannot use the named template; the message names one that works."""


@dataclass(frozen=True)
class NamedTemplate:
    name: str
    body: str  # Jinja; `bos` and `eos` are set to the tokenizer's own strings in front of it
    needs: tuple[str, ...]  # control tokens that must each be one token of the vocabulary
    help: str


# The roles are written as the conversations name them (system, user, assistant).
_ZEPHYR = ("{{- bos -}}{%- for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos + '\n' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}")
_CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
_QWEN = ("{%- if not messages or messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
         + _CHATML)
_LLAMA3 = ("{{- '<|begin_of_text|>' -}}{%- for m in messages %}"
           "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
# Role words as text, the end of each answer an EOS: what a base model has seen in web text.
_PLAIN = ("{{- bos -}}{%- for m in messages %}{%- if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
          "{%- elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] + '\n\n' }}"
          "{%- else %}{{ 'Assistant: ' + m['content'] + eos + '\n\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}")

NAMED = {t.name: t for t in (
    NamedTemplate("zephyr", _ZEPHYR, (), "<|user|>\\n{prompt}</s>\\n<|assistant|>\\n{response}</s>, the format of the "
                  "paper's Mistral-ORPO models, with the tokenizer's own EOS as </s>: fits any base model"),
    NamedTemplate("chatml", _CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_start|>role\\n...<|im_end|>: needs those two tokens"),
    NamedTemplate("llama3", _LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                  "Llama 3's headers and <|eot_id|>: for Llama 3 tokenizers"),
    NamedTemplate("qwen", _QWEN, ("<|im_start|>", "<|im_end|>"), "ChatML with Qwen2.5's default system prompt: for Qwen tokenizers"),
    NamedTemplate("plain", _PLAIN, (), "'Human:' / 'Assistant:' as text, EOS ends an answer: needs no token a base vocabulary lacks"),
)}
TEMPLATES = ("auto", *NAMED)


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template text (the default one where it carries several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, list):  # [{"name": ..., "template": ...}] as older tokenizer_config.json files store it
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def missing_tokens(tokenizer: Any, name: str) -> list[str]:
    """Control tokens `name` needs that are not single tokens of this vocabulary ("EOS" when there is none)."""
    template = NAMED[name]
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.needs
               if t not in vocab or list(tokenizer(t, add_special_tokens=False)["input_ids"]) != [vocab[t]]]
    if "eos" in template.body and not tokenizer.eos_token:
        missing.append("EOS")
    return missing


def usable_templates(tokenizer: Any) -> list[str]:
    """The template names this tokenizer can use, `auto` first."""
    return ["auto"] + [name for name in NAMED if not missing_tokens(tokenizer, name)]


def render_named(tokenizer: Any, name: str) -> str:
    """The named template's text with this tokenizer's BOS (only where its encoding adds one) and EOS."""
    template = NAMED[name]
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and list(tokenizer("a")["input_ids"])[:1] == [tokenizer.bos_token_id]
    head = ""
    if "bos" in template.body:
        head += "{%- set bos = " + json.dumps(bos if adds_bos else "") + " -%}"
    if "eos" in template.body:
        head += "{%- set eos = " + json.dumps(tokenizer.eos_token or "") + " -%}"
    return head + template.body


def resolve_template(tokenizer: Any, name: str) -> tuple[str, str]:
    """(the template used, its text) for `name`: auto, a named template, or a template's text itself
    (as a run folder records it). Raises TemplateNotUsable for a template that cannot work here."""
    if name == "auto":
        own = own_template(tokenizer)
        return ("auto", own) if own else ("plain", render_named(tokenizer, "plain"))
    if name in NAMED:
        missing = missing_tokens(tokenizer, name)
        if missing:
            works = [t for t in usable_templates(tokenizer) if t != "auto" or own_template(tokenizer)]
            fix = f"use data.template={works[0]} (this tokenizer can use: {', '.join(works)})" if works else "use another model"
            raise TemplateNotUsable(
                f"template {name!r} needs the control token(s) {', '.join(missing)}, which this tokenizer's vocabulary "
                f"lacks (as text they would be split into pieces, and the model could not learn where a turn ends); {fix}")
        return name, render_named(tokenizer, name)
    if "{" in name:  # a template's own text
        return "recorded", name
    raise TemplateNotUsable(f"unknown template {name!r}; use one of {', '.join(TEMPLATES)}")


def apply_template(tokenizer: Any, name: str) -> tuple[str, str]:
    """Resolve `name` and make it the tokenizer's chat template (what chat, eval and saving then use)."""
    used, text = resolve_template(tokenizer, name)
    tokenizer.chat_template = text
    return used, text
