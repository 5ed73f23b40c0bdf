"""The shapes people download, end to end through the CLI: HH-RLHF (single and multi-turn), orca-style
`question` rows, a file with made-up column names and a mapping, ultrafeedback-shaped rows. Each passes
`orpo-local data check` with exit 0 and trains a few steps; the broken variants are reported row by row."""

import json

import pytest

from orpo_local.cli import main
from orpo_local.runs import read_json
from test_data_real import GERMAN, GERMAN_ROWS, HH_ROWS, NOVEL, ORCA_ROWS, SLEEP, UF_ROWS, assistant, ultrafeedback_row, user

pytest.importorskip("peft")

SHAPES = {  # name: (rows, --columns, format data check must detect)
    "hh-rlhf": (HH_ROWS, "", "hh-rlhf"),
    "orca": (ORCA_ROWS, "", "standard"),
    "mapped": (GERMAN_ROWS, ",".join(f"{k}={v}" for k, v in GERMAN.items()), "standard"),
    "ultrafeedback": (UF_ROWS, "", "ultrafeedback"),
}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_passes_data_check_and_trains(shape, tiny, tmp_path, capsys):
    rows, columns, fmt = SHAPES[shape]
    path = write(tmp_path / f"{shape}.jsonl", rows)
    mapping = ["--columns", columns] if columns else []
    assert main(["data", "check", path, "--model", str(tiny), *mapping]) == 0
    out = capsys.readouterr().out
    assert f"Format:  {fmt} (auto-detected)" in out and f"valid: {len(rows)}   invalid: 0" in out
    assert "template auto" in out and "<|im_start|>user\n" in out  # the preview goes through the template
    if columns:
        assert f"Columns: {columns}" in out
    code = main(["train", "--model", str(tiny), "--data", path, "--backend", "torch", "--max-steps", "2",
                 "--runs-dir", str(tmp_path / "runs"), *mapping, "--set", "optim.batch_size=2", "--set", "data.val_fraction=0"])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = read_json(run_dir / "run.json")
    assert info["status"] == "finished" and info["step"] == 2 and info["data"]["format"] == fmt
    assert info["data"]["train_pairs"] == len(rows)


def test_broken_variants_are_reported_row_by_row(tmp_path, capsys):
    hh = write(tmp_path / "hh.jsonl", HH_ROWS[:1] + [
        {"chosen": f"{NOVEL} A cold planet.", "rejected": NOVEL.replace("No. What is it about?", "Who wrote it?") + " Le Guin."},
        {"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi there"},
        {"chosen": f"{SLEEP} A routine.", "rejected": f"{SLEEP} Stay up."}])
    assert main(["data", "check", hh, "--no-tokenize"]) == 1
    out = capsys.readouterr().out
    assert "valid: 2   invalid: 2" in out
    assert "  row 2: chosen and rejected transcripts differ before their last Assistant turn" in out
    assert "  row 3: chosen transcript has no 'Assistant:' turn" in out
    uf = write(tmp_path / "uf.jsonl", UF_ROWS[:1] + [ultrafeedback_row(
        "Write a haiku about autumn leaves.", [user("Write a haiku about rain."), assistant("Rain.")],
        [user("Write a haiku about rain."), assistant("Drops.")])])
    assert main(["data", "check", uf, "--no-tokenize"]) == 1
    assert "  row 2: the conversations disagree with 'prompt'" in capsys.readouterr().out
    mapped = write(tmp_path / "de.jsonl", GERMAN_ROWS)
    assert main(["data", "check", mapped, "--no-tokenize", "--columns", "prompt=frag"]) == 2
    err = capsys.readouterr().err
    assert "maps prompt <- 'frag', but the source has no column 'frag'; its columns are: anweisung, frage, gut, id, schlecht" in err
