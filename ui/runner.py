"""The training job: `orpo_local.train` in a background thread, one job per server.

The UI never trains; it starts this job and reads `snapshot()`, which any page (including one
reloaded mid-run) can read at any time. Stop is cooperative: `train` checks the event between
steps, saves a checkpoint and returns "stopped".

With `nproc` > 1 the job is the backend's launcher (torchrun, mlx.launch) running `orpo-local train`
in that many processes, in a process group of its own. The runner follows it through the run folder
that process 0 writes (run.json, metrics.jsonl) and turns what it reads into the same events, so the
page shows both jobs alike. Stop sends the group SIGINT, which `orpo-local train` takes as a stop: every
process ends after the same step, with a checkpoint of it.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path

from orpo_local import distributed
from orpo_local.backend import ModelInfo
from orpo_local.config import ConfigError, TrainConfig
from orpo_local.events import Evaluated, Failed, Finished, Message, Started, Step, Verdict, describe
from orpo_local.distributed import EXIT_DIR_ENV, SHUTDOWN_TIMEOUT_S, exit_code
from orpo_local.runs import checkpoints, is_active, read_metrics, run_backend, run_status
from orpo_local.train import train, with_absolute_paths

LOG_LINES = 300
EXCERPT_LINES = 40  # of a failed job's output, shown in the log
POLL_S = 0.5  # how often a job in other processes is read from its run folder
STOP_GRACE_S = SHUTDOWN_TIMEOUT_S + 30  # after Stop, how long its processes get to finish their step and save


def max_processes(backend: str, launchers: set[str], cuda_devices: int, cpus: int) -> int:
    """The most local processes a job on `backend` can train in here; 1 means one, in this process.

    torch goes through torchrun (installed with torch): one CUDA device a process (NCCL wants a GPU
    each, so a single GPU takes one process), else gloo on the CPU with up to one process a core.
    MLX goes through mlx.launch, a ring over localhost, up to one process a core."""
    if backend == "torch" and "torchrun" in launchers:
        return cuda_devices if cuda_devices else cpus
    if backend == "mlx" and "mlx.launch" in launchers:
        return cpus
    return 1


def installed_launchers() -> set[str]:
    """The launchers this Python can start, looked up without importing a framework."""
    found = set()
    if importlib.util.find_spec("torch") is not None:  # torch.distributed.run ships with every torch
        found.add("torchrun")
    beside = Path(sys.executable).parent / "mlx.launch"  # the console script installed with mlx
    if hasattr(distributed, "launcher_command") and (beside.exists() or shutil.which("mlx.launch")):
        found.add("mlx.launch")
    return found


def cuda_devices() -> int:
    """NVIDIA GPUs a process here may use, without loading a framework: CUDA_VISIBLE_DEVICES when set,
    else the GPUs nvidia-smi lists (0 without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # CUDA stops at the first entry that is not a device ("-1" hides them all)
        count = 0
        for entry in visible.split(","):
            if not entry.strip() or entry.strip().startswith("-"):
                break
            count += 1
        return count
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def local_max_processes(backend: str = "auto") -> int:
    """`max_processes` for this machine and `backend` ("auto" as training resolves it; 1 when it is not installed)."""
    from orpo_local.backends import resolve_backend

    try:
        name = resolve_backend(backend)
    except RuntimeError:
        return 1
    return max_processes(name, installed_launchers(), cuda_devices() if name == "torch" else 0, os.cpu_count() or 1)


def launch_command(backend: str, nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `orpo-local <argv>` in `nproc` local processes through `backend`'s launcher."""
    launcher = getattr(distributed, "launcher_command", None)
    if launcher is not None:
        return launcher(backend, nproc, argv)
    if backend != "torch":  # before mlx.launch support, only torch trains across processes
        raise RuntimeError(f"{nproc} processes: only the torch backend trains across processes here; run MLX in one process")
    return distributed.torchrun_command(nproc, argv)


def explain(error: BaseException) -> str:
    """An exception as a message a person can act on."""
    message = f"{type(error).__name__}: {error}" if not isinstance(error, (ValueError, RuntimeError, OSError)) else str(error)
    low = message.lower()
    advised = "batch size" in low  # train() already said what to do (its out-of-memory advice)
    if ("out of memory" in low or isinstance(error, MemoryError)) and not advised:
        message += (" — the model did not fit in memory: lower the batch size or max length, turn on 4-bit or "
                    "gradient checkpointing, or pick a smaller model.")
    return message


class RunFollower:
    """The events of a run that other processes train, read from the run folder process 0 writes:
    Started once run.json says the job began, a Step or an Evaluated for each new metrics.jsonl record,
    and at the end what run.json says (Verdict, Finished or Failed).

    A resumed run is known by its folder; a new one is the folder that appears in `runs_dir` after the
    launch with `config` as its config.yaml. run.json as it was at the launch is not the job's."""

    def __init__(self, runs_dir: str | Path, config: TrainConfig | None = None, resume: str | Path | None = None):
        self.runs_dir = Path(runs_dir)
        self.config = config.to_dict() if config is not None else None
        self.run_dir = Path(resume) if resume else None
        self.before = {p.name for p in self.runs_dir.iterdir()} if resume is None and self.runs_dir.is_dir() else set()
        self.old_info = _text(self.run_dir / "run.json") if self.run_dir else None
        found = checkpoints(self.run_dir) if self.run_dir else []
        self.start = found[-1][0] if found else 0  # where train() continues from
        self.started, self.last_step, self.total, self.evals = False, self.start, 0, set()
        self.metrics: dict = {}

    def poll(self) -> list:
        if self.run_dir is None:
            self.run_dir = self._find()
            if self.run_dir is None:
                return []
        info, events = self._info(), []
        if not self.started:
            if info is None or "total_steps" not in info or info.get("status") not in ("running", "finished", "stopped"):
                return []
            self.started = True
            data = info.get("data", {})
            model = {f.name: info[f.name] for f in fields(ModelInfo) if f.name in info}
            events.append(Started(str(self.run_dir), info["total_steps"], self.start, data.get("train_pairs", 0),
                                  data.get("val_pairs", 0), model, data))
        self.total = info.get("total_steps", self.total) if info else self.total
        for row in read_metrics(self.run_dir):
            step, values = row["step"], {k: v for k, v in row.items() if k not in ("step", "split", "elapsed_s")}
            if row.get("split") == "train" and step > self.last_step:
                elapsed = row.get("elapsed_s", 0.0)
                self.last_step, self.metrics = step, values
                events.append(Step(step, self.total, values, elapsed, elapsed / max(1, step - self.start) * max(0, self.total - step)))
            elif row.get("split") == "eval" and step not in self.evals and (step > self.start or step == self.start == 0):
                self.evals.add(step)
                events.append(Evaluated(step, values))
        return events

    def finish(self, code: int, stopping: bool, output: str) -> list:
        """The last events, once the processes have exited with `code` (after Stop when `stopping`), with
        `output` what they printed."""
        events = self.poll()
        info = self._info() if self.run_dir else None
        if info is None:  # ended before the run folder (or, resuming, run.json) was written
            error = _first_error(output) or f"the training processes exited with code {code}"
            return events + [Failed(str(self.run_dir or ""), self.start, error)]
        status, found = run_status(self.run_dir, info), checkpoints(self.run_dir)
        kept = found[-1][0] if found else None
        if status == "finished" or (kept is not None and (status == "stopped" or (status == "interrupted" and stopping))):
            if status != "finished" and self.last_step > kept:
                lost = f"step {self.last_step}" if self.last_step == kept + 1 else f"steps {kept + 1}-{self.last_step}"
                events.append(Message(f"{lost} came after the last checkpoint (step-{kept}); a resume trains them again", "warning"))
            if info.get("verdict") and not info.get("error"):  # this job's verdict, not one of an earlier stop
                events.append(Verdict(**info["verdict"]))
            done, outcome = (info.get("step", 0), "finished") if status == "finished" else (kept, "stopped")
            return events + [Finished(str(self.run_dir), done, outcome, self.metrics)]
        if status == "failed" and info.get("error"):
            error = info["error"]
        elif stopping and kept is None:
            error = "stopped before the first checkpoint: there is nothing to resume; start the run again"
        else:
            error = _first_error(output) or f"the training processes exited with code {code}"
            if status == "running":  # the launcher is gone but a process of the job still holds the run
                error += "; a process of this job is still training the run"
        if kept is not None and status != "running":
            error += f"; it can resume from its last checkpoint, step-{kept}"
        return events + [Failed(str(self.run_dir), info.get("step", 0), error)]

    def _find(self) -> Path | None:
        if not self.runs_dir.is_dir():
            return None
        for path in sorted(self.runs_dir.iterdir()):
            if path.name in self.before or not (path / "config.yaml").is_file():
                continue
            try:
                if TrainConfig.from_yaml(path / "config.yaml").to_dict() == self.config:
                    return path
            except (ConfigError, OSError):
                continue
        return None

    def _info(self) -> dict | None:
        """run.json once the job has written it (None before, or while it cannot be read)."""
        text = _text(self.run_dir / "run.json")
        if text is None or text == self.old_info:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _first_error(output: str) -> str:
    """The last "error: ..." line `orpo-local train` printed (its own account of why it failed), or ""."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("error: ")]
    return lines[-1].removeprefix("error: ") if lines else ""


def excerpt(output: str, lines: int = EXCERPT_LINES) -> str:
    """What to show of a failed job's output: `lines` lines from its first error (an "error: " line or a
    traceback: the cause, before the launcher's account of which process failed), else its last lines."""
    rows = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]  # a bar's \r ends a line too
    first = next((i for i, line in enumerate(rows) if line.startswith(("error: ", "Traceback (most recent call last):"))), None)
    return "\n".join(rows[first:first + lines] if first is not None else rows[-lines:])


class Runner:
    def __init__(self, root: str | Path | None = None):
        self.root = f"{Path(root).resolve()}/" if root else None  # log paths are shown relative to this folder
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None  # the launcher of a job in other processes
        self._stop_asked = 0.0  # time.monotonic() of Stop
        self.version = 0  # bumped on every event, so pages redraw only when something changed
        self._reset()

    def _reset(self) -> None:
        self.status = "idle"  # idle | starting | running | stopping | finished | stopped | failed
        self.run_dir: str | None = None
        self.step = self.total = 0
        self.elapsed = self.eta = 0.0
        self.error = ""
        self.verdict: dict | None = None  # the end-of-run Verdict's fields
        self.log: list[str] = []
        self.processes = 1
        self.started_at = time.time()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config=None, resume: str | Path | None = None, nproc: int = 1, **train_options) -> bool:
        """Start a job, in this process or (nproc > 1) in nproc processes; False (and nothing started) when
        one is already running. Across processes, the one train option is accept_data_change."""
        with self._lock:
            if self.busy:
                return False
            self._reset()
            self.status, self.processes = "starting", max(1, int(nproc))
            self.run_dir = str(resume) if resume else None
            self._stop.clear()
            self.version += 1
            work, args = (self._work, (config, resume, train_options)) if self.processes == 1 else \
                (self._work_processes, (config, resume, train_options))
            self._thread = threading.Thread(target=work, args=args, daemon=True, name="orpo-train")
            self._thread.start()
            return True

    def stop(self) -> bool:
        """Ask the running job to stop after its current step, with a checkpoint (in other processes: all after
        the same step); False when none is running."""
        if not self.busy:
            return False
        with self._lock:  # with the launch's check of it: one of the two signals a job that is just starting
            self._stop.set()
            self.status, self._stop_asked, proc = "stopping", time.monotonic(), self._proc
            self._log("stop requested: finishing the current step, then saving a checkpoint" if self.processes == 1 else
                      f"stop requested: the {self.processes} processes finish the current step, then save a checkpoint")
        if proc is not None:
            _signal_group(proc, signal.SIGINT)
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict:
        with self._lock:
            return {"status": self.status, "run_dir": self.run_dir, "step": self.step, "total": self.total,
                    "elapsed": self.elapsed, "eta": self.eta, "error": self.error, "log": list(self.log), "verdict": self.verdict,
                    "processes": self.processes, "version": self.version}

    def _work(self, config, resume, train_options) -> None:
        try:
            train(config, resume=resume, on_event=self._on_event, stop=self._stop, progress=False, download_bar=self._bar(),
                  **train_options)
        except BaseException as e:  # noqa: BLE001 - a failed job must leave the server working
            self._fail(e)

    def _work_processes(self, config, resume, train_options) -> None:
        """The job as `orpo-local train` under the backend's launcher, followed through its run folder."""
        proc = None
        try:
            with tempfile.TemporaryDirectory(prefix="orpo-job-") as scratch:
                command, follower = self._plan(config, resume, train_options, Path(scratch))
                self._on_event(Message(f"starting {self.processes} processes: {' '.join(command)}"))
                output = Path(scratch) / "output.log"
                with output.open("wb") as sink, self._lock:
                    # a session of its own: Stop signals the launcher's group, and Ctrl-C on the UI does not reach it
                    codes = Path(scratch) / "exit-codes"  # mlx.launch exits 0 whatever its processes do: they leave theirs here
                    codes.mkdir()
                    proc = self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                                         start_new_session=True, env={**os.environ, EXIT_DIR_ENV: str(codes)})
                    if self._stop.is_set():  # Stop came while it was starting
                        _signal_group(proc, signal.SIGINT)
                atexit.register(_signal_group, proc, signal.SIGINT)  # a UI that exits stops its job, which keeps its checkpoint
                killed = False
                while proc.poll() is None:
                    for event in follower.poll():
                        self._on_event(event)
                    if self._stop.is_set() and not killed and time.monotonic() - self._stop_asked > STOP_GRACE_S:
                        self._on_event(Message(f"the processes did not end within {STOP_GRACE_S} s of Stop: killed", "warning"))
                        _signal_group(proc, signal.SIGKILL)
                        killed = True
                    time.sleep(POLL_S)
                # mlx.launch can exit before its processes (they got the group's SIGINT too): the run is done
                # when process 0 lets go of its lock
                deadline = time.monotonic() + STOP_GRACE_S
                while follower.run_dir is not None and is_active(follower.run_dir) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                text = _text(output) or ""
                events = follower.finish(proc.returncode or exit_code(codes, self.processes), self._stop.is_set(), text)
                if any(isinstance(e, Failed) for e in events) and text.strip():
                    self._on_event(Message(f"output of the processes:\n{excerpt(text)}"))
                for event in events:
                    self._on_event(event)
        except BaseException as e:  # noqa: BLE001 - a failed job must leave the server working
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGINT)  # a stop its run records, rather than processes nobody follows
            self._fail(e)
        finally:
            atexit.unregister(_signal_group)
            with self._lock:
                self._proc = None

    def _plan(self, config, resume, train_options, scratch: Path) -> tuple[list[str], RunFollower]:
        """The launcher command for the job and the follower of its run folder."""
        from orpo_local.backends import resolve_backend

        unknown = set(train_options) - {"accept_data_change"}
        if unknown:
            raise ValueError(f"a job in several processes takes no {', '.join(sorted(unknown))}")
        flags = ["--accept-data-change"] if train_options.get("accept_data_change") else []
        if resume is not None:
            saved = TrainConfig.from_yaml(Path(resume) / "config.yaml")
            changed = _changes(saved, config) if config is not None else []  # train() refuses the ones a resume cannot make
            argv = ["train", "--resume", str(resume), *flags, *[a for key, value in changed for a in ("--set", f"{key}={value}")]]
            backend, follower = run_backend(resume, saved.model.backend), RunFollower(saved.run.runs_dir, resume=resume)
        else:
            config = with_absolute_paths(config or TrainConfig())
            (scratch / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
            argv = ["train", str(scratch / "config.yaml"), *flags]
            backend, follower = config.model.backend, RunFollower(config.run.runs_dir, config=config)
        return launch_command(resolve_backend(backend), self.processes, argv), follower

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self.status, self.error = "failed", self._short(explain(error))
            self._log(f"failed: {self.error}")
            self.version += 1

    def _bar(self):
        """A tqdm class whose bar writes a log line at every tenth of the way (the download's files)."""
        from tqdm.auto import tqdm

        runner = self

        class LogBar(tqdm):
            def update(self, n=1):
                before = int(10 * self.n / self.total) if self.total else 0
                shown = super().update(n)
                if self.total and int(10 * self.n / self.total) > before:
                    runner._on_event(Message(f"{self.desc or 'download'}: {self.n}/{self.total} files ({100 * self.n // self.total}%)"))
                return shown

        return LogBar

    def _short(self, text: str) -> str:
        """Paths inside the app's folder, relative to it (what the page shows)."""
        return text.replace(self.root, "") if self.root else text

    def _log(self, line: str) -> None:
        self.log.append(time.strftime("%H:%M:%S ") + self._short(line))
        del self.log[:-LOG_LINES]

    def _on_event(self, event) -> None:
        with self._lock:
            self.version += 1
            self._log(describe(event))
            if isinstance(event, Started):
                self.run_dir, self.total, self.step = event.run_dir, event.total_steps, event.start_step
                self.status = "stopping" if self._stop.is_set() else "running"
            elif isinstance(event, Step):
                self.step, self.total, self.elapsed, self.eta = event.step, event.total_steps, event.elapsed_s, event.eta_s
            elif isinstance(event, Verdict):
                self.verdict = event.to_dict()
            elif isinstance(event, Finished):
                self.status, self.step = event.status, event.step
            elif isinstance(event, Failed):
                self.status, self.error = "failed", self._short(explain(RuntimeError(event.error)))


def _changes(saved: TrainConfig, config: TrainConfig) -> list[tuple[str, str]]:
    """("section.field", value as YAML) for every field `config` sets otherwise than `saved`."""
    old, new = saved.to_dict(), config.to_dict()
    return [(f"{sec}.{key}", json.dumps(new[sec][key])) for sec in new for key in new[sec] if new[sec][key] != old[sec][key]]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group `proc` leads (nothing once it has exited)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
