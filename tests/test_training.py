"""The training loop on the torch backend with a tiny random Llama: run folder, exact resume,
half-written checkpoints ignored, cooperative stop, crash resume, NaN handling, standard PEFT adapters,
epoch counting with accumulation, data hashes on resume (4-bit: test_qlora.py, chat: test_chat.py)."""

import json
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.backend import window_sizes  # noqa: E402
from orpo_local.backends.torch_backend import TorchBackend  # noqa: E402
from orpo_local.config import ModelConfig  # noqa: E402
from orpo_local.events import Failed, Step  # noqa: E402
from orpo_local.runs import checkpoints, latest_checkpoint, list_runs, read_json, read_metrics  # noqa: E402
from orpo_local.train import TrainingError  # noqa: E402


def config(tiny, arith, runs, **over):
    base = {"model.name": str(tiny), "model.backend": "torch", "data.path": str(arith), "run.runs_dir": str(runs),
            "optim.max_steps": 6, "optim.batch_size": 4, "optim.learning_rate": 1e-3, "optim.warmup_steps": 2,
            "lora.dropout": 0.1, "run.save_every": 3, "run.eval_every": 3, "run.seed": 3, "data.val_fraction": 0.1,
            "data.val_min_pairs": 0}
    return TrainConfig().with_overrides({**base, **over})


def chosen_sequence(batch, i):
    """Pair i's prompt + chosen tokens, in either batch layout."""
    if "segment" in batch:
        return tuple(batch["input_ids"][i][(batch["segment"][i] == 1) | (batch["segment"][i] == 2)].tolist())
    return tuple(batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist())


def steps_of(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir, "train")}


def test_run_folder_is_complete_and_self_describing(tiny, arith, tmp_path):
    run = train(config(tiny, arith, tmp_path), progress=False)
    d = run.run_dir
    assert run.status == "finished" and run.step == 6
    info = read_json(d / "run.json")
    assert info["status"] == "finished" and info["backend"] == "torch" and info["step"] == 6 and info["total_steps"] == 6
    assert info["base_model"] == str(tiny) and len(info["chat_template_sha256"]) == 16 and info["data"]["val_pairs"] == 4
    assert TrainConfig.from_yaml(d / "config.yaml") == config(tiny, arith, tmp_path)
    assert [s for s, _ in checkpoints(d)] == [3, 6]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoints/step-3/optimizer.pt",
                 "checkpoints/step-3/adapter/adapter_model.safetensors", "checkpoints/step-3/trainer_state.json"):
        assert (d / name).exists(), name
    rows = steps_of(d)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    spec = ["loss", "nll_loss", "or_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected",
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate",
            "pairs_per_s", "tokens_per_s", "peak_mem_mb"]
    assert all(k in rows[1] and np.isfinite(rows[1][k]) for k in spec)
    assert rows[1]["learning_rate"] == pytest.approx(5e-4) and rows[2]["learning_rate"] == pytest.approx(1e-3)
    assert [r["step"] for r in read_metrics(d, "eval")] == [0, 3, 6]
    assert list_runs(tmp_path)[0]["status"] == "finished"


