"""Numerical faults and out of memory, end to end in the CLI and in the UI's runner (docs/reliability.md, item 4).

NaN/inf is injected into the loss (the backend reports it) and into the gradients (a hook on a
LoRA weight, so the real clip and skip run); out of memory is the exception torch raises on a
GPU, and the host's MemoryError. Each must end the run cleanly: the step, the last good
checkpoint and what to do, in the terminal, in the page's status and in run.json.
"""

import pytest
from conftest import need

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.backends.torch_backend import TorchBackend  # noqa: E402
from orpo_local.cli import main  # noqa: E402
from orpo_local.runs import latest_checkpoint, read_json  # noqa: E402
from orpo_local.train import TrainingError  # noqa: E402

OOM_ADVICE = ("out of memory at step 3", "lower the batch size", "max length", "4-bit", "gradient checkpointing",
              "start a new run", "checkpoints/step-2")


def config(tiny, arith, runs, **over) -> TrainConfig:
    base = {"model.name": str(tiny), "model.backend": "torch", "data.path": str(arith), "run.runs_dir": str(runs),
            "optim.max_steps": 4, "optim.batch_size": 2, "data.max_length": 128, "data.max_prompt_length": 64,
            "run.save_every": 2, "run.eval_every": 0, "data.val_fraction": 0.0, "run.seed": 1}
    return TrainConfig().with_overrides({**base, **over})


class NanLoss(TorchBackend):
    """Step 3's loss is NaN, as an overflow makes it: the update is skipped."""

    calls = 0

    def train_step(self, micro, lr, orpo, max_grad_norm):
        self.calls += 1
        if self.calls == 3:
            return {**self.evaluate(micro, orpo), "loss": float("nan"), "grad_norm": float("nan"), "tokens": 1.0}
        return super().train_step(micro, lr, orpo, max_grad_norm)


class InfGrad(TorchBackend):
    """Step 3's gradients hold inf (a hook on one LoRA weight); the loss stays finite."""

    calls = 0

    def train_step(self, micro, lr, orpo, max_grad_norm):
        self.calls += 1
        hook = None
        if self.calls == 3:
            weight = next(p for n, p in self.model.named_parameters() if "lora_B" in n)
            hook = weight.register_hook(lambda g: g + float("inf"))
        try:
            return super().train_step(micro, lr, orpo, max_grad_norm)
        finally:
            if hook is not None:
                hook.remove()


class OutOfMemory(TorchBackend):
    """Step 3 runs out of memory: on a GPU (torch's own exception and text) or on the host."""

    calls = 0
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)")

    def train_step(self, micro, lr, orpo, max_grad_norm):
        self.calls += 1
        if self.calls == 3:
            raise self.error
        return super().train_step(micro, lr, orpo, max_grad_norm)


class HostOutOfMemory(OutOfMemory):
    error = MemoryError()


def wait_for(runner, timeout=120):
    runner.wait(timeout)
    assert not runner.busy, "the job did not end"
    return runner.snapshot()


@pytest.mark.parametrize("backend", [NanLoss, InfGrad], ids=["nan-loss", "inf-grad"])
def test_non_finite_values_stop_the_run_with_step_checkpoint_and_advice_in_the_ui(tiny, arith, tmp_path, backend):
    need("gradio", "the UI's runner needs gradio: pip install -e '.[ui]'")
    from orpo_local.ui.engine import Engine
    from orpo_local.ui.tab_train import status_text

    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en")
    assert engine.runner.start(config(tiny, arith, tmp_path / "runs"), backend=backend())
    snap = wait_for(engine.runner)
    shown = status_text(engine, snap)
    assert snap["status"] == "failed" and shown.startswith("❌")
    assert "at step 3" in shown and "the update was skipped" in shown and "Lower the learning rate" in shown
    assert "checkpoints/step-2" in shown and str(tmp_path) not in shown  # shown relative to the app's folder
    assert ("nan/nan" if backend is NanLoss else "/inf") in shown
    run_dir = tmp_path / "runs" / snap["run_dir"].rsplit("/", 1)[-1]
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and "at step 3" in info["error"] and latest_checkpoint(run_dir).name == "step-2"
    assert not (run_dir / "adapter").exists()  # the final adapter is never the poisoned one
    assert engine.runner.start(config(tiny, arith, tmp_path / "runs", **{"optim.max_steps": 1}))  # the server goes on
    assert wait_for(engine.runner)["status"] == "finished"


def test_non_finite_loss_in_the_cli(tiny, arith, tmp_path, capsys, monkeypatch):
    import orpo_local.backends as backends

    monkeypatch.setattr(backends, "get_backend", lambda name: NanLoss())
    config(tiny, arith, tmp_path / "runs").to_yaml(tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "failed at step 2: loss or gradient became nan/nan at step 3" in err and "Lower the learning rate" in err


@pytest.mark.parametrize("backend", [OutOfMemory, HostOutOfMemory], ids=["gpu", "host"])
def test_out_of_memory_ends_the_run_with_advice_and_the_run_folder_says_so(tiny, arith, tmp_path, backend):
    with pytest.raises(TrainingError) as error:
        train(config(tiny, arith, tmp_path / "runs"), backend=backend(), progress=False)
    message = str(error.value)
    for words in OOM_ADVICE:
        assert words in message, (words, message)
    assert ("OutOfMemoryError: CUDA out of memory" if backend is OutOfMemory else "MemoryError") in message
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and info["error"] == message and latest_checkpoint(run_dir).name == "step-2"


def test_out_of_memory_while_loading_is_recorded_too(tiny, arith, tmp_path):
    class NoRoom(TorchBackend):
        def load(self, *a, **k):
            raise MemoryError()

    with pytest.raises(TrainingError, match="out of memory at step 1 .*lower the batch size.*no checkpoint was written yet"):
        train(config(tiny, arith, tmp_path / "runs"), backend=NoRoom(), progress=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_json(run_dir / "run.json")["status"] == "failed"


def test_out_of_memory_in_the_cli_and_the_ui_says_the_advice_once(tiny, arith, tmp_path, capsys, monkeypatch):
    need("gradio", "the UI's runner needs gradio: pip install -e '.[ui]'")
    import orpo_local.backends as backends
    from orpo_local.ui.engine import Engine

    monkeypatch.setattr(backends, "get_backend", lambda name: OutOfMemory())
    config(tiny, arith, tmp_path / "cli").to_yaml(tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "error: out of memory at step 3" in err and "lower the batch size" in err
    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en")
    assert engine.runner.start(config(tiny, arith, tmp_path / "runs"), backend=OutOfMemory())
    snap = wait_for(engine.runner)
    assert snap["status"] == "failed" and snap["error"].count("lower the batch size") == 1
    assert all(words in snap["error"] for words in OOM_ADVICE[1:5])
