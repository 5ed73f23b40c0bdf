"""End to end on the real bundled model and the bundled Chinese sample, through the CLI (slow: minutes)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local.backends.torch_backend import TorchBackend  # noqa: E402
from orpo_local.batching import bucket, epoch_order  # noqa: E402
from orpo_local.cli import main  # noqa: E402
from orpo_local.config import TrainConfig  # noqa: E402
from orpo_local.runs import read_json, read_metrics  # noqa: E402
from orpo_local.scoring import score_pairs  # noqa: E402
from orpo_local.tokenization import ChatEncoder  # noqa: E402
from orpo_local.train import prepare_data  # noqa: E402

STEPS = 30


@pytest.mark.slow
def test_cli_train_30_steps_moves_preferences_on_the_trained_pairs_and_chat_answers(tmp_path, capsys):
    assert main(["train", "--max-steps", str(STEPS), "--runs-dir", str(tmp_path), "--set", "run.save_every=10"]) == 0
    (run_dir,) = tmp_path.iterdir()
    info = read_json(run_dir / "run.json")
    assert info["status"] == "finished" and info["step"] == STEPS and info["base_model"] == "smollm2-135m-instruct"
    assert len(read_metrics(run_dir, "train")) == STEPS and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-10", "step-20", "step-30"]
    assert "step 30/30" in capsys.readouterr().err  # the progress bar ran

    # Score exactly the pairs the run trained on, with the base model and with the tuned one.
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    base = TorchBackend()
    base.load(cfg.model, None, 0, trainable=False)
    enc = ChatEncoder(base.tokenizer)
    train_pairs, _, _ = prepare_data(cfg, enc)
    batches = bucket(train_pairs, cfg.optim.batch_size)
    seen = [train_pairs[i] for b in epoch_order(len(batches), cfg.run.seed, 0)[:STEPS] for i in batches[b]]
    before = score_pairs(base, seen, enc.pad_id)
    del base
    tuned = TorchBackend()
    tuned.load(cfg.model, None, 0, adapter=run_dir / "adapter", trainable=False)
    after = score_pairs(tuned, seen, enc.pad_id)
    with capsys.disabled():
        print(f"\ntrained pairs ({len(seen)}): accuracy {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}, "
              f"margin {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}, nll {before['nll_loss']:.3f} -> {after['nll_loss']:.3f}")
    assert after["rewards/accuracies"] > before["rewards/accuracies"]
    assert after["rewards/margins"] > before["rewards/margins"]
    assert after["nll_loss"] < before["nll_loss"]
    del tuned

    assert main(["chat", str(run_dir), "--prompt", "中国的首都是哪里？", "--temperature", "0", "--max-tokens", "40"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def cli(*args, timeout=900):
    """Run `orpo-local` as its own process: on Linux it preloads OpenBLAS for MLX by itself."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "orpo_local.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_mlx_trains_the_bundled_model_raises_preference_on_trained_pairs_and_chats(tmp_path):
    pytest.importorskip("mlx_lm")
    import platform

    from conftest import need
    from orpo_local.openblas import find_openblas

    need(platform.system() != "Linux" or bool(find_openblas()),
         "MLX on Linux without OpenBLAS runs at ~5 GFLOP/s: install libopenblas0-pthread (make test does when it can)")
    # 16 training pairs, 4 batches of 4: 8 steps are two epochs, so every trained pair is seen twice
    done = cli("train", "--backend", "mlx", "--max-steps", "8", "--runs-dir", str(tmp_path / "runs"),
               "--set", "data.max_pairs=17", "--set", "data.val_min_pairs=0", "--set", "data.val_fraction=0.05",
               "--set", "run.eval_every=0", "--set", "run.save_every=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 8/8" in done.stderr and "on mlx (cpu, float32" in done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = read_json(run_dir / "run.json")
    assert info["backend"] == "mlx" and info["status"] == "finished" and info["data"]["train_pairs"] == 16
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {"adapters.safetensors", "adapter_config.json"}

    scored = cli("eval", str(run_dir), "--split", "train", "--out", str(tmp_path / "eval.json"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    import json

    result = json.loads((tmp_path / "eval.json").read_text())
    base, tuned = result["base"], result["tuned"]
    print(f"\nMLX trained pairs ({base['pairs']}): accuracy {base['accuracy']:.3f} -> {tuned['accuracy']:.3f}, "
          f"margin {base['margin']:+.4f} -> {tuned['margin']:+.4f}, NLL {base['NLL chosen']:.3f} -> {tuned['NLL chosen']:.3f}")
    assert tuned["accuracy"] > base["accuracy"] and tuned["margin"] > base["margin"] and tuned["NLL chosen"] < base["NLL chosen"]

    answer = cli("chat", str(run_dir), "--prompt", "中国的首都是哪里？", "--temperature", "0", "--max-tokens", "30")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]
