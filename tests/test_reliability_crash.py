"""Crash safety, disk full and unwritable folders (docs/reliability.md, items 2 and 3).

A real `orpo-local train` process on the tiny model is SIGKILLed at one point after another
(tests/kill_at.py patches the point in that process only) and resumed each time: the run must
continue from its last complete checkpoint, be listed as "interrupted, resumable" while it lies
dead, and end with metrics equal, step for step, to an uninterrupted run. A full disk is a save
that raises ENOSPC half-way (a patched writer, and a real small tmpfs where this machine can mount one).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import need

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.backends.torch_backend import TorchBackend  # noqa: E402
from orpo_local.cli import main  # noqa: E402
from orpo_local.events import Step  # noqa: E402
from orpo_local.runs import (checkpoints, is_active, latest_checkpoint, list_runs, lock_run, read_json, read_metrics,  # noqa: E402
                             update_run)
from orpo_local.train import TrainingError  # noqa: E402

REPO = Path(__file__).parent.parent
KILL_AT = Path(__file__).parent / "kill_at.py"
COMPARED = ("loss", "nll_loss", "or_loss", "rewards/margins", "rewards/accuracies", "grad_norm", "learning_rate")


def config(tiny, arith, runs, **over) -> TrainConfig:
    base = {"model.name": str(tiny), "model.backend": "torch", "data.path": str(arith), "run.runs_dir": str(runs),
            "optim.max_steps": 8, "optim.batch_size": 2, "optim.learning_rate": 1e-3, "optim.warmup_steps": 2,
            "data.max_length": 128, "data.max_prompt_length": 64, "lora.dropout": 0.1, "run.save_every": 2,
            "run.eval_every": 4, "run.seed": 3, "data.val_fraction": 0.1, "data.val_min_pairs": 0}
    return TrainConfig().with_overrides({**base, **over})


def cli_train(point: str | None, n: int, *argv: str) -> subprocess.CompletedProcess:
    """`orpo-local train ARGV` in its own process, killed at `point` (None: left to finish)."""
    command = [sys.executable, str(KILL_AT), point, str(n), "train", *argv] if point else \
        [sys.executable, "-m", "orpo_local.cli", "train", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def listed(runs: Path, capsys) -> tuple[dict, str]:
    (run,) = list_runs(runs)
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    return run, capsys.readouterr().out


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir, "train")]


@pytest.mark.slow
def test_sigkill_at_every_point_then_resume_equals_an_uninterrupted_run(tiny, arith, tmp_path, capsys):
    """Killed mid-step 3, then while loading the model, between the files of checkpoint 4, while appending
    step 5's metrics, and while writing the final adapter; resumed after each. ~70 s on 2 cores."""
    need("gradio", "the UI's views of the run need gradio: pip install -e '.[ui]'")
    from orpo_local.ui import tab_runs, tab_train
    from orpo_local.ui.engine import Engine

    runs = tmp_path / "runs"
    engine = Engine(runs_dir=runs, data_dir=tmp_path / "uploads", lang="en")
    cfg = config(tiny, arith, runs, **{"run.name": "victim"})
    cfg.to_yaml(tmp_path / "config.yaml")
    run_dir = runs / "victim"
    resume = ("--resume", str(run_dir))
    survived = []

    def killed(point: str, n: int, *argv: str, checkpoint: int) -> dict:
        out = cli_train(point, n, *argv)
        assert out.returncode == -signal.SIGKILL, f"{point}: rc {out.returncode}\n{out.stderr[-3000:]}"
        assert latest_checkpoint(run_dir).name == f"step-{checkpoint}", point
        info = read_json(run_dir / "run.json")  # parseable, never half written
        assert info["status"] == "running"  # what the dead process last wrote ...
        run, table = listed(runs, capsys)  # ... and what the listing makes of it
        assert run["status"] == "interrupted" and run["resumable"] and not is_active(run_dir), point
        assert "victim" in table and "interrupted, resumable" in table and " running " not in table, table
        assert tab_train.resumable_runs(engine) == [("victim (interrupted, resumable)", str(run_dir))]  # the UI's pick
        assert list(tab_runs.runs_table(engine).iloc[0][:2]) == ["victim", "interrupted, resumable"]  # and its runs table
        survived.append(point)
        return info

    killed("step", 3, str(tmp_path / "config.yaml"), checkpoint=2)
    assert train_steps(run_dir) == [1, 2]
    killed("load", 1, *resume, checkpoint=2)
    killed("checkpoint", 1, *resume, checkpoint=2)  # checkpoint 4 had its adapter, not its optimiser state
    assert (run_dir / "checkpoints" / ".tmp-step-4" / "adapter").exists() and not (run_dir / "checkpoints" / "step-4").exists()
    killed("metrics", 5, *resume, checkpoint=4)
    torn = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    assert not torn.endswith("\n") and train_steps(run_dir) == [1, 2, 3, 4]  # the torn record is skipped
    killed("adapter", 1, *resume, checkpoint=8)
    assert not (run_dir / "adapter").exists(), "a torn final adapter must never take the adapter's place"

    done = cli_train(None, 0, *resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at step 8" in done.stderr
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # repaired: every line is whole again
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 4, 8]
    info = read_json(run_dir / "run.json")
    assert info["status"] == "finished" and info["step"] == 8 and list_runs(runs)[0]["status"] == "finished"
    from safetensors.torch import load_file

    assert load_file(run_dir / "adapter" / "adapter_model.safetensors")  # whole

    full = train(config(tiny, arith, tmp_path / "full"), progress=False)
    a = {r["step"]: r for r in read_metrics(full.run_dir, "train")}
    b = {r["step"]: r for r in read_metrics(run_dir, "train")}
    for step in range(1, 9):
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    print(f"kill points survived: {survived}")


