"""Hostile and broken data, refused or reported before any model loads (docs/reliability.md, item 1).

tests/hostile/ holds one small file per kind of damage; each is read here and every problem must
come back at once, naming the file, the row and the field, and (for the damage only the readers
can see: encodings, NULs, surrogates, nesting, mixed formats, empty files) the fix. Memory is
measured in a fresh subprocess (peak RSS after the imports), so nothing else in the test run counts.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orpo_local.data import DataFileError, inspect_data

HOSTILE = Path(__file__).parent / "hostile"
REPO = Path(__file__).parent.parent

# file -> (valid pairs, {row: words its reason must hold}); every other row must be valid
ROWS = {
    "missing_field.jsonl": (1, {2: ["missing field 'rejected'"], 3: ["missing field 'prompt'"]}),
    "wrong_type.jsonl": (1, {2: ["'chosen' must be a string, got int"], 3: ["'rejected' must be a string, got list"]}),
    "empty_response.jsonl": (1, {2: ["empty response", "'chosen'"], 3: ["empty response", "'rejected'"]}),
    "chosen_equals_rejected.jsonl": (1, {2: ["chosen == rejected"]}),
    "bad_role_order.jsonl": (1, {2: ["bad role order", "expected 'assistant'"], 3: ["bad role order", "system message"],
                                 4: ["bad role order", "end with a user message"]}),
    "broken_json.jsonl": (2, {2: ["broken JSON at column 32", "fix the JSON"], 3: ["must be a JSON object, got list"],
                              5: ["broken JSON at column 15", "fix the JSON"]}),
    "mixed_formats.jsonl": (3, {3: ["in the alpaca format", "file's format is standard", "row 1", "one format"],
                                4: ["in the conversational format", "file's format is standard", "one format"],
                                6: ["in the sharegpt format", "file's format is standard", "one format"]}),
    "deep_nesting.jsonl": (1, {2: ["nested too deeply", "flatten it"], 3: ["nested more than 32 levels", "'meta[0]", "flatten it"]}),
    "nul.jsonl": (1, {2: ["field 'chosen'", "NUL character (U+0000) at character 2", "remove it"],
                      3: ["broken JSON", "control character"]}),
    "lone_surrogate.jsonl": (1, {2: ["field 'prompt'", "lone surrogate U+D83D at character 7", "full surrogate pair"],
                                 3: ["field 'chosen[0].content'", "lone surrogate U+DFFF"]}),
    "formula.csv": (2, {}),
    "template_text.jsonl": (3, {}),
}
# file -> words of the one error that refuses the whole file
FILES = {
    "gbk.jsonl": ["not UTF-8", "none of its 5 rows", "first bad line: 1", "GBK/GB18030", "iconv -f gb18030 -t UTF-8"],
    "utf16.jsonl": ["not UTF-8", "the file is UTF-16", "byte-order mark", "line 1", "iconv -f UTF-16 -t UTF-8"],
    "utf16_no_bom.jsonl": ["not UTF-8", "UTF-16LE", "every other byte is NUL", "iconv -f UTF-16LE -t UTF-8"],
    "empty.jsonl": ["the file is empty (0 bytes)", "one JSON object per line", "data synth"],
    "blank_lines.jsonl": ["no rows, only blank lines", "one JSON object per line"],
}


def test_the_corpus_is_what_the_tables_cover():
    assert sorted(p.name for p in HOSTILE.iterdir()) == sorted({**ROWS, **FILES})


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_bad_row_is_reported_at_once_with_file_row_and_reason(name):
    valid, expected = ROWS[name]
    report = inspect_data(HOSTILE / name)
    assert len(report.pairs) == valid
    reasons = {bad.row: str(bad) for bad in report.invalid}
    assert set(reasons) == set(expected), reasons
    for row, words in expected.items():
        assert f"{HOSTILE / name}: row {row}: " in reasons[row]
        for word in words:
            assert word in reasons[row], (row, word, reasons[row])


@pytest.mark.parametrize("name", sorted(FILES))
def test_an_unreadable_file_is_refused_with_the_encoding_or_the_fix(name):
    with pytest.raises(DataFileError) as error:
        inspect_data(HOSTILE / name)
    message = str(error.value)
    assert message.startswith(f"{HOSTILE / name}: ")
    for word in FILES[name]:
        assert word in message, (word, message)


@pytest.mark.parametrize("name", ["gbk.jsonl", "utf16.jsonl", "utf16_no_bom.jsonl"])
def test_the_printed_iconv_command_makes_a_file_that_loads(name, tmp_path):
    if shutil.which("iconv") is None:
        pytest.skip("no iconv on this machine")
    shutil.copy(HOSTILE / name, tmp_path / name)
    with pytest.raises(DataFileError) as error:
        inspect_data(tmp_path / name)
    command = str(error.value).rsplit("`", 2)[-2]
    subprocess.run(command, shell=True, check=True)  # noqa: S602 - our own message, paths under tmp_path
    report = inspect_data(tmp_path / name.replace(".jsonl", ".utf8.jsonl"))
    assert not report.invalid and [p.chosen for p in report.pairs] == [f"等于{2 * i}。" for i in range(1, 6)]


def test_a_gbk_row_among_utf8_rows_is_reported_with_the_command_for_its_file(tmp_path):
    """One bad row does not hide the rest: it is reported by its line, with the iconv command for its file."""
    data = tmp_path / "some.jsonl"
    gbk = (HOSTILE / "gbk.jsonl").read_bytes().splitlines(keepends=True)[1]
    data.write_bytes((HOSTILE / "template_text.jsonl").read_bytes() + gbk)
    report = inspect_data(data)
    (bad,) = report.invalid
    assert len(report.pairs) == 3 and bad.row == 4
    assert str(bad).startswith(f"{data}: row 4: not UTF-8: byte 0xb5 at character 13")
    assert f"iconv -f gb18030 -t UTF-8 '{data}' > '{tmp_path / 'some.utf8.jsonl'}'" in bad.reason


def test_template_syntax_special_tokens_paths_and_formulas_are_plain_text_byte_for_byte():
    # split at "\n" only: the file holds U+2028/U+2029, which str.splitlines takes for line ends
    raw = [json.loads(line) for line in (HOSTILE / "template_text.jsonl").read_text(encoding="utf-8").split("\n") if line]
    pairs = inspect_data(HOSTILE / "template_text.jsonl").pairs
    assert [(p.prompt[0]["content"], p.chosen, p.rejected) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"]) for r in raw]
    import csv

    with (HOSTILE / "formula.csv").open(encoding="utf-8", newline="") as fh:
        cells = list(csv.reader(fh))[1:]
    pairs = inspect_data(HOSTILE / "formula.csv").pairs
    assert [[p.prompt[0]["content"], p.chosen, p.rejected] for p in pairs] == cells  # "=HYPERLINK(...)" stays text


def test_special_token_text_never_becomes_a_control_token():
    """Through the bundled tokenizer and its template: the text of <|im_start|> in a row is tokenised as
    text, so the only control tokens are the template's own; decoding gives the row's text back."""
    from orpo_local.models import load_tokenizer
    from orpo_local.tokenization import ChatEncoder, tokenize_pairs

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    pairs = inspect_data(HOSTILE / "template_text.jsonl").pairs
    tokenized, stats = tokenize_pairs(pairs, ChatEncoder(tok), 512, 256)
    im_start, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert stats.escaped == 1 and len(tokenized) == 3
    first = tokenized[0]
    assert first.chosen.count(im_start) == 0 and first.chosen.count(im_end) == 1  # only the turn's own end
    assert tok.decode(first.chosen).startswith(pairs[0].chosen)
    assert "{{ raise_exception('boom') }}" in tok.decode(first.prompt)  # never executed by the template


MEASURE = """
import json, resource, sys
from orpo_local.data import inspect_data, readers
from orpo_local.data.readers import read_rows

