"""Test-only launcher: `orpo-local ARGS...` that SIGKILLs itself at one chosen point of a training run.

    python tests/kill_at.py POINT N train CONFIG.yaml ...    # POINT: load | step | checkpoint | metrics | adapter

The points are monkeypatched here, in this process only; nothing in orpo_local knows about them.
  load        inside the model load, after the base weights, before the adapter is attached
  step        inside training step N's forward/backward (before the optimiser updates)
  checkpoint  inside the N-th checkpoint write: its adapter is written, its optimiser state is not
  metrics     while appending step N's record to metrics.jsonl: half the line is written
  adapter     inside the final adapter write: its files written, the weights file torn in half
"""

import os
import signal
import sys
from pathlib import Path

from orpo_local import cli, events
from orpo_local.backends import torch_backend


def die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def at_call(owner, name: str, n: int, before=None, after=None) -> None:
    """Wrap owner.name so that its n-th call (or every call `before`/`after` accepts) ends the process."""
    original, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and before(calls[0], args):
            die()
        result = original(*args, **kwargs)
        if after and after(calls[0], args):
            die()
        return result

    setattr(owner, name, wrapper)


def main(point: str, n: int, argv: list[str]) -> int:
    if point == "load":
        at_call(torch_backend, "_attach_adapter", n, before=lambda k, a: k == n)
    elif point == "step":
        at_call(torch_backend, "backward_window", n, before=lambda k, a: k == n)
    elif point == "checkpoint":
        at_call(torch_backend.TorchBackend, "save_state", n, before=lambda k, a: k == n)
    elif point == "metrics":
        write = events.MetricsWriter.__call__

        def torn(self, event):
            if isinstance(event, events.Step) and event.step == n:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write('{"step": %d, "split": "train", "loss": 1' % n)  # half a record, no line end
                die()
            write(self, event)

        events.MetricsWriter.__call__ = torn
    elif point == "adapter":
        def torn_weights(k, args):
            folder = Path(args[1])
            if (folder.parent / "run.json").exists():  # the run's own adapter, not a checkpoint's
                weights = folder / "adapter_model.safetensors"
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
                return True
            return False

        at_call(torch_backend.TorchBackend, "save_adapter", n, after=torn_weights)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
