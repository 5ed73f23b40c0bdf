"""Read raw rows from files, folders and `datasets` sources, keeping each row's number.

Every reader yields `RawRow(number, value, problem)`: `number` is what a person finds in
their editor (the line of a .jsonl/.csv file, the array index + 1 of a .json file, the
row index + 1 of a parquet file or dataset) and `problem` is set when the row itself could
not be read (broken JSON, bytes that are not UTF-8, NUL characters, lone surrogates, nesting
too deep, a row longer than MAX_ROW_BYTES). A file that cannot be read at all raises
`DataFileError` instead (a UTF-16/UTF-32 file among them: it has no UTF-8 line to report).

.jsonl and .csv files are streamed a line at a time (memory does not grow with the file; a
line over MAX_ROW_BYTES is skipped without being held), with `progress(bytes_read, total)`
called as they go. A .json array and a parquet file are read whole.

Bytes are decoded with `surrogateescape`, so one row in GBK does not hide the rest: the
row is reported with its number and the file's likely encoding.

`canonical_rows` then gives the rows the field names the formats read: a column mapping
renames the source's columns, and a CSV row's JSON cells become lists/dicts.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from .formats import FIELDS, PROMPT_ALIASES

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Fields that hold lists/dicts; in a CSV cell they are JSON text.
_STRUCTURED_FIELDS = ("prompt", "chosen", "rejected", "conversations", "history")
# How many leading rows name a source's columns (a mapping must name one of them).
_COLUMN_ROWS = 200
# A row (one line of .jsonl/.csv) longer than this is reported and skipped, never read into memory.
MAX_ROW_BYTES = 16 * 2**20
# Deeper values are refused: a preference row needs 3 levels (row -> list of messages -> message).
MAX_DEPTH = 32
# Encodings tried on bytes that are not UTF-8, most likely first (Chinese exports, then others).
_GUESSES = {"gb18030": "GBK/GB18030 (Simplified Chinese)", "big5": "Big5 (Traditional Chinese)",
            "shift_jis": "Shift-JIS (Japanese)", "cp1252": "Windows-1252 (Western European)"}
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates: escaped bytes or half of a \uXXXX pair
_BAD_BYTES = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8

Progress = Callable[[int, int], None]  # (bytes read, total bytes) of the file being read


class DataFileError(ValueError):
    """The source cannot be read at all (missing, unknown type, not a JSON array...)."""


@dataclass
class RawRow:
    number: int
    value: Any
    problem: str = ""
    source: str = ""
    text_cells: bool = False  # a CSV row: every cell is text, structured fields are JSON text


def read_rows(path: str | Path, progress: Progress | None = None) -> Iterator[RawRow]:
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
            yield from read_rows(f, progress)
        return
    if not p.exists():
        raise DataFileError(f"{p}: no such file or folder")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}.get(p.suffix.lower())
    if reader is None:
        raise DataFileError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}")
    if reader is not _read_parquet:
        _refuse_utf16(p)
    for row in reader(p, progress or (lambda done, total: None)):
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


def canonical_rows(rows: Iterable[RawRow], columns: dict[str, str], source: str) -> tuple[Iterator[RawRow], dict[str, str]]:
    """The rows with the field names the formats read (streamed), and the mapping that renamed them.

    `columns` ({canonical field: source column}) renames a source's columns; a renamed column
    does not stay under its old name. A source with no prompt of its own takes `question` or
    `query` as the prompt. Then a CSV row's structured cells are parsed from JSON, after the
    renaming, so a mapped column is parsed as its field is. Raises DataFileError when
    `columns` names a column that the source's first rows lack."""
    rows = iter(rows)
    head = list(islice(rows, _COLUMN_ROWS))  # the only rows held at once: they name the columns
    have = set().union(*(r.value for r in _objects(head)))
    missing = {name: column for name, column in columns.items() if column not in have}
    if missing and have:
        plural = "s" if len(set(missing.values())) > 1 else ""
        raise DataFileError(
            f"{source}: data.columns maps {', '.join(f'{name} <- {column!r}' for name, column in missing.items())}, "
            f"but the source has no column{plural} {', '.join(repr(c) for c in dict.fromkeys(missing.values()))}; "
            f"its columns are: {', '.join(sorted(have))}")
    mapping = {**columns, **_prompt_alias(have, columns)}
    return (_canonical(r, mapping) for r in chain(head, rows)), mapping


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


