"""Stopping and failing, as a user meets them: a Ctrl-C (SIGINT) or SIGTERM to `orpo-local train` ends it after the
step it is on with a checkpoint of that step, resumable; across processes (torchrun, mlx.launch) a failure of one
process ends all of them with the run marked failed, and a stop ends all of them after the same step."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orpo_local.fsutil import is_locked
from orpo_local.runs import LOCK_FILE, latest_checkpoint, read_json, read_metrics

HERE = Path(__file__).parent


def common(tiny, arith, runs, backend="torch"):
    return ["train", "--model", str(tiny), "--data", str(arith), "--backend", backend, "--runs-dir", str(runs),
            "--set", "model.dtype=float32", "--set", "optim.batch_size=2", "--set", "data.val_min_pairs=4",
            "--set", "run.save_every=1000", "--set", "run.eval_every=1000", "--set", "lora.dropout=0"]


def wait_for_step(runs: Path, step: int, proc, timeout: float = 240) -> Path:
    """The run folder once its metrics show `step` steps (the process still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for run in runs.glob("*"):
            if len(read_metrics(run, "train")) >= step:
                return run
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_after_the_step_with_a_checkpoint_of_it(tiny, arith, tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-m", "orpo_local.cli", *common(tiny, arith, tmp_path / "runs"), "--max-steps", "200"],
                            stderr=subprocess.PIPE, text=True)
    run = wait_for_step(tmp_path / "runs", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    info = read_json(run / "run.json")
    steps = read_metrics(run, "train")
    assert info["status"] == "stopped" and 2 <= info["step"] == len(steps) < 200, err[-2000:]
    assert latest_checkpoint(run).name == f"step-{info['step']}"  # save_every 1000: the stop's own checkpoint
    assert (run / "adapter" / "adapter_model.safetensors").exists() and "stopping after this step" in err
    resumed = subprocess.run([sys.executable, "-m", "orpo_local.cli", "train", "--resume", str(run), "--max-steps", str(info["step"] + 1)],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, info["step"] + 2))  # nothing trained twice


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_failing_process_ends_every_process_and_the_run_is_marked_failed(backend, tiny, arith, tmp_path):
    from orpo_local.distributed import EXIT_DIR_ENV, exit_code, launcher_command

    if backend == "mlx":
        from test_distributed import need_mlx_ring

        need_mlx_ring(tmp_path)
    command = launcher_command(backend, 2, common(tiny, arith, tmp_path / "runs", backend) + ["--max-steps", "6"])
    at = command.index("-m", command.index("orpo_local.cli") - 1)
    command[at: at + 2] = [str(HERE / "fail_at.py"), "1", "3"]  # process 1 fails at its third step
    tic = time.monotonic()
    codes = tmp_path / "codes"  # mlx.launch exits 0 whatever its processes do: each leaves its exit code here
    codes.mkdir()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, EXIT_DIR_ENV: str(codes)})
    seconds = time.monotonic() - tic
    (run,) = (tmp_path / "runs").iterdir()
    info = read_json(run / "run.json")
    assert info["status"] == "failed", (info, done.stderr[-3000:])
    assert info["error"].startswith("another training process ended, so this one stopped too"), info["error"]
    assert len(read_metrics(run, "train")) == 2 and seconds < 300  # measured: 7-10 s
    assert (done.returncode or exit_code(codes, 2)) != 0
    assert not is_locked(run / LOCK_FILE) and "planted failure" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_ctrl_c_on_train_nproc_stops_every_process_after_the_same_step_with_a_checkpoint(backend, tiny, arith, tmp_path):
    """A terminal's Ctrl-C: SIGINT to orpo-local train --nproc 2's whole process group (it, the launcher and, for
    mlx.launch, the processes themselves; torchrun passes it on to its own)."""
    if backend == "mlx":
        from test_distributed import need_mlx_ring

        need_mlx_ring(tmp_path)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "orpo_local.cli", *common(tiny, arith, runs, backend), "--max-steps", "400",
                             "--nproc", "2"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    run = wait_for_step(runs, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    info = read_json(run / "run.json")
    assert info["status"] == "stopped" and 2 <= info["step"] == len(read_metrics(run, "train")) < 400, err[-3000:]
    assert latest_checkpoint(run).name == f"step-{info['step']}" and not is_locked(run / LOCK_FILE)
    assert [p.name for p in runs.iterdir()] == [run.name]
