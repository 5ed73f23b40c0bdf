"""Data loading: the five formats, every file type, and every kind of bad row reported at once."""

import json
import random

import pytest

from orpo_local.data import BUNDLED, DataError, DataFileError, PreferencePair, inspect_data, load_pairs, prompt_key, split_pairs
from orpo_local.data.synthetic import arithmetic_pairs

SYSTEM = "你是一个乐于助人的助手。"
ROWS = {
    "standard": {"prompt": "1+1等于几？", "chosen": "等于2。", "rejected": "等于3。", "system": SYSTEM},
    "conversational": {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"},
                   {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1等于几？"}],
        "chosen": [{"role": "assistant", "content": "等于2。"}],
        "rejected": [{"role": "assistant", "content": "等于3。"}],
    },
    "implicit": {
        "chosen": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": "等于2。"}],
        "rejected": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+1等于几？"}, {"role": "assistant", "content": "等于3。"}],
    },
    "sharegpt": {
        "conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "1+1等于几？"}],
        "chosen": {"from": "gpt", "value": "等于2。"},
        "rejected": {"from": "gpt", "value": "等于3。"},
    },
    "alpaca": {"instruction": "1+1等于几？", "input": "", "chosen": "等于2。", "rejected": "等于3。", "system": SYSTEM,
               "history": [["你好", "你好！"]]},
}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_is_detected_and_normalised(tmp_path, fmt):
    report = inspect_data(write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]]))
    assert report.format == fmt and not report.invalid
    pair = report.pairs[0]
    assert pair.system == SYSTEM
    assert pair.prompt[-1] == {"role": "user", "content": "1+1等于几？"}
    assert (pair.chosen, pair.rejected) == ("等于2。", "等于3。")
    if fmt in ("conversational", "alpaca"):
        assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt_messages()[0] == {"role": "system", "content": SYSTEM}


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    row = {"instruction": "翻译成英文", "input": "你好", "chosen": "Hello", "rejected": "Bye"}
    (pair,) = load_pairs(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert pair.prompt == [{"role": "user", "content": "翻译成英文\n你好"}]


def test_json_csv_parquet_folder_and_saved_dataset(tmp_path):
    rows = [ROWS["standard"], {**ROWS["standard"], "chosen": "是2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert len(load_pairs(tmp_path / "a.json")) == 2

    csv_text = 'prompt,chosen,rejected\n"多行\n提问",好,坏\n问,"答,有逗号",错\n'
    (tmp_path / "b.csv").write_text(csv_text, encoding="utf-8")
    pairs = load_pairs(tmp_path / "b.csv")
    assert pairs[0].prompt[0]["content"] == "多行\n提问" and pairs[1].chosen == "答,有逗号"
    assert [p.row for p in pairs] == [2, 4]  # line numbers of the records (header is line 1)

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([ROWS["conversational"]] * 3), tmp_path / "c.parquet")
    assert len(load_pairs(tmp_path / "c.parquet")) == 3

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", [ROWS["standard"]])
    write_jsonl(folder / "2.jsonl", [ROWS["standard"]] * 2)
    assert len(load_pairs(folder)) == 3

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([ROWS["sharegpt"]] * 4).save_to_disk(str(tmp_path / "saved"))
    report = inspect_data(tmp_path / "saved")
    assert report.format == "sharegpt" and len(report.pairs) == 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS["alpaca"]] * 2)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(tmp_path / "dd")) == 2


def test_hub_id_without_network_gives_a_way_out(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataFileError, match="save_to_disk"):
        load_pairs("no-such-org/no-such-dataset")


def test_csv_text_that_starts_with_a_bracket_stays_text_and_json_messages_are_read(tmp_path):
    (tmp_path / "t.csv").write_text('prompt,chosen,rejected\n"[翻译] hello","[link](http://x) 见此","{""a"": 1}"\n', encoding="utf-8")
    (pair,) = load_pairs(tmp_path / "t.csv")
    assert pair.prompt[0]["content"] == "[翻译] hello" and pair.chosen == "[link](http://x) 见此" and pair.rejected == '{"a": 1}'
    conv = '"[{""role"": ""user"", ""content"": ""q""}]","[{""role"": ""assistant"", ""content"": ""a""}]","[{""role"": ""assistant"", ""content"": ""b""}]"'
    (tmp_path / "c.csv").write_text("prompt,chosen,rejected\n" + conv + "\n", encoding="utf-8")
    report = inspect_data(tmp_path / "c.csv")
    assert report.format == "conversational" and report.pairs[0].chosen == "a"


