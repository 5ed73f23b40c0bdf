"""Preference data: load any supported source into `PreferencePair`s, report every bad row.

    pairs = load_pairs("prefs.jsonl")                 # raises DataError listing all invalid rows
    report = inspect_data("prefs.csv", format="alpaca")  # valid pairs + invalid rows, never raises on rows
    pairs = load_pairs("orca.parquet", columns={"prompt": "question"})  # {canonical field: source column}
    train, val = split_pairs(pairs, val_fraction=0.1, seed=42, min_val=32)  # prompt-disjoint

Rows are streamed from the file (only the first rows are held to name the columns and the format),
so reading costs the memory of the valid pairs kept, not of the file; `max_pairs` stops reading
once that many valid pairs are in. A file's format is the one of its first row that has one; a
row in another format is reported as such.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

from .formats import FIELDS, FORMATS, NORMALISERS, PreferencePair, RowProblem, detect_format
from .readers import DataFileError, RawRow, canonical_rows, check_columns, read_hub, read_rows

SAMPLES_DIR = Path(__file__).parent / "samples"
# How many leading rows are searched for one whose format can be told (they are held until then).
DETECT_ROWS = 1000
# Files at least this big report their reading progress (every tenth of the way).
PROGRESS_BYTES = 64 * 2**20
BUNDLED = {"zh-sample": SAMPLES_DIR / "zh_sample.jsonl", "en-sample": SAMPLES_DIR / "en_sample.jsonl"}

__all__ = ["BUNDLED", "DataError", "DataFileError", "DataReport", "FIELDS", "FORMATS", "InvalidRow", "PreferencePair",
           "fingerprint_source", "inspect_data", "load_pairs", "prompt_key", "resolve_source", "split_pairs"]


@dataclass
class InvalidRow:
    row: int
    reason: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}row {self.row}: {self.reason}"


@dataclass
class DataReport:
    source: str
    format: str
    pairs: list[PreferencePair] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)
    # the column mapping applied, {canonical field: source column}: the caller's, plus "prompt" when
    # a `question`/`query` column was taken as the prompt; {} when the columns were used as they are
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.pairs) + len(self.invalid)


class DataError(ValueError):
    """Some rows are invalid; `.invalid` holds every one of them."""

    def __init__(self, source: str, invalid: list[InvalidRow], n_rows: int):
        self.invalid = invalid
        shown = "\n  ".join(str(r) for r in invalid[:50])
        more = f"\n  ... and {len(invalid) - 50} more" if len(invalid) > 50 else ""
        super().__init__(
            f"{source}: {len(invalid)} of {n_rows} rows are invalid:\n  {shown}{more}\n"
            f"Fix them, or run `orpo-local data check {source}` for a full report; "
            "pass skip_invalid=True to train on the valid rows only."
        )


def resolve_source(source: str | Path) -> str:
    """A bundled sample name ('zh-sample', 'en-sample') -> its file; anything else unchanged."""
    return str(BUNDLED.get(str(source), source))


def _raw_rows(source: str, progress=None):
    path = Path(source)
    if path.exists():
        return read_rows(path, progress)
    if "/" in source and not source.startswith((".", "/")) and path.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        return read_hub(source)
    raise DataFileError(f"{source}: no such file or folder (bundled samples: {', '.join(BUNDLED)})")


def fingerprint_source(source: str | Path) -> dict[str, str]:
    """{file: sha256 of its bytes} for a local source (every data file of a folder); {} for a Hub id.
    A run records it, so a resume can tell that its data changed."""
    path = Path(resolve_source(source))
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    out = {}
    for file in files:
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[file.name if file == path else str(file.relative_to(path))] = digest.hexdigest()
    return out


def inspect_data(source: str | Path, format: str = "auto", max_pairs: int = -1,
                 columns: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> DataReport:
    """Read and validate every row (or until `max_pairs` valid pairs); invalid rows are collected, not raised.

    `columns` renames the source's columns to the fields the formats read before the format is
    detected, e.g. {"prompt": "question", "system": "sys"}; it must name columns the source has.
    `progress` gets a line of text at every tenth of a big file (PROGRESS_BYTES and over)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")
    columns = check_columns(columns)
    resolved = resolve_source(source)
    rows, mapping = canonical_rows(_raw_rows(resolved, _reading_progress(resolved, progress)), columns, resolved)
    if format == "auto":
        fmt, first, rows = _first_format(rows, resolved)
    else:
        fmt, first = format, None
    report = DataReport(source=resolved, format=fmt, columns=mapping)
    normalise = NORMALISERS[fmt]
    for raw in rows:
        if raw.problem:
            report.invalid.append(InvalidRow(raw.number, raw.problem, raw.source))
            continue
        if not isinstance(raw.value, dict):
            report.invalid.append(InvalidRow(raw.number, f"row must be a JSON object, got {type(raw.value).__name__}", raw.source))
            continue
        try:
            pair = normalise(raw.value)
        except RowProblem as e:
            report.invalid.append(InvalidRow(raw.number, _other_format(raw, fmt, first) + str(e), raw.source))
            continue
        pair.row, pair.source = raw.number, raw.source
        report.pairs.append(pair)
        if 0 < max_pairs <= len(report.pairs):
            break
    return report


