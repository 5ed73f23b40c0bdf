"""The preference-data row formats of ORPO_SPEC.md, detected and normalised to one shape.

Each `to_pair_<format>(row)` returns a `PreferencePair` or raises `RowProblem` with every
problem of that row joined, so a report can list all invalid rows at once. Rows arrive with
the canonical field names of `FIELDS` (readers.canonical_rows renames a source's columns).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

FORMATS = ("standard", "conversational", "implicit", "sharegpt", "alpaca", "hh-rlhf", "ultrafeedback")
# The field names the formats read; a column mapping renames a source's columns to these.
FIELDS = ("prompt", "chosen", "rejected", "system", "conversations", "instruction", "input", "history")
# Columns taken as the prompt when a source has none of its own (Intel/orca_dpo_pairs has `question`).
PROMPT_ALIASES = ("question", "query")
# A role marker of an Anthropic HH-RLHF transcript; the first turn may lack the leading blank line.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class RowProblem(ValueError):
    """This row is not a valid preference pair; the message says why."""


@dataclass
class PreferencePair:
    """One normalised pair: a prompt conversation ending with a user turn, two answers to it."""

    prompt: list[dict]  # [{"role": "user"|"assistant", "content": str}, ...], ends with "user"
    chosen: str
    rejected: str
    system: str | None = None
    row: int = 0  # the row's number in its source, as the error reports count
    source: str = ""
    meta: dict = field(default_factory=dict)  # extra fields of the row (id, topic...), kept for reports

    def prompt_messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.prompt]

    def messages(self, response: str) -> list[dict]:
        return self.prompt_messages() + [{"role": "assistant", "content": response}]

    def to_dict(self) -> dict:
        """The pair in the conversational format (which `load_pairs` reads back)."""
        return {"prompt": self.prompt_messages(), "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}], **self.meta}


def detect_format(row: Any) -> str | None:
    """Name the format a row looks like, or None."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" in row:
        if isinstance(chosen, list) and isinstance(rejected, list) and (_has_user_turn(chosen) or _has_user_turn(rejected)):
            return "ultrafeedback"
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "implicit"
    if isinstance(chosen, str) and isinstance(rejected, str) and _HH_MARKER.search(chosen.lstrip()):
        return "hh-rlhf"
    return None


def _has_user_turn(messages: list) -> bool:
    """True for a full conversation (it repeats the prompt), False for a list of answers only."""
    return any(isinstance(m, dict) and str(m.get("role", m.get("from", ""))).lower() in ("user", "human") for m in messages)


# ---------------------------------------------------------------- shared checks

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "model": "assistant", "system": "system"}