RUN_JSON_WRITER = """
import sys, time
from pathlib import Path
from orpo_local.runs import update_run
run = Path(sys.argv[1])
payload = {"text": "训练" * 20000, "numbers": list(range(5000))}
print("ready", flush=True)
i = 0
while True:
    i += 1
    update_run(run, status="running", step=i, **payload)
"""


def test_run_json_is_never_left_unparseable_by_a_kill(tmp_path):
    """A process rewriting a 100 kB run.json as fast as it can, SIGKILLed 12 times at random moments:
    run.json parses every time (written to a temporary file, then renamed)."""
    run = tmp_path / "run"
    run.mkdir()
    update_run(run, status="running", step=0)
    rng, steps = random.Random(0), []
    for _ in range(12):
        writer = subprocess.Popen([sys.executable, "-c", RUN_JSON_WRITER, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
        steps.append(read_json(run / "run.json")["step"])  # raises on a torn file
    assert any(steps), "the writer got to rewrite run.json before its kill"


def test_a_torn_metrics_line_is_tolerated_then_repaired(tmp_path):
    from orpo_local.runs import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "split": "train", "loss": 0.9}\n{"step": 3, "spl',
                    encoding="utf-8")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(tmp_path, after_step=2)
    assert path.read_text(encoding="utf-8").splitlines() == ['{"step": 1, "split": "train", "loss": 1.0}',
                                                             '{"step": 2, "split": "train", "loss": 0.9}']


def fake_run(root: Path, tiny, arith) -> Path:
    """A run folder with a config and a complete (empty) checkpoint: enough for a resume to get to its checks."""
    run_dir = root / "fake"
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2, "micro_batch": 2}')
    config(tiny, arith, root).to_yaml(run_dir / "config.yaml")
    update_run(run_dir, status="stopped", step=2)
    return run_dir


class NoLoad(TorchBackend):
    def load(self, *a, **k):
        raise AssertionError("the model must not load")


def test_a_run_that_is_training_cannot_be_resumed_deleted_or_trained_twice(tiny, arith, tmp_path):
    from orpo_local.runs import RunBusy, delete_run

    run_dir = fake_run(tmp_path, tiny, arith)
    with lock_run(run_dir):  # as a training process holds it (flock: this process counts as another)
        assert is_active(run_dir) and list_runs(tmp_path)[0]["resumable"] is False
        with pytest.raises(RunBusy, match="training already"):
            train(resume=run_dir, backend=NoLoad(), progress=False)
        with pytest.raises(RunBusy, match="cannot delete this run while it is training"):
            delete_run(run_dir)
        update_run(run_dir, status="running")
        assert list_runs(tmp_path)[0]["status"] == "running"
    assert not is_active(run_dir) and list_runs(tmp_path)[0]["status"] == "interrupted"
    delete_run(run_dir)
    assert not run_dir.exists()


# ------------------------------------------------------------------ disk full, unwritable folders