def _reading_progress(source: str, say: Callable[[str], None] | None):
    """A reader's (bytes read, total) callback that tells `say` each tenth of a big file."""
    if say is None:
        return None
    shown = {}

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if total >= PROGRESS_BYTES and tenth > shown.get(total, 0):
            shown[total] = tenth
            say(f"reading {Path(source).name}: {10 * tenth}% ({done / 2**20:,.0f} of {total / 2**20:,.0f} MiB)")

    return report


def _other_format(raw: RawRow, fmt: str, first: RawRow | None) -> str:
    """The start of a row's reason when the row is in another format than the file's."""
    own = detect_format(raw.value)
    if first is None or own in (None, fmt):
        return ""
    return (f"this row is in the {own} format, but the file's format is {fmt} (from its first row, row {first.number}); "
            "write every row in one format (or pass --format): ")


def load_pairs(source: str | Path, format: str = "auto", skip_invalid: bool = False, max_pairs: int = -1,
               columns: dict[str, str] | None = None) -> list[PreferencePair]:
    """All valid pairs of `source`; raises DataError naming every invalid row unless skip_invalid."""
    report = inspect_data(source, format, max_pairs, columns)
    if report.invalid and not skip_invalid:
        raise DataError(report.source, report.invalid, report.n_rows)
    if not report.pairs:
        raise DataError(report.source, report.invalid or [InvalidRow(0, "no rows")], report.n_rows)
    return report.pairs


def prompt_key(pair: PreferencePair) -> str:
    """What makes two pairs 'the same prompt': the whole prompt conversation, system turn included."""
    return json.dumps(pair.prompt_messages(), ensure_ascii=False, sort_keys=True)


def split_pairs(pairs: list, val_fraction: float, seed: int, min_val: int = 0) -> tuple[list, list]:
    """Hold out about max(n * val_fraction, min_val) pairs (at least 1, at most half; none when the
    fraction is 0), prompt-disjoint from training: pairs sharing a prompt land on the same side.

    Prompts are visited in a seeded order and whole prompt groups go to validation until it holds
    enough pairs, so a model is never scored on a prompt it was trained on."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(prompt_key(pair), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    want = 0 if val_fraction == 0 or len(order) < 2 else max(1, round(len(pairs) * val_fraction), min(min_val, len(pairs) // 2))
    held: list[int] = []
    for group in order[:-1]:  # the last group always trains
        if len(held) >= want:
            break
        held += group
    held_set = set(held)
    val = [pairs[i] for i in sorted(held)]
    train = [pairs[i] for group in order for i in group if i not in held_set]
    return train, val


def _first_format(rows: Iterator[RawRow], source: str) -> tuple[str, RawRow, Iterator[RawRow]]:
    """(the format of the first row that has one, that row, every row again) for a stream of rows."""
    held = []
    for raw in rows:
        held.append(raw)
        fmt = None if raw.problem else detect_format(raw.value)
        if fmt:
            return fmt, raw, chain(held, rows)
        if len(held) >= DETECT_ROWS:
            break
    raise DataFileError(_no_format(held, source))


def _no_format(rows: list[RawRow], source: str) -> str:
    """Why no format could be told from `rows`: no rows, rows that cannot be read, or unknown fields."""
    fix = ('write one JSON object per line, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}; '
           "`orpo-local data synth example.jsonl` writes a valid file to copy")
    path = Path(source)
    if not rows:
        if path.is_file() and path.stat().st_size == 0:
            return f"{source}: the file is empty (0 bytes): {fix}"
        if path.is_file():
            return f"{source}: holds no rows, only blank lines: {fix}"
        return f"{source}: holds no rows: {fix}"
    unreadable = [r for r in rows if r.problem]
    if len(unreadable) == len(rows):
        encoding = [r for r in rows if r.problem.startswith("not UTF-8")]
        if len(encoding) == len(rows):
            return (f"{source}: not UTF-8: none of its {len(rows)} rows is UTF-8 (first bad line: {rows[0].number}). "
                    f"Line {rows[0].number}: {rows[0].problem}")
        shown = "; ".join(f"row {r.number}: {r.problem}" for r in unreadable[:5])
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        return f"{source}: none of its first {len(rows)} rows can be read: {shown}{more}"
    keys = next((sorted(r.value) for r in rows if isinstance(r.value, dict)), [])
    return (
        f"{source}: cannot tell the data format from the fields {keys}. Expected one of: "
        "standard {prompt, chosen, rejected}, conversational {prompt: [messages], chosen, rejected}, "
        "implicit {chosen: [messages], rejected: [messages]}, sharegpt {conversations, chosen, rejected}, "
        "alpaca {instruction, input, chosen, rejected}, "
        "hh-rlhf {chosen: '\\n\\nHuman: ...\\n\\nAssistant: ...', rejected: '...'}, "
        "ultrafeedback {prompt, chosen: [full conversation], rejected: [full conversation]}. "
        "A column named question or query is taken as the prompt; map other names with "
        "--columns prompt=YOUR_PROMPT_COLUMN,chosen=...,rejected=... or data.columns in YAML"
    )
