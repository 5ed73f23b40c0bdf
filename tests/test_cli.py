"""`orpo-local data check` / `data synth`: output, row numbers and exit codes 0 / 1 / 2."""

import json

import pytest

from orpo_local.cli import EXIT_INVALID_ROWS, EXIT_OK, EXIT_UNREADABLE, build_parser, main
from orpo_local.config import field_info


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_valid_file_exits_0(tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"instruction": "问", "input": "", "chosen": "好", "rejected": "坏"}, ensure_ascii=False) + "\n", encoding="utf-8")
    code, out = run(capsys, "data", "check", str(path), "--no-tokenize")
    assert code == EXIT_OK and "alpaca (auto-detected)" in out and "valid: 1   invalid: 0" in out


def test_invalid_rows_exit_1_and_are_all_listed(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    rows = ['{"prompt": "q", "chosen": "a", "rejected": "b"}', '{"prompt": "q", "chosen": "a"}', "not json",
            '{"prompt": "q", "chosen": "a", "rejected": "a"}']
    path.write_text("\n".join(rows) + "\n")
    code, out = run(capsys, "data", "check", str(path), "--no-tokenize")
    assert code == EXIT_INVALID_ROWS
    assert "valid: 1   invalid: 3" in out
    assert "row 2: missing field 'rejected'" in out and "row 3: broken JSON" in out and "row 4: chosen == rejected" in out


def test_unreadable_source_exits_2(tmp_path, capsys):
    code, out = run(capsys, "data", "check", str(tmp_path / "nope.jsonl"))
    assert code == EXIT_UNREADABLE and "no such file" in out
    (tmp_path / "broken.json").write_text("[{")
    assert run(capsys, "data", "check", str(tmp_path / "broken.json"))[0] == EXIT_UNREADABLE


def test_check_renders_examples_and_counts_truncation_with_the_bundled_tokenizer(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    # the bundled template adds a ~34-token default system prompt; row 1 fits in 64 tokens, rows 2-3 do not
    rows = [{"prompt": "你好" * i, "chosen": "好" * (3 if i == 1 else 40 * i), "rejected": "坏" * (4 if i == 1 else 40 * i)}
            for i in (1, 2, 8)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    code, out = run(capsys, "data", "check", str(path), "--max-length", "64", "--max-prompt-length", "48", "--examples", "1")
    assert code == EXIT_OK
    assert "kept: 3   truncated: 2   dropped: 0" in out
    assert "<|im_start|>assistant\n⟦── chosen" in out  # the prompt/response boundary is visible
    assert "<|im_end|>" in out


def test_cli_defaults_and_help_come_from_the_config(capsys):
    args = build_parser().parse_args(["data", "check", "x.jsonl"])
    assert args.max_length == field_info("data", "max_length").default
    assert args.name == field_info("model", "name").default
    with pytest.raises(SystemExit):
        main(["data", "check", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for section, name in (("data", "max_length"), ("data", "format"), ("model", "name")):
        assert " ".join(field_info(section, name).metadata["help"].split()) in help_text


def test_synth_writes_loadable_checkable_pairs(tmp_path, capsys):
    out = tmp_path / "arith.jsonl"
    assert run(capsys, "data", "synth", str(out), "--n", "30", "--seed", "4")[0] == EXIT_OK
    code, text = run(capsys, "data", "check", str(out), "--no-tokenize")
    assert code == EXIT_OK and "valid: 30" in text and "conversational" in text
