"""The five preference-data row formats of ORPO_SPEC.md, detected and normalised to one shape.

Each `to_pair_<format>(row)` returns a `PreferencePair` or raises `RowProblem` with every
problem of that row joined, so a report can list all invalid rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

FORMATS = ("standard", "conversational", "implicit", "sharegpt", "alpaca")


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
    if "prompt" in row:
        return "conversational" if isinstance(row["prompt"], list) else "standard"
    if isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return "implicit"
    return None


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
    known = {"prompt", "chosen", "rejected", "system", "conversations", "instruction", "input", "history"}
    meta = {k: v for k, v in row.items() if k not in known and isinstance(v, (str, int, float, bool))}
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


NORMALISERS: dict[str, Callable[[dict], PreferencePair]] = {
    "standard": to_pair_standard,
    "conversational": to_pair_conversational,
    "implicit": to_pair_implicit,
    "sharegpt": to_pair_sharegpt,
    "alpaca": to_pair_alpaca,
}