def test_bom_and_crlf_are_accepted(tmp_path):
    body = "\r\n".join(json.dumps(ROWS["standard"], ensure_ascii=False) for _ in range(3)) + "\r\n"
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\nq,a,b\r\n")
    assert len(load_pairs(tmp_path / "bom.jsonl")) == 3
    assert load_pairs(tmp_path / "bom.csv")[0].prompt[0]["content"] == "q"


def test_gbk_row_is_reported_by_line_and_the_rest_still_load(tmp_path):
    good = json.dumps(ROWS["standard"], ensure_ascii=False).encode("utf-8")
    bad = json.dumps(ROWS["standard"], ensure_ascii=False).encode("gbk")
    (tmp_path / "mixed.jsonl").write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    report = inspect_data(tmp_path / "mixed.jsonl")
    assert len(report.pairs) == 2
    (bad_row,) = report.invalid
    assert bad_row.row == 2 and "not UTF-8" in bad_row.reason and "gb18030" in bad_row.reason


def test_every_bad_row_is_reported_at_once_with_its_line(tmp_path):
    ok = ROWS["standard"]
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ok,                                                  # line 1
        {"prompt": "q", "chosen": "a"},                      # 2 missing rejected
        {"prompt": "q", "chosen": 5, "rejected": "b"},       # 3 wrong type
        {"prompt": "q", "chosen": "  ", "rejected": "b"},    # 4 empty response
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # 5 chosen == rejected
    ], raw_lines=['{"prompt": "q", "chosen": "a", ', "[1, 2]"])  # 6 broken JSON, 7 not an object
    report = inspect_data(path)
    reasons = {r.row: r.reason for r in report.invalid}
    assert len(report.pairs) == 1
    assert set(reasons) == {2, 3, 4, 5, 6, 7}
    assert "missing field 'rejected'" in reasons[2]
    assert "'chosen' must be a string" in reasons[3]
    assert "empty response" in reasons[4]
    assert "chosen == rejected" in reasons[5]
    assert "broken JSON" in reasons[6]
    assert "JSON object" in reasons[7]
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert len(err.value.invalid) == 6 and "row 6" in str(err.value)
    assert len(load_pairs(path, skip_invalid=True)) == 1


def test_role_order_problems(tmp_path):
    conv = ROWS["conversational"]
    rows = [
        {**conv, "prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {**conv, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {**conv, "prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]},
        {**conv, "prompt": [{"role": "wizard", "content": "a"}]},
    ]
    report = inspect_data(write_jsonl(tmp_path / "roles.jsonl", rows), format="conversational")
    assert [r.row for r in report.invalid] == [1, 2, 3, 4]
    assert all("role" in r.reason for r in report.invalid)
    implicit = {"chosen": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    (bad,) = inspect_data(write_jsonl(tmp_path / "implicit.jsonl", [implicit])).invalid
    assert "bad role order" in bad.reason


def test_implicit_rows_must_share_a_prefix(tmp_path):
    row = {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}
    (bad,) = inspect_data(write_jsonl(tmp_path / "i.jsonl", [row])).invalid
    assert "shared prefix" in bad.reason


def test_json_array_row_numbers_and_broken_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ROWS["standard"], {"prompt": "q"}]), encoding="utf-8")
    (bad,) = inspect_data(tmp_path / "a.json").invalid
    assert bad.row == 2
    (tmp_path / "broken.json").write_text('[{"prompt": "q",\n  "chosen": }]', encoding="utf-8")
    with pytest.raises(DataFileError, match="line 2"):
        inspect_data(tmp_path / "broken.json")


