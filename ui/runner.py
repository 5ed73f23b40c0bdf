"""The training job: `orpo_local.train` in a background thread, one job per server.

The UI never trains; it starts this job and reads `snapshot()`, which any page (including one
reloaded mid-run) can read at any time. Stop is cooperative: `train` checks the event between
steps, saves a checkpoint and returns "stopped".
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from orpo_local.events import Failed, Finished, Message, Started, Step, Verdict, describe
from orpo_local.train import train

LOG_LINES = 300


def explain(error: BaseException) -> str:
    """An exception as a message a person can act on."""
    message = f"{type(error).__name__}: {error}" if not isinstance(error, (ValueError, RuntimeError, OSError)) else str(error)
    low = message.lower()
    advised = "batch size" in low  # train() already said what to do (its out-of-memory advice)
    if ("out of memory" in low or isinstance(error, MemoryError)) and not advised:
        message += (" — the model did not fit in memory: lower the batch size or max length, turn on 4-bit or "
                    "gradient checkpointing, or pick a smaller model.")
    return message


class Runner:
    def __init__(self, root: str | Path | None = None):
        self.root = f"{Path(root).resolve()}/" if root else None  # log paths are shown relative to this folder
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
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
        self.started_at = time.time()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config=None, resume: str | Path | None = None, **train_options) -> bool:
        """Start a job; False (and nothing started) when one is already running."""
        with self._lock:
            if self.busy:
                return False
            self._reset()
            self.status = "starting"
            self.run_dir = str(resume) if resume else None
            self._stop.clear()
            self.version += 1
            self._thread = threading.Thread(target=self._work, args=(config, resume, train_options), daemon=True, name="orpo-train")
            self._thread.start()
            return True

    def stop(self) -> bool:
        """Ask the running job to stop after its current step; False when none is running."""
        if not self.busy:
            return False
        self._stop.set()
        with self._lock:
            self.status = "stopping"
            self._log("stop requested: finishing the current step, then saving a checkpoint")
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict:
        with self._lock:
            return {"status": self.status, "run_dir": self.run_dir, "step": self.step, "total": self.total,
                    "elapsed": self.elapsed, "eta": self.eta, "error": self.error, "log": list(self.log), "verdict": self.verdict,
                    "version": self.version}

    def _work(self, config, resume, train_options) -> None:
        try:
            train(config, resume=resume, on_event=self._on_event, stop=self._stop, progress=False, download_bar=self._bar(),
                  **train_options)
        except BaseException as e:  # noqa: BLE001 - a failed job must leave the server working
            with self._lock:
                self.status, self.error = "failed", self._short(explain(e))
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
