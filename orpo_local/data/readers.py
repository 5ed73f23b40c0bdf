"""Read raw rows from files, folders and `datasets` sources, keeping each row's number.

Every reader yields `RawRow(number, value, problem)`: `number` is what a person finds in
their editor (the line of a .jsonl/.csv file, the array index + 1 of a .json file, the
row index + 1 of a parquet file or dataset) and `problem` is set when the row itself could
not be read (broken JSON, bytes that are not UTF-8). A file that cannot be read at all
raises `DataFileError` instead.

Bytes are decoded with `surrogateescape`, so one row in GBK does not hide the rest: the
row is reported with its number and the file's likely encoding.

`canonical_rows` then gives the rows the field names the formats read: a column mapping
renames the source's columns, and a CSV row's JSON cells become lists/dicts.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from .formats import FIELDS, PROMPT_ALIASES

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Fields that hold lists/dicts; in a CSV cell they are JSON text.
_STRUCTURED_FIELDS = ("prompt", "chosen", "rejected", "conversations", "history")
# How many leading rows name a source's columns (a mapping must name one of them).
_COLUMN_ROWS = 200


class DataFileError(ValueError):
    """The source cannot be read at all (missing, unknown type, not a JSON array...)."""


@dataclass
class RawRow:
    number: int
    value: Any
    problem: str = ""
    source: str = ""
    text_cells: bool = False  # a CSV row: every cell is text, structured fields are JSON text


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield raw rows from one file, a folder of files, or a saved `datasets` folder."""
    p = Path(path)
    if p.is_dir():
        if _is_saved_dataset(p):
            yield from _read_saved_dataset(p)
            return
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataFileError(f"{p}: folder holds no {', '.join(SUFFIXES)} files and is not a saved `datasets` folder")
        for f in files:
            yield from read_rows(f)
        return
    if not p.exists():
        raise DataFileError(f"{p}: no such file or folder")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}.get(p.suffix.lower())
    if reader is None:
        raise DataFileError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    for row in reader(p):
        row.source = str(p)
        yield row