def test_explicit_format_overrides_detection_and_unknown_sources_fail_clearly(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [ROWS["standard"]])
    (bad,) = inspect_data(path, format="alpaca").invalid
    assert "missing field 'instruction'" in bad.reason
    with pytest.raises(DataFileError, match="no such file"):
        inspect_data(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataFileError, match="unsupported file type"):
        inspect_data(tmp_path / "x.txt")
    (tmp_path / "odd.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataFileError, match="cannot tell the data format"):
        inspect_data(tmp_path / "odd.jsonl")


def test_bundled_samples_are_large_varied_and_valid():
    zh = inspect_data("zh-sample")
    assert not zh.invalid and len(zh.pairs) >= 300
    topics = {p.meta["topic"] for p in zh.pairs}
    assert {"daily", "facts", "history_geo", "math", "coding", "writing", "translation", "safety", "multi_turn"} <= topics
    assert sum(len(p.prompt) > 1 for p in zh.pairs) >= 20  # multi-turn follow-ups
    assert len({p.prompt[-1]["content"] for p in zh.pairs}) == len(zh.pairs)  # no repeated prompts
    en = inspect_data("en-sample")
    assert not en.invalid and len(en.pairs) >= 50
    assert set(BUNDLED) == {"zh-sample", "en-sample"}


def test_split_is_seeded_disjoint_and_complete():
    pairs = arithmetic_pairs(40, seed=1)
    train, val = split_pairs(pairs, 0.1, seed=7)
    assert len(val) == 4 and len(train) == 36
    assert sorted(p.row for p in train + val) == list(range(1, 41))
    # the held-out rows are the first 4 prompts of the seeded order (every prompt is its own group here)
    order = list(range(40))
    random.Random(7).shuffle(order)
    assert [p.row for p in val] == sorted(i + 1 for i in order[:4])
    held = {seed: tuple(p.row for p in split_pairs(pairs, 0.1, seed=seed)[1]) for seed in range(6)}
    assert len(set(held.values())) == 6  # the seed picks the split
    assert len(split_pairs(pairs, 0.99, seed=7)[0]) == 1  # never every pair for validation
    train0, val0 = split_pairs(pairs, 0.0, seed=7)
    assert val0 == [] and sorted(p.row for p in train0) == list(range(1, 41))


def test_split_keeps_pairs_of_one_prompt_on_one_side_and_holds_out_enough():
    base = arithmetic_pairs(30, seed=2)
    pairs = []
    for i, p in enumerate(base):  # 30 prompts, each with 1 to 4 pairs (other rejected answers)
        for k in range(1 + i % 4):
            pairs.append(PreferencePair(prompt=p.prompt, chosen=p.chosen, rejected=f"{p.rejected} ({k})", row=len(pairs) + 1))
    assert len(pairs) == 73
    for seed in range(5):
        train, val = split_pairs(pairs, 0.1, seed=seed, min_val=32)
        assert len(train) + len(val) == 73
        assert {prompt_key(p) for p in train}.isdisjoint({prompt_key(p) for p in val})
        assert 32 <= len(val) <= 32 + 3  # min_val wins over 10%; a whole last group may add up to 3
    # a system turn makes another prompt
    a = PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b")
    b = PreferencePair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b", system="be brief")
    assert prompt_key(a) != prompt_key(b)
    # min_val never takes more than half the data
    assert len(split_pairs(base[:20], 0.1, seed=0, min_val=32)[1]) == 10


def test_synthetic_pairs_are_checkable():
    pairs = arithmetic_pairs(100, seed=0)
    assert len({p.prompt[0]["content"] for p in pairs}) == 100
    for p in pairs:
        right = p.meta["answer"]
        assert p.chosen.endswith(f"答案是 {right}。") and not p.rejected.endswith(f"答案是 {right}。")
        expr = p.chosen.split(" = ")[0].replace("×", "*")
        assert eval(expr) == right  # noqa: S307 - our own arithmetic strings
    assert arithmetic_pairs(5, seed=3)[0].prompt == arithmetic_pairs(5, seed=3)[0].prompt