class FullDiskAtCheckpoint(TorchBackend):
    """The second checkpoint's optimiser state runs out of space half-way through the file."""

    saves = 0

    def save_state(self, path):
        self.saves += 1
        if self.saves == 2:
            (Path(path) / "optimizer.pt").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "optimizer.pt"))
        super().save_state(path)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_much_space_is_needed(tiny, arith, tmp_path, capsys):
    cfg = config(tiny, arith, tmp_path / "runs", **{"optim.max_steps": 4, "run.eval_every": 0})
    with pytest.raises(TrainingError) as error:
        train(cfg, backend=FullDiskAtCheckpoint(), progress=False)
    message = str(error.value)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "the disk is full: No space left on device while writing" in message
    assert "needs about" in message and "MB" in message and "are free there: free at least" in message
    assert f"orpo-local train --resume {run_dir}" in message and "step-2, is intact" in message
    assert [s for s, _ in checkpoints(run_dir)] == [2] and not list((run_dir / "checkpoints").glob(".tmp-*"))
    info = read_json(run_dir / "run.json")
    assert info["status"] == "failed" and info["error"] == message
    resumed = train(resume=run_dir, progress=False)  # the checkpoint before the failure loads and goes on
    assert resumed.status == "finished" and train_steps(run_dir) == [1, 2, 3, 4]


def test_the_cli_prints_the_disk_full_advice(tiny, arith, tmp_path, capsys, monkeypatch):
    import orpo_local.backends as backends

    monkeypatch.setattr(backends, "get_backend", lambda name: FullDiskAtCheckpoint())
    cfg = config(tiny, arith, tmp_path / "runs", **{"optim.max_steps": 4, "run.eval_every": 0, "data.val_fraction": 0.0})
    cfg.to_yaml(tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "error: the disk is full" in err and "free at least" in err


def mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_real_full_tmpfs_fails_the_checkpoint_and_the_run_resumes_elsewhere(tiny, arith, tmp_path):
    """Where this machine lets us mount one: a 4 MiB tmpfs that fills up at step 3 (a filler file). The
    real ENOSPC from torch/safetensors ends the run with the space advice; the checkpoint before stays."""
    disk = tmp_path / "small"
    if not mount_tmpfs(disk, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        def fill(event):
            if isinstance(event, Step) and event.step == 3:
                with (disk / "filler").open("wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                    except OSError:
                        pass

        cfg = config(tiny, arith, disk / "runs", **{"optim.max_steps": 4, "run.eval_every": 0})
        with pytest.raises(TrainingError, match="the disk is full") as error:
            train(cfg, progress=False, on_event=fill)
        (run_dir,) = (disk / "runs").iterdir()
        assert latest_checkpoint(run_dir).name == "step-2" and "step-2, is intact" in str(error.value)
        (disk / "filler").unlink()
        assert train(resume=run_dir, progress=False).status == "finished"
    finally:
        unmount(disk)


@pytest.fixture
def sealable(tmp_path):
    """(folder, seal): a folder to fill, then `seal()` makes it unwritable for this process (chmod for a
    normal user; root ignores file modes, so for root the folder is a tmpfs remounted read-only)."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        yield folder, lambda: [p.chmod(0o555) for p in (folder, *folder.rglob("*")) if p.is_dir()]
        for p in (folder, *folder.rglob("*")):
            if p.is_dir():
                p.chmod(0o755)
    elif mount_tmpfs(folder, "size=1m"):
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        unmount(folder)
    else:
        pytest.skip("root ignores file modes, and no read-only tmpfs can be mounted here")


def test_a_read_only_runs_folder_is_refused_before_the_model_is_fetched_or_loaded(tiny, arith, sealable, monkeypatch):
    import orpo_local.models as models

    folder, seal = sealable
    seal()

    def no_fetch(*a, **k):
        raise AssertionError("the model must not be fetched for a runs folder that cannot be written")

    monkeypatch.setattr(models, "resolve_model", no_fetch)
    for runs in (folder, folder / "runs"):  # the folder itself, or one to be made in it
        with pytest.raises(TrainingError, match=r"cannot write there \(.*\).*--runs-dir"):
            train(config(tiny, arith, runs), backend=NoLoad(), progress=False)


def test_a_run_in_a_read_only_folder_is_refused_before_resuming(tiny, arith, sealable):
    folder, seal = sealable
    run_dir = fake_run(folder, tiny, arith)
    seal()
    with pytest.raises(TrainingError, match="cannot write there"):
        train(resume=run_dir, backend=NoLoad(), progress=False)


def test_a_job_holds_its_run_while_it_trains(tiny, arith, tmp_path):
    """In-process (the UI's way): while train() runs, its run lists as running and is active; after, neither."""
    seen = []

    def on_event(event):
        if isinstance(event, Step) and event.step == 1:
            (run,) = list_runs(tmp_path / "runs")
            seen.append((is_active(run["run_dir"]), run["status"]))

    run = train(config(tiny, arith, tmp_path / "runs", **{"optim.max_steps": 2, "run.eval_every": 0}), progress=False,
                on_event=on_event)
    assert seen == [(True, "running")]
    assert not is_active(run.run_dir) and list_runs(tmp_path / "runs")[0]["status"] == "finished"