def _text(row: dict, key: str, problems: list[str], required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            problems.append(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        problems.append(f"field {key!r} must be a string, got {type(value).__name__}")
        return ""
    return value


def _message(m: Any, where: str, problems: list[str], role_key="role", content_key="content") -> dict | None:
    if not isinstance(m, dict):
        problems.append(f"{where} must be an object with {role_key!r} and {content_key!r}, got {type(m).__name__}")
        return None
    role, content = m.get(role_key), m.get(content_key)
    if role_key == "role" and role is None and "from" in m:  # tolerate ShareGPT keys in conversational data
        role, content = m.get("from"), m.get("value")
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
        problems.append(f"{where} has unknown role {role!r} (use system, user or assistant)")
        return None
    if not isinstance(content, str):
        problems.append(f"{where} content must be a string, got {type(content).__name__}")
        return None
    return {"role": _ROLE_ALIASES[role.lower()], "content": content}


def _split_system(messages: list[dict], problems: list[str]) -> tuple[str | None, list[dict]]:
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if any(m["role"] == "system" for m in messages):
        problems.append("bad role order: a system message may only come first")
    return system, messages


def _check_turns(prompt: list[dict], problems: list[str]) -> None:
    if not prompt:
        problems.append("empty prompt: it needs at least one user message")
        return
    for i, m in enumerate(prompt):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            problems.append(f"bad role order: prompt message {i + 1} is {m['role']!r}, expected {expected!r} "
                            "(turns must alternate user/assistant and end with user)")
            return
    if prompt[-1]["role"] != "user":
        problems.append("bad role order: the prompt must end with a user message")
    if not prompt[-1]["content"].strip():
        problems.append("empty prompt: the last user message is blank")


def _finish(prompt, chosen, rejected, system, problems, row) -> PreferencePair:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if text is not None and not text.strip() and not any(name in p for p in problems):
            problems.append(f"empty response: {name!r} is blank")
    if not problems and chosen == rejected:
        problems.append("chosen == rejected: the pair teaches nothing")
    if problems:
        raise RowProblem("; ".join(problems))
    meta = {k: v for k, v in row.items() if k not in FIELDS and isinstance(v, (str, int, float, bool))}
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, system=system or None, meta=meta)


def _response(value: Any, name: str, problems: list[str]) -> str | None:
    """A response given as a string, one assistant message, or a one-message list."""
    if value is None:
        problems.append(f"missing field {name!r}")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        problems.append(f"field {name!r} must be a string or assistant message(s), got {type(value).__name__}")
        return None
    msgs = [_message(m, f"{name} message {i + 1}", problems) for i, m in enumerate(value)]
    if any(m is None for m in msgs):
        return None
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        problems.append(f"field {name!r} must hold exactly one assistant message, got roles {[m['role'] for m in msgs]}")
        return None
    return msgs[0]["content"]


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _difference(a: list[dict], b: list[dict], a_name: str, b_name: str, unit: str = "message", roles: dict | None = None) -> str:
    """Where two message lists first differ (role, or text after stripping whitespace); "" when they agree."""
    def label(m: dict) -> str:
        return f"{(roles or {}).get(m['role'], m['role'])} {_quote(m['content'])}"

    for i, (x, y) in enumerate(zip(a, b)):
        if x["role"] != y["role"] or x["content"].strip() != y["content"].strip():
            return f"{unit} {i + 1} is {label(x)} in {a_name} but {label(y)} in {b_name}"
    if len(a) != len(b):
        return f"{len(a)} {unit}(s) in {a_name} but {len(b)} in {b_name}"
    return ""


# ---------------------------------------------------------------- one normaliser per format

def to_pair_standard(row: dict) -> PreferencePair:
    problems: list[str] = []
    prompt = _text(row, "prompt", problems)
    chosen, rejected = _text(row, "chosen", problems), _text(row, "rejected", problems)
    system = _text(row, "system", problems, required=False)
    if "prompt" in row and isinstance(row.get("prompt"), str) and not prompt.strip():
        problems.append("empty prompt")
    return _finish([{"role": "user", "content": prompt}], chosen, rejected, system, problems, row)


def to_pair_conversational(row: dict) -> PreferencePair:
    problems: list[str] = []
    raw = row.get("prompt")
    if not isinstance(raw, list):
        problems.append(f"field 'prompt' must be a list of messages, got {type(raw).__name__}")
        raw = []
    msgs = [_message(m, f"prompt message {i + 1}", problems) for i, m in enumerate(raw)]
    system, prompt = _split_system([m for m in msgs if m], problems)
    if not problems:
        _check_turns(prompt, problems)
    extra_system = _text(row, "system", problems, required=False)
    chosen, rejected = _response(row.get("chosen"), "chosen", problems), _response(row.get("rejected"), "rejected", problems)
    return _finish(prompt, chosen, rejected, system or extra_system, problems, row)


def to_pair_implicit(row: dict) -> PreferencePair:
    problems: list[str] = []
    convs = {}
    for name in ("chosen", "rejected"):
        raw = row.get(name)
        if not isinstance(raw, list):
            problems.append(f"field {name!r} must be a list of messages (a full conversation), got {type(raw).__name__}")
            continue
        convs[name] = [_message(m, f"{name} message {i + 1}", problems) for i, m in enumerate(raw)]
    if problems:
        raise RowProblem("; ".join(problems))
    c, r = convs["chosen"], convs["rejected"]
    shared = 0
    while shared < min(len(c), len(r)) and c[shared] == r[shared]:
        shared += 1
    if c == r:
        raise RowProblem("chosen == rejected: the two conversations are identical")
    prefix, c_tail, r_tail = c[:shared], c[shared:], r[shared:]
    for name, tail in (("chosen", c_tail), ("rejected", r_tail)):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            problems.append(f"{name} must differ from the shared prefix by exactly one final assistant message "
                            f"(it differs by {len(tail)} message(s))")
    system, prompt = _split_system(prefix, problems)
    if not problems:
        _check_turns(prompt, problems)
    if problems:
        raise RowProblem("; ".join(problems))
    return _finish(prompt, c_tail[0]["content"], r_tail[0]["content"], system, problems, row)


def to_pair_sharegpt(row: dict) -> PreferencePair:
    problems: list[str] = []
    raw = row.get("conversations")
    if not isinstance(raw, list):
        problems.append(f"field 'conversations' must be a list of {{from, value}} messages, got {type(raw).__name__}")
        raw = []
    msgs = [_message(m, f"conversations[{i}]", problems, "from", "value") for i, m in enumerate(raw)]
    system, prompt = _split_system([m for m in msgs if m], problems)
    if not problems:
        _check_turns(prompt, problems)
    responses = []
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, dict):
            m = _message(value, name, problems, "from", "value")
            if m is not None and m["role"] != "assistant":
                problems.append(f"{name} must come from 'gpt', got {value.get('from')!r}")
            responses.append(m["content"] if m else None)
        else:
            responses.append(_response(value, name, problems))
    system = system or _text(row, "system", problems, required=False)
    return _finish(prompt, responses[0], responses[1], system, problems, row)


