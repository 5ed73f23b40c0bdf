"""Issue "defaults that align": the mechanisms that tell a user whether a run aligned the model, on a
tiny random Llama: a prompt-disjoint validation split, best/ chosen by validation margin, the
end-of-run verdict, and its warning when the tuned model is not better than the base model.

The data make the outcome certain with λ = 0 (plain SFT): every training pair prefers one fixed
polite sentence over unique noise, which SFT learns within a few steps. Scored on pairs of the same
kind, the margin rises ("better"); scored on validation pairs whose answers are swapped, SFT makes
the rejected answers more likely and the margin falls ("not better": the warning)."""

import json
import random

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.data import PreferencePair, inspect_data, prompt_key, split_pairs  # noqa: E402
from orpo_local.events import Verdict  # noqa: E402
from orpo_local.runs import read_json, read_metrics, resolve_checkpoint  # noqa: E402
from orpo_local.verdict import margin  # noqa: E402

POLITE = "好的！这个问题的答案如下，谢谢你的提问。"
SEED, VAL_FRACTION = 5, 0.25


def style_pairs(n: int, repeats: int = 1) -> list[PreferencePair]:
    """n prompts (each `repeats` times, with other noise) preferring POLITE over unique noise."""
    rng = random.Random(0)
    noise = lambda: "".join(rng.choice("qzxjv#%&@!7392") for _ in range(len(POLITE)))  # noqa: E731
    return [PreferencePair(prompt=[{"role": "user", "content": f"第 {i} 个问题是什么？"}], chosen=POLITE, rejected=noise())
            for i in range(n) for _ in range(repeats)]


def write(path, pairs, swap_validation: bool):
    """The pairs as .jsonl; with swap_validation, the pairs that the run will hold out prefer the noise."""
    _, val = split_pairs(pairs, VAL_FRACTION, SEED, 0)
    held = {id(p) for p in val}
    rows = []
    for p in pairs:
        chosen, rejected = (p.rejected, p.chosen) if swap_validation and id(p) in held else (p.chosen, p.rejected)
        rows.append({"prompt": p.prompt[0]["content"], "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_config(tiny, data, runs, **over):
    return TrainConfig().with_overrides({
        "model.name": str(tiny), "model.backend": "torch", "data.path": str(data), "run.runs_dir": str(runs),
        "data.val_fraction": VAL_FRACTION, "data.val_min_pairs": 0, "orpo.lambda_": 0.0, "optim.learning_rate": 2e-2,
        "optim.max_steps": 8, "optim.warmup_steps": 0, "optim.batch_size": 4, "run.seed": SEED, "run.eval_every": 2,
        "run.save_every": 2, **over})


def test_the_validation_split_is_prompt_disjoint_and_large_enough_by_default(tiny, tmp_path):
    data = write(tmp_path / "repeated.jsonl", style_pairs(60, repeats=3), swap_validation=False)
    run = train(sft_config(tiny, data, tmp_path / "runs", **{"data.val_fraction": 0.1, "data.val_min_pairs": 32,
                                                                   "optim.max_steps": 1}), progress=False)
    info = read_json(run.run_dir / "run.json")["data"]
    assert info["val_pairs"] in (33, 34, 35) and info["train_pairs"] == 180 - info["val_pairs"]  # 32 or more, whole prompts
    pairs = inspect_data(data).pairs
    val_rows = set(info["val_rows"])
    val_prompts = {prompt_key(p) for p in pairs if p.row in val_rows}
    train_prompts = {prompt_key(p) for p in pairs if p.row not in val_rows}
    assert len(val_prompts) == info["val_pairs"] // 3 and val_prompts.isdisjoint(train_prompts)
    defaults = TrainConfig().data
    assert (defaults.val_fraction, defaults.val_min_pairs) == (0.1, 32)


def test_best_is_the_checkpoint_with_the_best_validation_margin(tiny, tmp_path):
    from safetensors.numpy import load_file

    data = write(tmp_path / "style.jsonl", style_pairs(40), swap_validation=False)
    events = []
    run = train(sft_config(tiny, data, tmp_path / "runs"), progress=False, on_event=events.append)
    evals = read_metrics(run.run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    ranked = max((e for e in evals if e["step"] > 0), key=lambda e: (margin(e), e["rewards/accuracies"]))
    best = read_json(run.run_dir / "best" / "best.json")
    assert best["step"] == ranked["step"] and best["margin"] == pytest.approx(margin(ranked), abs=1e-9)
    assert read_json(run.run_dir / "run.json")["best"]["step"] == ranked["step"]
    # best/ holds that step's weights: the same tensors as the checkpoint of that step
    ours = load_file(str(run.run_dir / "best" / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(run.run_dir / "checkpoints" / f"step-{ranked['step']}" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert resolve_checkpoint(run.run_dir, "best") == run.run_dir / "best"
    assert resolve_checkpoint(run.run_dir, "4") == run.run_dir / "checkpoints" / "step-4"
    with pytest.raises(FileNotFoundError, match="have: best, step-2"):
        resolve_checkpoint(run.run_dir, "step-7")


def test_the_verdict_says_better_when_the_margin_rises(tiny, tmp_path):
    data = write(tmp_path / "style.jsonl", style_pairs(40), swap_validation=False)
    events = []
    run = train(sft_config(tiny, data, tmp_path / "runs"), progress=False, on_event=events.append)
    (verdict,) = [e for e in events if isinstance(e, Verdict)]
    evals = {e["step"]: e for e in read_metrics(run.run_dir, "eval")}
    base, last = evals[0], evals[8]
    assert margin(last) > margin(base) + 0.5 and last["rewards/accuracies"] == pytest.approx(1.0)  # SFT learned the sentence
    assert verdict.better and verdict.text.startswith(
        f"validation preference accuracy {base['rewards/accuracies']:.2f} → 1.00, margin {margin(base):+.3f} → {margin(last):+.3f}")
    assert f"(best at step {verdict.best['step']}" in verdict.text
    assert read_json(run.run_dir / "run.json")["verdict"]["better"] is True


def test_the_verdict_warns_when_the_tuned_model_is_not_better(tiny, tmp_path, capsys):
    from orpo_local.events import TerminalReporter

    data = write(tmp_path / "swapped.jsonl", style_pairs(40), swap_validation=True)
    events = []
    run = train(sft_config(tiny, data, tmp_path / "runs"), progress=False, on_event=events.append)
    (verdict,) = [e for e in events if isinstance(e, Verdict)]
    evals = {e["step"]: e for e in read_metrics(run.run_dir, "eval")}
    assert margin(evals[8]) < margin(evals[0]) - 0.5 and evals[8]["rewards/accuracies"] == pytest.approx(0.0, abs=1e-6)
    assert not verdict.better
    assert verdict.text.startswith("the tuned model is not better than the base model on the validation pairs")
    assert "raise λ (orpo.lambda_, now 0; 0 is plain SFT)" in verdict.text and "optim.epochs" in verdict.text
    TerminalReporter()(verdict)
    assert "warning: ⚠️ the tuned model is not better" in capsys.readouterr().err
    assert read_json(run.run_dir / "run.json")["verdict"]["better"] is False
