"""Preference data: load any supported source into `PreferencePair`s, report every bad row.

    pairs = load_pairs("prefs.jsonl")                 # raises DataError listing all invalid rows
    report = inspect_data("prefs.csv", format="alpaca")  # valid pairs + invalid rows, never raises on rows
    train, val = split_pairs(pairs, val_fraction=0.05, seed=42)
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .formats import FORMATS, NORMALISERS, PreferencePair, RowProblem, detect_format
from .readers import DataFileError, RawRow, read_hub, read_rows

SAMPLES_DIR = Path(__file__).parent / "samples"
BUNDLED = {"zh-sample": SAMPLES_DIR / "zh_sample.jsonl", "en-sample": SAMPLES_DIR / "en_sample.jsonl"}

__all__ = ["BUNDLED", "DataError", "DataFileError", "DataReport", "FORMATS", "InvalidRow", "PreferencePair",
           "inspect_data", "load_pairs", "resolve_source", "split_pairs"]


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


def _raw_rows(source: str):
    path = Path(source)
    if path.exists():
        return read_rows(path)
    if "/" in source and not source.startswith((".", "/")) and path.suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        return read_hub(source)
    raise DataFileError(f"{source}: no such file or folder (bundled samples: {', '.join(BUNDLED)})")


def inspect_data(source: str | Path, format: str = "auto", max_pairs: int = -1) -> DataReport:
    """Read and validate every row; invalid rows are collected, not raised."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use auto or one of {', '.join(FORMATS)}")
    resolved = resolve_source(source)
    rows: list[RawRow] = list(_raw_rows(resolved))
    fmt = format if format != "auto" else _majority_format(rows, resolved)
    report = DataReport(source=resolved, format=fmt)
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
            report.invalid.append(InvalidRow(raw.number, str(e), raw.source))
            continue
        pair.row, pair.source = raw.number, raw.source
        report.pairs.append(pair)
    if max_pairs > 0:
        report.pairs = report.pairs[:max_pairs]
    return report


def load_pairs(source: str | Path, format: str = "auto", skip_invalid: bool = False, max_pairs: int = -1) -> list[PreferencePair]:
    """All valid pairs of `source`; raises DataError naming every invalid row unless skip_invalid."""
    report = inspect_data(source, format, max_pairs)
    if report.invalid and not skip_invalid:
        raise DataError(report.source, report.invalid, report.n_rows)
    if not report.pairs:
        raise DataError(report.source, report.invalid or [InvalidRow(0, "no rows")], report.n_rows)
    return report.pairs


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then hold out round(n * val_fraction) pairs (at least 1 when the fraction is > 0)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 or len(pairs) < 2 else min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction)))
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in order[n_val:]]
    return train, val


def _majority_format(rows: list[RawRow], source: str) -> str:
    if not rows:
        raise DataFileError(f"{source}: holds no rows")
    votes = Counter(f for f in (detect_format(r.value) for r in rows[:200] if not r.problem) if f)
    if not votes:
        keys = next((sorted(r.value) for r in rows if isinstance(r.value, dict)), [])
        raise DataFileError(
            f"{source}: cannot tell the data format from the fields {keys}. Expected one of: "
            "standard {prompt, chosen, rejected}, conversational {prompt: [messages], chosen, rejected}, "
            "implicit {chosen: [messages], rejected: [messages]}, sharegpt {conversations, chosen, rejected}, "
            "alpaca {instruction, input, chosen, rejected}"
        )
    return votes.most_common(1)[0][0]