def to_pair_alpaca(row: dict) -> PreferencePair:
    problems: list[str] = []
    instruction = _text(row, "instruction", problems)
    extra = _text(row, "input", problems, required=False)
    chosen, rejected = _text(row, "chosen", problems), _text(row, "rejected", problems)
    system = _text(row, "system", problems, required=False)
    if "instruction" in row and isinstance(row["instruction"], str) and not instruction.strip():
        problems.append("empty prompt: 'instruction' is blank")
    prompt: list[dict] = []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        problems.append("field 'history' must be a list of [question, answer] string pairs")
        history = []
    for q, a in history:
        prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = instruction + ("\n" + extra if extra.strip() else "")
    prompt.append({"role": "user", "content": user})
    return _finish(prompt, chosen, rejected, system, problems, row)


def _hh_turns(transcript: str, name: str, problems: list[str]) -> list[dict] | None:
    """'\n\nHuman: q\n\nAssistant: a' -> [user q, assistant a]; None (with the reason) when it is no transcript."""
    parts = _HH_MARKER.split(transcript.lstrip())
    if len(parts) == 1:
        problems.append(f"{name} transcript has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns: {_quote(transcript.strip())}")
        return None
    if parts[0].strip():
        problems.append(f"{name} transcript has text before its first turn marker: {_quote(parts[0].strip())}")
        return None
    turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
             for role, text in zip(parts[1::2], parts[2::2])]
    if not any(t["role"] == "assistant" for t in turns):
        problems.append(f"{name} transcript has no 'Assistant:' turn, so it holds no response")
        return None
    if turns[-1]["role"] != "assistant":
        problems.append(f"{name} transcript ends with a 'Human:' turn, so it holds no response to its last question")
        return None
    return turns


def to_pair_hh_rlhf(row: dict) -> PreferencePair:
    """Anthropic HH-RLHF: two transcripts that share everything before their last Assistant turn."""
    problems: list[str] = []
    turns = {}
    for name in ("chosen", "rejected"):
        text = _text(row, name, problems)
        if isinstance(row.get(name), str):
            turns[name] = _hh_turns(text, name, problems)
    if problems:
        raise RowProblem("; ".join(problems))
    (*c_history, c_last), (*r_history, r_last) = turns["chosen"], turns["rejected"]
    differs = _difference(c_history, r_history, "chosen", "rejected", "turn", {"user": "Human", "assistant": "Assistant"})
    if differs:
        raise RowProblem(f"chosen and rejected transcripts differ before their last Assistant turn ({differs})")
    _check_turns(c_history, problems)
    system = _text(row, "system", problems, required=False)
    return _finish(c_history, c_last["content"], r_last["content"], system, problems, row)


def to_pair_ultrafeedback(row: dict) -> PreferencePair:
    """A `prompt` plus two full conversations that repeat it (HuggingFaceH4/ultrafeedback_binarized)."""
    problems: list[str] = []
    raw_prompt = row.get("prompt")
    if isinstance(raw_prompt, str):
        prompt_msgs = [{"role": "user", "content": raw_prompt}]
    elif isinstance(raw_prompt, list):
        prompt_msgs = [m for m in (_message(m, f"prompt message {i + 1}", problems) for i, m in enumerate(raw_prompt)) if m]
    else:
        problems.append("missing field 'prompt'" if raw_prompt is None else
                        f"field 'prompt' must be a string or a list of messages, got {type(raw_prompt).__name__}")
        prompt_msgs = []
    heads, answers = {}, {}
    for name in ("chosen", "rejected"):
        raw = row.get(name)
        if not isinstance(raw, list):
            problems.append(f"field {name!r} must be a list of messages (a full conversation), got {type(raw).__name__}")
            continue
        msgs = [_message(m, f"{name} message {i + 1}", problems) for i, m in enumerate(raw)]
        if any(m is None for m in msgs):
            continue
        if not msgs or msgs[-1]["role"] != "assistant":
            problems.append(f"{name} must end with an assistant message (the response)")
            continue
        heads[name], answers[name] = msgs[:-1], msgs[-1]["content"]
    if problems:
        raise RowProblem("; ".join(problems))
    differs = _difference(heads["chosen"], heads["rejected"], "chosen", "rejected")
    if differs:
        raise RowProblem(f"chosen and rejected conversations differ before their final assistant message ({differs})")
    system, prompt = _split_system(heads["chosen"], problems)
    prompt_system, asked = _split_system(prompt_msgs, problems)
    differs = _difference(asked, prompt, "prompt", "the conversations")
    if differs:
        problems.append(f"the conversations disagree with 'prompt' ({differs})")
    if system and prompt_system and system.strip() != prompt_system.strip():
        problems.append(f"the system messages disagree: prompt has {_quote(prompt_system)}, the conversations have {_quote(system)}")
    if not problems:
        _check_turns(prompt, problems)
    system = system or prompt_system or _text(row, "system", problems, required=False)
    return _finish(prompt, answers["chosen"], answers["rejected"], system, problems, row)


NORMALISERS: dict[str, Callable[[dict], PreferencePair]] = {
    "standard": to_pair_standard,
    "conversational": to_pair_conversational,
    "implicit": to_pair_implicit,
    "sharegpt": to_pair_sharegpt,
    "alpaca": to_pair_alpaca,
    "hh-rlhf": to_pair_hh_rlhf,
    "ultrafeedback": to_pair_ultrafeedback,
}
