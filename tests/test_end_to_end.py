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
