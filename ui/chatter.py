"""Inference for the Chat tab: loaded models cached by target, replies streamed through ChatSession.

A target is a string: "model:<name or folder>[|backend[|run folder]]" (a base model; the run folder
lends it that run's chat template, for a fair comparison), "run:<run folder>" (its final
adapter) or "ckpt:<checkpoint folder>" (that checkpoint's adapter, best/ included). Loading is the slow part, so
the two most recently used targets stay loaded (enough for a side-by-side comparison).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from orpo_local.chat import ChatSession
from orpo_local.config import TrainConfig
from orpo_local.runs import BEST_DIR, checkpoints, final_adapter, list_runs, read_json, run_backend, run_of_checkpoint, run_template

KEEP_LOADED = 2


def base_target(target: str, default_model: str) -> str:
    """The base model of a target: the run's own base model for a run or checkpoint."""
    kind, _, value = target.partition(":")
    if kind == "model":
        return target
    run_dir = Path(value) if kind == "run" else run_of_checkpoint(value)
    config = TrainConfig.from_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    name = config.model.name if config else default_model
    return f"model:{name}|{run_backend(run_dir, config.model.backend if config else 'auto')}|{run_dir}"


def chat_targets(runs_dir: str | Path) -> list[tuple[str, str, str, int | None]]:
    """(run name, target, kind, step) for every run with an adapter, newest first; kind is
    "final", "best" (the best validation margin, step = where) or "step"."""
    out = []
    for info in list_runs(runs_dir):
        run_dir = Path(info["run_dir"])
        if final_adapter(run_dir) is None:
            continue
        if (run_dir / "adapter").exists():
            out.append((run_dir.name, f"run:{run_dir}", "final", None))
        if (run_dir / BEST_DIR / "best.json").exists():
            out.append((run_dir.name, f"ckpt:{run_dir / BEST_DIR}", "best", read_json(run_dir / BEST_DIR / "best.json")["step"]))
        out += [(run_dir.name, f"ckpt:{path}", "step", step) for step, path in reversed(checkpoints(run_dir))]
    return out


class Chatter:
    def __init__(self):
        self._loaded: OrderedDict[str, tuple] = OrderedDict()  # target -> (backend, its chat template)
        self._lock = threading.Lock()  # one generation at a time: the models are shared by every page

    def _backend(self, target: str):
        if target in self._loaded:
            self._loaded.move_to_end(target)
            return self._loaded[target]
        kind, _, value = target.partition(":")
        if kind == "model":
            name, _, rest = value.partition("|")
            backend, _, run_dir = rest.partition("|")
            session = ChatSession.from_model(name, backend=backend or "auto", template=run_template(run_dir) if run_dir else "auto")
        elif kind == "run":
            session = ChatSession.from_run(value)
        elif kind == "ckpt":
            session = ChatSession.from_run(run_of_checkpoint(value), checkpoint=value)
        else:
            raise ValueError(f"unknown chat target {target!r}")
        self._loaded[target] = session.backend, session.encoder.template
        while len(self._loaded) > KEEP_LOADED:
            self._loaded.popitem(last=False)
        return self._loaded[target]

    def session(self, target: str, history: list[dict], **options) -> ChatSession:
        with self._lock:
            backend, template = self._backend(target)
            chat = ChatSession(backend, template=template, **options)
        chat.history = list(history)
        return chat

    def stream(self, target: str, history: list[dict], message: str, **options) -> Iterator[str]:
        """The reply to `message` after `history`, as growing text."""
        chat = self.session(target, history, **options)
        text = ""
        with self._lock:
            for piece in chat.stream(message):
                text += piece
                yield text

    def stream_pair(self, targets: tuple[str, str], histories: tuple[list, list], message: str,
                    **options) -> Iterator[tuple[str, str]]:
        """Two replies streamed in turn, a token each, so both grow together on the page."""
        chats = [self.session(t, h, **options) for t, h in zip(targets, histories)]
        texts, streams = ["", ""], [c.stream(message) for c in chats]
        with self._lock:
            while streams[0] is not None or streams[1] is not None:
                for i, s in enumerate(streams):
                    if s is None:
                        continue
                    try:
                        texts[i] += next(s)
                    except StopIteration:
                        streams[i] = None
                yield texts[0], texts[1]