def test_adapter_is_a_standard_peft_folder(tiny, arith, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train(config(tiny, arith, tmp_path, **{"optim.max_steps": 2}), progress=False)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(run.run_dir / "adapter"))
    ours = TorchBackend()
    ours.load(ModelConfig(name=str(tiny), dtype="float32"), None, 0, adapter=run.run_dir / "adapter", trainable=False)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours.model(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(tiny)(ids).logits
    assert not torch.allclose(base, plain(ids).logits)  # the adapter changed the model


@pytest.mark.parametrize("accum", [1, 2])
def test_stop_then_resume_matches_an_uninterrupted_run(tiny, arith, tmp_path, accum):
    over = {"optim.grad_accumulation": accum, "optim.batch_size": 2 if accum == 2 else 4}
    full = train(config(tiny, arith, tmp_path / "a", **over), progress=False)
    stop = threading.Event()
    halted = train(config(tiny, arith, tmp_path / "b", **over), progress=False, stop=stop,
                   on_event=lambda e: stop.set() if isinstance(e, Step) and e.step == 3 else None)
    assert halted.status == "stopped" and halted.step == 3
    assert read_json(halted.run_dir / "run.json")["status"] == "stopped"
    # a crash mid-write leaves a temp folder and a step folder without its state file: both ignored
    (halted.run_dir / "checkpoints" / ".tmp-step-5" / "adapter").mkdir(parents=True)
    (halted.run_dir / "checkpoints" / "step-5" / "adapter").mkdir(parents=True)
    assert latest_checkpoint(halted.run_dir).name == "step-3"

    resumed = train(resume=halted.run_dir, progress=False)
    assert resumed.status == "finished" and resumed.step == 6
    a, b = steps_of(full.run_dir), steps_of(resumed.run_dir)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "nll_loss", "or_loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)


def test_resume_refuses_changes_to_data_or_order_and_needs_a_checkpoint(tiny, arith, tmp_path):
    from orpo_local.train import TrainingError

    cfg = config(tiny, arith, tmp_path, **{"optim.max_steps": 2, "run.save_every": 0})
    run = train(cfg, progress=False)
    before = (run.run_dir / "config.yaml").read_text()
    with pytest.raises(TrainingError, match="cannot change data.max_length, run.seed"):
        train(cfg.with_overrides({"data.max_length": 400, "run.seed": 9}), resume=run.run_dir, progress=False)
    assert (run.run_dir / "config.yaml").read_text() == before and read_json(run.run_dir / "run.json")["status"] == "finished"
    longer = train(cfg.with_overrides({"optim.max_steps": 4}), resume=run.run_dir, progress=False)
    assert longer.step == 4 and sorted(steps_of(run.run_dir)) == [1, 2, 3, 4]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cfg.to_yaml(empty / "config.yaml")
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        train(resume=empty, progress=False)
    assert not (empty / "run.json").exists()


def test_bad_data_fails_before_the_model_loads(tiny, tmp_path):
    from orpo_local.data import DataFileError

    class NoLoad(TorchBackend):
        def load(self, *a, **k):
            raise AssertionError("the model should not be loaded for unreadable data")

    with pytest.raises(DataFileError, match="no such file"):
        train(TrainConfig().with_overrides({"model.name": str(tiny), "data.path": str(tmp_path / "typo.jsonl"),
                                            "run.runs_dir": str(tmp_path)}), backend=NoLoad(), progress=False)


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_weights(tiny, arith, tmp_path):
    class PoisonAtStep3(TorchBackend):
        calls = 0

        def train_step(self, micro, lr, orpo, max_grad_norm):
            self.calls += 1
            if self.calls == 3:  # what a real overflow looks like: the update is skipped, the loss is nan
                return {**super().evaluate(micro, orpo), "loss": float("nan"), "grad_norm": float("nan"), "tokens": 1.0}
            return super().train_step(micro, lr, orpo, max_grad_norm)

    events = []
    run = train(config(tiny, arith, tmp_path, **{"run.save_every": 0}), backend=PoisonAtStep3(), progress=False, on_event=events.append)
    assert run.status == "failed" and run.step == 2
    (failed,) = [e for e in events if isinstance(e, Failed)]
    assert "step 3" in failed.error and "learning rate" in failed.error
    info = read_json(run.run_dir / "run.json")
    assert info["status"] == "failed" and "learning rate" in info["error"]
    assert latest_checkpoint(run.run_dir).name == "step-2" and not (run.run_dir / "adapter").exists()


def test_backend_skips_the_update_when_the_loss_is_not_finite(tiny, arith):
    from orpo_local.batching import collate
    from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig
    from orpo_local.tokenization import TokenizedPair

    backend = TorchBackend()
    backend.load(ModelConfig(name=str(tiny)), LoraConfig(), 0)
    backend.init_optimizer(OptimConfig())
    lora_b = next(p for n, p in backend.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in backend.model.named_parameters() if p.requires_grad}
    batch = collate([TokenizedPair([1, 2, 3], [4, 5], [6, 7])], pad_id=0)
    metrics = backend.train_step([batch], 1e-3, OrpoConfig(), 1.0)
    assert not np.isfinite(metrics["loss"])
    for n, p in backend.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n], equal_nan=True)


