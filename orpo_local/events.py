"""Typed training events and the two standard listeners (terminal progress, metrics.jsonl).

`train()` reports everything through one callback `on_event(event)`; the UI, the CLI progress
bar and the metrics file are all just callbacks.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO


@dataclass
class Event:
    def to_dict(self) -> dict:
        return {"event": type(self).__name__.lower(), "time": time.time(), **asdict(self)}


@dataclass
class Started(Event):
    run_dir: str
    total_steps: int
    start_step: int
    n_train: int
    n_val: int
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)


@dataclass
class Message(Event):
    text: str
    level: str = "info"  # info | warning


@dataclass
class Step(Event):
    step: int
    total_steps: int
    metrics: dict
    elapsed_s: float
    eta_s: float


@dataclass
class Evaluated(Event):
    step: int
    metrics: dict


@dataclass
class Verdict(Event):
    """End of run: is the tuned model better than the base model on the validation pairs?"""

    text: str
    better: bool
    step: int
    base: dict = field(default_factory=dict)  # {"accuracy", "margin"} at step 0
    tuned: dict = field(default_factory=dict)  # the same at the last evaluation
    best: dict | None = None  # {"step", "accuracy", "margin"} of best/

    def to_dict(self) -> dict:
        return asdict(self)  # for run.json: the fields alone


@dataclass
class Saved(Event):
    step: int
    path: str


@dataclass
class Finished(Event):
    run_dir: str
    step: int
    status: str  # finished | stopped
    metrics: dict = field(default_factory=dict)


@dataclass
class Failed(Event):
    run_dir: str
    step: int
    error: str


class MetricsWriter:
    """Appends step and evaluation records to <run>/metrics.jsonl (one JSON object a line).

    Each record is one write() of a whole line to a file opened for appending, so records never
    interleave; a process killed mid-write can leave a torn last line, which `runs.read_metrics`
    skips and a resume removes (`runs.truncate_metrics`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Step):
            record = {"step": event.step, "split": "train", **event.metrics, "elapsed_s": round(event.elapsed_s, 3)}
        elif isinstance(event, Evaluated):
            record = {"step": event.step, "split": "eval", **event.metrics}
        else:
            return
        line = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(fd, line) != len(line):  # a regular file takes it whole unless the disk is full
                raise OSError(errno.ENOSPC, f"{self.path}: short write (disk full?)")
        finally:
            os.close(fd)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def describe(event: Event) -> str:
    """One line of text for an event (the terminal, the web UI's log)."""
    if isinstance(event, Started):
        m = event.model
        return (f"run {event.run_dir}: {event.n_train} training pairs, {event.n_val} validation pairs, "
                f"{event.total_steps} steps on {m.get('backend')} ({m.get('device')}, {m.get('dtype')}"
                f"{', 4-bit' if m.get('quantized') else ''}; {m.get('n_trainable', 0):,} trainable parameters)"
                + (f"; resuming at step {event.start_step}" if event.start_step else ""))
    if isinstance(event, Step):
        m = event.metrics
        return (f"step {event.step}/{event.total_steps}: loss {m['loss']:.4f} acc {m['rewards/accuracies']:.2f} "
                f"margin {m['rewards/margins']:+.4f} {m['pairs_per_s']:.2f} pairs/s")
    if isinstance(event, Evaluated):
        m = event.metrics
        return (f"eval @ step {event.step}: loss {m['loss']:.4f} nll {m['nll_loss']:.4f} acc {m['rewards/accuracies']:.2f} "
                f"margin {m['rewards/margins']:+.4f} logps chosen {m['logps/chosen']:.3f} rejected {m['logps/rejected']:.3f}")
    if isinstance(event, Saved):
        return f"saved checkpoint {event.path}"
    if isinstance(event, Message):
        return ("warning: " if event.level == "warning" else "") + event.text
    if isinstance(event, Verdict):
        return ("✅ " if event.better else "warning: ⚠️ ") + event.text
    if isinstance(event, Finished):
        return f"{event.status}: {event.run_dir} at step {event.step}"
    if isinstance(event, Failed):
        return f"failed at step {event.step}: {event.error}"
    return type(event).__name__


class TerminalReporter:
    """A one-line progress bar with loss, reward accuracy, margin, pairs/s and ETA (plain lines when not a TTY)."""

    def __init__(self, stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self._open_line = False

    def _line(self, text: str, final: bool = True) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Step):
            m = event.metrics
            done = event.step / max(1, event.total_steps)
            bar = "█" * int(done * self.width) + "░" * (self.width - int(done * self.width))
            text = (f"step {event.step}/{event.total_steps} {bar} loss {m['loss']:.4f} acc {m['rewards/accuracies']:.2f} "
                    f"margin {m['rewards/margins']:+.4f} {m['pairs_per_s']:.2f} pairs/s "
                    f"elapsed {_clock(event.elapsed_s)} ETA {_clock(event.eta_s)}")
            self._line(text, final=not self.tty or event.step == event.total_steps)
        else:
            self._line(describe(event))