def peak_mb():
    try:  # Linux: the peak RSS since the last mark()
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)

def mark():
    \"\"\"Start measuring here: the peak is reset to the current RSS where the OS allows.\"\"\"
    global before
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    before = peak_mb()

mark()
"""


def rss_of(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter after its imports; it sets `result` (a dict) and may call mark()
    to start measuring later. Returns that dict with "rss_mb": the peak RSS the code added."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE + f"{code}\nresult['rss_mb'] = peak_mb() - before\nprint(json.dumps(result))\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_rows(path: Path, n: int, chars: int) -> Path:
    row = {"prompt": "长城有多长？" + "背景。" * (chars // 3), "chosen": "约两万一千公里。" * (chars // 8), "rejected": "一百米。"}
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(line)
    return path


def test_reading_streams_a_file_in_memory_that_does_not_grow_with_it(tmp_path):
    """A 32 MiB file is read row by row: +<16 MB peak while iterating (reading it whole, decoding and
    splitting it needed 3-4 copies, ~110 MB); `max_pairs` stops reading at that many pairs."""
    data = write_rows(tmp_path / "big.jsonl", 5300, 2000)
    assert data.stat().st_size > 32 * 2**20
    streamed = rss_of(f"result = {{'rows': sum(1 for _ in read_rows({str(data)!r}))}}", tmp_path)
    assert streamed["rows"] == 5300 and streamed["rss_mb"] < 16, streamed
    first = rss_of(f"result = {{'pairs': len(inspect_data({str(data)!r}, max_pairs=10).pairs)}}", tmp_path)
    assert first["pairs"] == 10 and first["rss_mb"] < 16, first
    print(f"32 MiB file: +{streamed['rss_mb']:.1f} MB reading every row, +{first['rss_mb']:.1f} MB for max_pairs=10")


def test_a_row_over_the_row_limit_is_skipped_unread(tmp_path):
    """With a 1 MiB row limit, a 24 MiB line is reported with its size and never held in memory."""
    data = tmp_path / "long.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    data.write_text(good + "\n" + '{"prompt": "' + "x" * (24 * 2**20) + '"}\n' + good + "\n", encoding="utf-8")
    got = rss_of("readers.MAX_ROW_BYTES = 2**20\n"
                 f"r = inspect_data({str(data)!r})\n"
                 "result = {'pairs': len(r.pairs), 'invalid': [(b.row, b.reason) for b in r.invalid]}", tmp_path)
    assert got["pairs"] == 2 and got["rss_mb"] < 8, got
    print(f"24 MiB line over a 1 MiB limit: +{got['rss_mb']:.1f} MB")
    ((row, reason),) = got["invalid"]
    assert row == 2 and "24.0 MiB, over the 1 MiB" in reason and "split it" in reason


def test_an_enormous_row_is_truncated_and_counted_with_bounded_memory(tmp_path):
    """A row of 60,000+ characters a field goes through `data check` with the bundled tokenizer:
    truncated to max_length and counted, in well under a second and a few tens of MB."""
    data = write_rows(tmp_path / "rows.jsonl", 3, 30)
    big = {"prompt": "请总结：" + "长城是中国古代的军事防御工程。" * 4000, "chosen": "好" * 60000, "rejected": "坏" * 60000}
    with data.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(big, ensure_ascii=False) + "\n")
    got = rss_of("import time\n"
                 "from orpo_local.datacheck import check_data\n"
                 "from orpo_local.models import load_tokenizer\n"
                 "load_tokenizer('smollm2-135m-instruct', progress=lambda m: None)\n"
                 "mark()\n"
                 "t = time.perf_counter()\n"
                 f"c = check_data({str(data)!r}, model='smollm2-135m-instruct', max_length=512, max_prompt_length=256)\n"
                 "result = {'s': time.perf_counter() - t, 'kept': c.stats.pairs_out, 'truncated': c.stats.truncated,\n"
                 "          'dropped': c.stats.dropped, 'longest': max(map(len, (c.report.pairs[-1].chosen, c.report.pairs[-1].prompt[0]['content'])))}",
                 tmp_path)
    print(f"enormous row: {got}")
    assert got["longest"] == 60004 and got["kept"] == 4 and got["truncated"] == 1 and got["dropped"] == 0
    assert got["s"] < 20 and got["rss_mb"] < 150, got


def test_a_big_file_reports_its_reading_progress(tmp_path, monkeypatch):
    import orpo_local.data as data_module

    monkeypatch.setattr(data_module, "PROGRESS_BYTES", 2**20)
    data = write_rows(tmp_path / "progress.jsonl", 800, 2000)  # ~5 MiB
    lines = []
    report = inspect_data(data, progress=lines.append)
    assert len(report.pairs) == 800
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert lines[-1].startswith("reading progress.jsonl: 100% (") and lines[-1].endswith("MiB)")
    small = []
    inspect_data(HOSTILE / "missing_field.jsonl", progress=small.append)
    assert small == []  # small files say nothing


def test_hostile_data_fails_before_any_model_is_fetched_or_loaded(tmp_path, monkeypatch):
    """train() on a GBK file: the encoding error, and neither the model lookup nor a backend ran."""
    import orpo_local.models as models
    from orpo_local import TrainConfig, train

    def no_model(*a, **k):
        raise AssertionError("the model must not be fetched for unreadable data")

    monkeypatch.setattr(models, "resolve_model", no_model)
    config = TrainConfig().with_overrides({"data.path": str(HOSTILE / "gbk.jsonl"), "run.runs_dir": str(tmp_path / "runs")})
    with pytest.raises(DataFileError, match="not UTF-8.*iconv"):
        train(config, backend=object(), progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