def test_a_dataset_without_valid_pairs_fails_before_a_run_folder_exists(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n', encoding="utf-8")
    with pytest.raises(TrainingError, match=r"no valid preference pairs in 2 rows \(first: .*row 1: missing field 'rejected'\)"):
        train(config(tiny, bad, tmp_path / "runs"), progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_crash_between_checkpoints_resumes_with_every_step_logged_once(tiny, arith, tmp_path):
    """A crash (here: an error raised at step 5) leaves metrics rows past the last checkpoint (3);
    the resume must drop them and log 4, 5, 6 again, once each and in order."""
    cfg = config(tiny, arith, tmp_path, **{"run.eval_every": 0})
    full = train(cfg.with_overrides({"run.runs_dir": str(tmp_path / "full")}), progress=False)

    def crash(event):
        if isinstance(event, Step) and event.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False, on_event=crash)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "full"]
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3, 4, 5]  # rows past checkpoint 3
    assert read_json(run_dir / "run.json")["status"] == "failed" and latest_checkpoint(run_dir).name == "step-3"
    train(resume=run_dir, progress=False)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    a, b = steps_of(full.run_dir), steps_of(run_dir)
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step


def test_one_epoch_with_accumulation_sees_every_pair_exactly_once(tiny, arith, tmp_path):
    seen = []

    class Spy(TorchBackend):
        def train_step(self, micro, lr, orpo, max_grad_norm):
            seen.append([chosen_sequence(b, i) for b in micro for i in range(window_sizes([b], False)[1])])
            return super().train_step(micro, lr, orpo, max_grad_norm)

    small = tmp_path / "ten.jsonl"
    small.write_text("".join(arith.read_text(encoding="utf-8").splitlines(keepends=True)[:10]), encoding="utf-8")
    cfg = config(tiny, small, tmp_path, **{"optim.max_steps": -1, "optim.epochs": 1.0, "optim.batch_size": 2,
                                           "optim.grad_accumulation": 2, "data.val_fraction": 0.0, "run.save_every": 0})
    run = train(cfg, backend=Spy(), progress=False)
    assert run.step == 3 and [len(s) for s in seen] == [4, 4, 2]  # 5 micro-batches of 2 pairs: windows of 2, 2, 1
    chosen = [row for step in seen for row in step]
    assert len(chosen) == 10 and len(set(chosen)) == 10  # each of the 10 pairs once, none twice
    assert read_metrics(run.run_dir, "train")[-1]["epoch"] == pytest.approx(1.0)


def test_resume_refuses_changed_data_unless_accepted(tiny, arith, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(arith.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = config(tiny, data, tmp_path / "runs", **{"optim.max_steps": 2, "run.save_every": 1, "run.eval_every": 0})
    stop = threading.Event()
    run = train(cfg, progress=False, stop=stop, on_event=lambda e: stop.set() if isinstance(e, Step) else None)
    assert run.status == "stopped" and run.step == 1
    recorded = read_json(run.run_dir / "run.json")["data_sha256"]
    assert list(recorded) == ["data.jsonl"] and len(recorded["data.jsonl"]) == 64
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")  # the same pairs in another order
    with pytest.raises(TrainingError, match=r"data changed since this run started \(data.jsonl\).*--accept-data-change"):
        train(resume=run.run_dir, progress=False)
    assert read_json(run.run_dir / "run.json")["status"] == "stopped"
    messages = []
    resumed = train(resume=run.run_dir, progress=False, accept_data_change=True, on_event=messages.append)
    assert resumed.step == 2 and any("data changed" in getattr(m, "text", "") for m in messages)
    assert read_json(run.run_dir / "run.json")["data_sha256"] != recorded  # the new data is what it trained on now