# ---------------------------------------------------------------- bytes and text

def _refuse_utf16(p: Path) -> None:
    """A UTF-16/32 file (Windows "Unicode" exports) has no UTF-8 line at all: say so, and how to convert it."""
    with p.open("rb") as fh:
        head = fh.read(4096)
    # with a byte-order mark iconv's plain UTF-16/UTF-32 reads the order from it
    boms = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
    encoding = next((name for bom, name in boms if head.startswith(bom)), None)
    why = "it starts with a UTF-16/32 byte-order mark"
    if encoding is None and len(head) >= 16 and head.count(0) > len(head) // 4:
        # ASCII in UTF-16 is every other byte NUL: the NULs' side tells the byte order
        encoding = "UTF-16LE" if head[1::2].count(0) > head[0::2].count(0) else "UTF-16BE"
        why = "every other byte is NUL"
    if encoding:
        raise DataFileError(f"{p}: not UTF-8: the file is {encoding} ({why}), from line 1 on; a Windows \"Unicode\" "
                            f"export is this. Convert it to UTF-8 and use the new file: {_iconv(p, encoding)}")


def _iconv(p: Path, encoding: str) -> str:
    out = p.with_name(f"{p.stem}.utf8{p.suffix}")
    return f"`iconv -f {encoding} -t UTF-8 '{p}' > '{out}'`"


def _not_utf8(text: str, source: Path | None = None) -> str:
    """A problem message if `text` (decoded with surrogateescape) holds bytes that are not UTF-8,
    naming the first bad byte, the likely encoding and the command that converts the file."""
    found = _BAD_BYTES.search(text)
    if found is None:
        return ""
    bad = found.start()
    raw = text.encode("utf-8", errors="surrogateescape")
    guess = next((enc for enc in _GUESSES if _decodes(raw, enc)), "")
    where = f"'{source}'" if source else "the file"
    command = _iconv(source, guess) if source else f"`iconv -f {guess} -t UTF-8 IN > OUT`"
    hint = (f"; it decodes as {guess}, so {where} is probably {_GUESSES.get(guess)}: convert it with {command}"
            if guess else "; save the file as UTF-8")
    return f"not UTF-8: byte 0x{ord(text[bad]) - 0xDC00:02x} at character {bad + 1}{hint}"


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _value_problems(value: Any, source: Path | None = None, raw_checked: bool = True) -> list[str]:
    """Every text problem in a parsed row, named by field: NUL characters, lone surrogates (a broken
    \\ud83d escape), nesting deeper than MAX_DEPTH, and (unless the raw bytes were checked already)
    bytes that are not UTF-8. Walks without recursion, so no value can exhaust the stack."""
    problems, stack = [], [("", value, 0)]
    while stack and len(problems) < 5:
        where, item, depth = stack.pop()
        if depth > MAX_DEPTH:
            at = f" at {where[:40]!r}{'...' if len(where) > 40 else ''}" if where else ""
            problems.append(f"nested more than {MAX_DEPTH} levels deep{at} (a preference row "
                            "needs 3: row, list of messages, message); flatten it")
            break
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v, depth + 1) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, str) and _BAD_TEXT.search(item):
            problems.append(_text_problem(where or "row", item, source, raw_checked))
    return problems


def _text_problem(where: str, text: str, source: Path | None, raw_checked: bool) -> str:
    if not raw_checked and (bad := _not_utf8(text, source)):
        return f"field {where!r}: {bad}"
    i = _BAD_TEXT.search(text).start()
    if text[i] == "\x00":
        return (f"field {where!r} holds a NUL character (U+0000) at character {i + 1}: remove it (NULs come from "
                "binary files and broken exports, and no tokenizer reads them as text)")
    return (f"field {where!r} holds a lone surrogate U+{ord(text[i]):04X} at character {i + 1} (half of a \\uXXXX pair, "
            "often a cut emoji): write the character itself, or its full surrogate pair")


def _json(line: str) -> tuple[Any, str]:
    """(value, "") or (None, what is wrong with this JSON text)."""
    try:
        return json.loads(line), ""
    except json.JSONDecodeError as e:
        return None, f"broken JSON at column {e.colno}: {e.msg}; fix the JSON of this line (one object per line)"
    except RecursionError:
        return None, "broken JSON: nested too deeply for a JSON reader; flatten it (a preference row needs 3 levels)"


# ---------------------------------------------------------------- streamed lines

