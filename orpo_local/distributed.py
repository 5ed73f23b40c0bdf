"""Running under a launcher: torchrun / accelerate launch (torch.distributed) start the processes,
orpo_local only asks where it is and splits the work.

    torchrun --nproc-per-node 2 -m orpo_local.cli train --backend torch ...
    orpo-local train --nproc 2 ...          # the same, torchrun started for you

Every process walks the same global sequence of micro-batches; process r of W takes micro-batches
r, r + W, ... of each optimiser window (so W processes with accumulation A see the batches of one
process with accumulation A x W). The backend sums the normalisers, metrics and gradients over the
processes, so the objective is exactly the one-process objective. Process 0 alone writes the run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    launcher: str = "none"  # "torchrun" when started by torch.distributed's launcher

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder (only process 0 does)."""
        return self.rank == 0

    def share(self, micro_batches: list) -> list:
        """This process's micro-batches of one window of the global sequence."""
        return micro_batches[self.rank::self.size]


def world() -> World:
    """Where this process is, from the launcher's environment (one process when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env")


def init_torch(w: World) -> None:
    """Join the process group (gloo on CPU, NCCL on CUDA), once; nothing for one process."""
    if w.size <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")


def broadcast(value, w: World):
    """Process 0's `value` on every process (the run folder's name, chosen once)."""
    if w.size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `orpo-local <argv>` in `nproc` local processes through torchrun (this Python's)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "orpo_local.cli", *argv]