def read_hub(dataset_id: str, split: str = "train") -> Iterator[RawRow]:
    """Rows of a Hugging Face Hub dataset (needs the `datasets` package and network or a local cache)."""
    try:
        import datasets
    except ImportError as e:
        raise DataFileError(f"{dataset_id}: reading Hub datasets needs the `datasets` package: pip install 'orpo-local[data]'") from e
    name, _, sub_split = dataset_id.partition(":")
    try:
        ds = datasets.load_dataset(name, split=sub_split or split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError)
        raise DataFileError(
            f"{dataset_id}: cannot load this Hub dataset ({type(e).__name__}: {e}). Without network, "
            "save it once with `datasets.load_dataset(...).save_to_disk(DIR)` and pass DIR instead"
        ) from e
    for i, row in enumerate(ds):
        yield RawRow(i + 1, row, source=dataset_id)


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """A column mapping {canonical field: source column} as a dict; ValueError for a field no format reads."""
    columns = dict(columns or {})
    unknown = [name for name in columns if name not in FIELDS]
    if unknown:
        raise ValueError(f"data.columns: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"the fields to map to are: {', '.join(FIELDS)}")
    blank = [name for name, column in columns.items() if not isinstance(column, str) or not column.strip()]
    if blank:
        raise ValueError(f"data.columns: {', '.join(map(repr, blank))} must name a source column")
    return columns


def canonical_rows(rows: list[RawRow], columns: dict[str, str], source: str) -> tuple[list[RawRow], dict[str, str]]:
    """The rows with the field names the formats read, and the mapping that renamed them.

    `columns` ({canonical field: source column}) renames a source's columns; a renamed column
    does not stay under its old name. A source with no prompt of its own takes `question` or
    `query` as the prompt. Then a CSV row's structured cells are parsed from JSON, after the
    renaming, so a mapped column is parsed as its field is. Raises DataFileError when
    `columns` names a column that the source's first rows lack."""
    have = set().union(*(r.value for r in islice(_objects(rows), _COLUMN_ROWS)))
    missing = {name: column for name, column in columns.items() if column not in have}
    if missing and have:
        plural = "s" if len(set(missing.values())) > 1 else ""
        raise DataFileError(
            f"{source}: data.columns maps {', '.join(f'{name} <- {column!r}' for name, column in missing.items())}, "
            f"but the source has no column{plural} {', '.join(repr(c) for c in dict.fromkeys(missing.values()))}; "
            f"its columns are: {', '.join(sorted(have))}")
    mapping = {**columns, **_prompt_alias(have, columns)}
    return [_canonical(r, mapping) for r in rows], mapping


def _objects(rows: list[RawRow]) -> Iterator[RawRow]:
    return (r for r in rows if not r.problem and isinstance(r.value, dict))


def _prompt_alias(have: set[str], columns: dict[str, str]) -> dict[str, str]:
    """{"prompt": "question"} for a preference source whose prompt column is called question/query."""
    fields = (have - set(columns.values())) | set(columns)
    if fields & {"prompt", "instruction", "conversations"} or not {"chosen", "rejected"} <= fields:
        return {}
    alias = next((a for a in PROMPT_ALIASES if a in have and a not in columns.values()), None)
    return {"prompt": alias} if alias else {}


def _canonical(raw: RawRow, mapping: dict[str, str]) -> RawRow:
    if raw.problem or not isinstance(raw.value, dict) or not (mapping or raw.text_cells):
        return raw
    value = {k: v for k, v in raw.value.items() if k not in mapping.values()}
    value.update((name, raw.value[column]) for name, column in mapping.items() if column in raw.value)
    if raw.text_cells:
        for key in _STRUCTURED_FIELDS:
            cell = value.get(key, "")
            if isinstance(cell, str) and cell.lstrip()[:1] in ("[", "{"):
                value[key] = _messages_or_text(cell)
    return replace(raw, value=value)


def _decode(p: Path) -> str:
    data = p.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _not_utf8(text: str, raw: bytes | None = None) -> str:
    """A problem message if `text` holds undecodable bytes, naming a likely encoding."""
    bad = [ch for ch in text if "\udc80" <= ch <= "\udcff"]
    if not bad:
        return ""
    raw = raw if raw is not None else text.encode("utf-8", errors="surrogateescape")
    guess = ""
    for enc in ("gb18030", "big5", "shift_jis", "cp1252"):
        try:
            raw.decode(enc)
            guess = enc
            break
        except UnicodeDecodeError:
            continue
    hint = f" (it decodes as {guess}: convert the file with `iconv -f {guess} -t utf-8 IN > OUT`)" if guess else ""
    return f"not UTF-8: byte 0x{ord(bad[0]) - 0xDC00:02x}{hint}"


def _has_bad_bytes(value: Any) -> str:
    if isinstance(value, str):
        return _not_utf8(value)
    if isinstance(value, dict):
        return next((m for m in (_has_bad_bytes(v) for v in value.values()) if m), "")
    if isinstance(value, list):
        return next((m for m in (_has_bad_bytes(v) for v in value) if m), "")
    return ""


def _read_jsonl(p: Path) -> Iterator[RawRow]:
    # split on "\n" only: str.splitlines also breaks on U+2028 etc. inside JSON strings.
    for number, line in enumerate(_decode(p).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        bad = _not_utf8(line)
        if bad:
            yield RawRow(number, None, bad)
            continue
        try:
            yield RawRow(number, json.loads(line))
        except json.JSONDecodeError as e:
            yield RawRow(number, None, f"broken JSON at column {e.colno}: {e.msg}")


def _read_json(p: Path) -> Iterator[RawRow]:
    text = _decode(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{p}: broken JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]}: take the one list of rows.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFileError(f"{p}: expected a JSON array of rows (or an object holding exactly one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataFileError(f"{p}: expected a JSON array of rows, got {type(data).__name__}")
    for i, value in enumerate(data):
        yield RawRow(i + 1, value, _has_bad_bytes(value))


def _read_csv(p: Path) -> Iterator[RawRow]:
    reader = csv.reader(io.StringIO(_decode(p), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    header = [h.strip() for h in header]
    line = reader.line_num
    for cells in reader:
        number, line = line + 1, reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield RawRow(number, None, f"has {len(cells)} cells but the header has {len(header)}")
            continue
        row = dict(zip(header, cells))
        bad = _has_bad_bytes(row)
        if bad:
            yield RawRow(number, None, bad)
            continue
        yield RawRow(number, row, text_cells=True)


def _messages_or_text(cell: str):
    """A CSV cell holding JSON messages (or [q, a] history) becomes that structure; any other text
    that merely starts with [ or { ("[link](url)", a JSON answer) stays text."""
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell
    items = value if isinstance(value, list) else [value]
    is_message = lambda m: isinstance(m, dict) and ({"role", "content"} <= set(m) or {"from", "value"} <= set(m))  # noqa: E731
    is_turn = lambda m: isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)  # noqa: E731
    return value if items and (all(map(is_message, items)) or all(map(is_turn, items))) else cell


def _read_parquet(p: Path) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataFileError(f"{p}: reading parquet needs pyarrow: pip install 'orpo-local[data]'") from e
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise DataFileError(f"{p}: cannot read parquet: {e}") from e
    for i, value in enumerate(rows):
        yield RawRow(i + 1, value)


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _read_saved_dataset(p: Path, split: str = "train") -> Iterator[RawRow]:
    try:
        import datasets
    except ImportError as e:
        raise DataFileError(f"{p}: reading a saved dataset needs the `datasets` package: pip install 'orpo-local[data]'") from e
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataFileError(f"{p}: saved DatasetDict has no {split!r} split (it has {', '.join(ds)})")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield RawRow(i + 1, row, source=str(p))