def _lines(fh: BinaryIO, total: int, progress: Progress) -> Iterator[tuple[int, bytes | int]]:
    """(line number, the line's bytes with its line end) for each line of `fh`; a line longer than
    MAX_ROW_BYTES comes as (number, its length in bytes), skipped unread. A UTF-8 BOM is dropped."""
    number, step = 0, max(total // 100, 1 << 20)
    next_report = step
    while True:
        line = fh.readline(MAX_ROW_BYTES + 1)
        if not line:
            break
        number += 1
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if len(line) > MAX_ROW_BYTES:
            yield number, len(line) + _skip_line(fh)
        else:
            yield number, line
        if fh.tell() >= next_report:
            progress(fh.tell(), total)
            next_report = fh.tell() + step
    progress(total, total)


def _skip_line(fh: BinaryIO) -> int:
    skipped = 0
    while chunk := fh.readline(1 << 20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _too_long(size: int) -> str:
    return (f"the row is {size / 2**20:.1f} MiB, over the {MAX_ROW_BYTES // 2**20} MiB a row may have; it was skipped "
            "unread: shorten it or split it into several rows")


def _read_jsonl(p: Path, progress: Progress) -> Iterator[RawRow]:
    # lines end at "\n" only: str.splitlines would also break on U+2028 etc. inside JSON strings.
    with p.open("rb") as fh:
        for number, raw in _lines(fh, p.stat().st_size, progress):
            if isinstance(raw, int):
                yield RawRow(number, None, _too_long(raw))
                continue
            line = raw.decode("utf-8", errors="surrogateescape").rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            bad = _not_utf8(line, p)
            if bad:
                yield RawRow(number, None, bad)
                continue
            value, broken = _json(line)
            problems = [broken] if broken else _value_problems(value, p)
            yield RawRow(number, None if problems else value, "; ".join(problems))


def _read_json(p: Path, progress: Progress) -> Iterator[RawRow]:
    data = p.read_bytes()
    progress(len(data), len(data))
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    del data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{p}: broken JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix it there, or write "
                            "one JSON object per line as .jsonl (each bad line is then reported on its own)") from e
    except RecursionError:
        raise DataFileError(f"{p}: JSON nested too deeply to read; a preference row needs 3 levels") from None
    if isinstance(data, dict):
        # {"train": [...]} or {"data": [...]}: take the one list of rows.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataFileError(f"{p}: expected a JSON array of rows (or an object holding exactly one array)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataFileError(f"{p}: expected a JSON array of rows, got {type(data).__name__}")
    for i, value in enumerate(data):
        problems = _value_problems(value, p, raw_checked=False)
        yield RawRow(i + 1, None if problems else value, "; ".join(problems))


def _read_csv(p: Path, progress: Progress) -> Iterator[RawRow]:
    skipped: dict[int, int] = {}  # line number -> bytes of an over-long line, fed to csv as a blank line

    def text_lines(fh):
        for number, raw in _lines(fh, p.stat().st_size, progress):
            if isinstance(raw, int):
                skipped[number] = raw
                raw = b"\n"
            yield raw.decode("utf-8", errors="surrogateescape")

    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))
    with p.open("rb") as fh:
        reader = csv.reader(text_lines(fh))
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFileError(f"{p}: cannot read the CSV header on line 1: {e}") from None
        line = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                number, line = line + 1, reader.line_num
                yield RawRow(number, None, f"unreadable CSV record: {e}; check its quotes")
                continue
            number, line = line + 1, reader.line_num
            for too_long in [n for n in skipped if n <= line]:
                yield RawRow(too_long, None, _too_long(skipped.pop(too_long)))
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                yield RawRow(number, None, f"has {len(cells)} cells but the header has {len(header)}; quote cells that "
                                           "hold commas or line breaks")
                continue
            row = dict(zip(header, cells))
            problems = _value_problems(row, p, raw_checked=False)
            yield RawRow(number, None if problems else row, "; ".join(problems), text_cells=True)


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


def _read_parquet(p: Path, progress: Progress) -> Iterator[RawRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataFileError(f"{p}: reading parquet needs pyarrow: pip install 'orpo-local[data]'") from e
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise DataFileError(f"{p}: cannot read parquet: {e}") from e
    for i, value in enumerate(rows):
        problems = _value_problems(value, p)
        yield RawRow(i + 1, None if problems else value, "; ".join(problems))


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
