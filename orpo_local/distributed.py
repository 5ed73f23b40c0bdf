"""Running under a launcher: torchrun / accelerate launch (torch.distributed) or mlx.launch
(mx.distributed) start the processes, orpo_local only asks where it is and splits the work.

    torchrun --nproc-per-node 2 -m orpo_local.cli train --backend torch ...
    mlx.launch -n 2 --backend ring -- -m orpo_local.cli train --backend mlx ...
    orpo-local train --nproc 2 ...          # the same, the backend's launcher started for you

Every process walks the same global sequence of micro-batches; process r of W takes micro-batches
r, r + W, ... of each optimiser window (so W processes with accumulation A see the batches of one
process with accumulation A x W). The backend sums the normalisers, metrics and gradients over the
processes, so the objective is exactly the one-process objective. Process 0 alone writes the run.

Neither framework is imported here until a process group is asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# mlx.launch exits 0 whatever its processes do, so each process writes its exit code into this folder
EXIT_DIR_ENV = "ORPO_LOCAL_EXIT_DIR"
SHUTDOWN_TIMEOUT_S = 300  # how long torchrun waits for stopping processes before it kills them


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    launcher: str = "none"  # "torchrun" (torch.distributed), "env" (WORLD_SIZE/RANK set by hand) or "mlx.launch"

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder (only process 0 does)."""
        return self.rank == 0

    @property
    def framework(self) -> str:
        """The backend whose process group joins these processes: "mlx" under mlx.launch, else "torch"."""
        return "mlx" if self.launcher == "mlx.launch" else "torch"

    def share(self, micro_batches: list) -> list:
        """This process's micro-batches of one window of the global sequence."""
        return micro_batches[self.rank::self.size]


def world() -> World:
    """Where this process is, from the launcher's environment (one process when there is none)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        return World(int(os.environ.get("RANK", "0")), size, "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env")
    if "MLX_RANK" in os.environ and (size := _mlx_size()) > 1:
        return World(int(os.environ["MLX_RANK"]), size, "mlx.launch")
    return World()


def _mlx_size() -> int:
    """How many processes mlx.launch started: the ring's (MLX_HOSTFILE) or JACCL's (MLX_IBV_DEVICES) host list,
    NCCL's MLX_WORLD_SIZE, else what mx.distributed finds."""
    for name in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):  # files holding one JSON entry per process ("" for one)
        if os.environ.get(name):
            text = Path(os.environ[name]).read_text().strip()
            return len(json.loads(text)) if text else 1
    if "MLX_WORLD_SIZE" in os.environ:
        return int(os.environ["MLX_WORLD_SIZE"])
    import mlx.core as mx

    return mx.distributed.init().size()


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


def init_mlx(w: World) -> None:
    """Join mx.distributed's group: the ring (TCP, over Ethernet or Thunderbolt) unless mlx.launch set up JACCL
    (RDMA over Thunderbolt 5) or NCCL; nothing for one process. Later mx.distributed.init() calls return it."""
    if w.size <= 1:
        return
    import mlx.core as mx

    backend = "jaccl" if "MLX_IBV_DEVICES" in os.environ else "nccl" if "NCCL_HOST_IP" in os.environ else "ring"
    group = mx.distributed.init(strict=True, backend=backend)
    if (group.size(), group.rank()) != (w.size, w.rank):
        raise RuntimeError(f"mx.distributed ({backend}) joined {group.size()} processes with this one as rank {group.rank()}, "
                           f"but mlx.launch started {w.size} with this one as rank {w.rank}: check the hostfile "
                           "(one entry per process) and start every process through the same mlx.launch")


def broadcast(value, w: World):
    """Process 0's `value` (a JSON value for MLX) on every process (the run folder's name, chosen once)."""
    if w.size <= 1:
        return value
    if w.framework == "mlx":
        return _broadcast_mlx(value, w)
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_mlx(value, w: World):
    """mx.distributed has no broadcast: an all_sum of process 0's bytes and the others' zeros (the length first)."""
    import mlx.core as mx

    mine = np.frombuffer(json.dumps(value).encode(), np.uint8) if w.writer else np.zeros(0, np.uint8)
    length = mx.distributed.all_sum(mx.array([mine.size], dtype=mx.int32), stream=mx.cpu).item()
    data = np.zeros(length, np.uint8)
    data[: mine.size] = mine
    return json.loads(bytes(np.array(mx.distributed.all_sum(mx.array(data), stream=mx.cpu))))


def barrier(w: World) -> None:
    """Wait until every process gets here."""
    _all_sum(0.0, w)


def any_process(flag: bool, w: World) -> bool:
    """Whether `flag` is set on any process (every process must call it at the same point): a stop asked of
    one process, or of each at a different step, ends them all after the same step."""
    return _all_sum(float(flag), w) > 0


def _all_sum(value: float, w: World) -> float:
    """`value` summed over every process (`value` itself in one), through the framework's process group."""
    if w.size <= 1:
        return value
    if w.framework == "mlx":
        import mlx.core as mx

        return mx.distributed.all_sum(mx.array(value), stream=mx.cpu).item()
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `orpo-local <argv>` in `nproc` local processes through torchrun (this Python's)."""
    # a stop (Ctrl-C, which torchrun passes on) lets every process finish its step, evaluate and save: torchrun's
    # default 30 s before it kills them can be too short for that on a large model
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", "-m", "orpo_local.cli", *argv]


def mlx_launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `orpo-local <argv>` in `nproc` local processes through mlx.launch on a ring over
    localhost, on free ports; `--` keeps flags of ours that mlx.launch also has (--backend) from it."""
    launch = Path(sys.executable).parent / "mlx.launch"  # the console script installed with this Python's mlx
    if not launch.exists():
        launch = shutil.which("mlx.launch")
    if not launch:
        raise RuntimeError("mlx.launch not found beside this Python or on PATH: pip install 'orpo-local[mlx]'")
    return [str(launch), "-n", str(nproc), "--backend", "ring", "--starting-port", str(free_ports(nproc)),
            "--python", sys.executable, "--", "-m", "orpo_local.cli", *argv]


def launcher_command(backend: str, nproc: int, argv: list[str]) -> list[str]:
    """The command that runs `orpo-local <argv>` in `nproc` local processes: torchrun for "torch", mlx.launch for "mlx".
    mlx.launch's own exit code is 0 even when a process failed: run it with EXIT_DIR_ENV set and read `exit_code`."""
    if backend == "torch":
        return torchrun_command(nproc, argv)
    if backend == "mlx":
        return mlx_launch_command(nproc, argv)
    raise ValueError(f"no launcher for backend {backend!r}; choose torch or mlx")


def free_ports(n: int, tries: int = 20) -> int:
    """The first of `n` consecutive TCP ports on localhost that are free now (the ring listens on port + rank)."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n <= 65536 and all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError(f"found no {n} consecutive free ports on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def record_exit(code: int) -> None:
    """Leave this process's exit code where the process that launched it reads it (when it asked, EXIT_DIR_ENV)."""
    folder, w = os.environ.get(EXIT_DIR_ENV), world()
    if folder and w.size > 1:
        try:
            (Path(folder) / f"rank-{w.rank}").write_text(str(code))
        except OSError:  # the launching process is gone (killed): nobody reads it
            pass


def exit_code(folder: str | Path, nproc: int) -> int:
    """The launched processes' exit code: the first non-zero one, 1 for a process that left none (it was killed)."""
    for rank in range(nproc):
        path = Path(folder, f"rank-{rank}")
        code = int(path.read_text()) if path.exists() else 1
        if code:
            return code
    return 0
