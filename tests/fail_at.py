"""`orpo-local <args>` with one process's training step raising at a given step, for the failure tests:

    torchrun --nproc-per-node 2 tests/fail_at.py RANK STEP train ...    (or under mlx.launch)

Process RANK raises RuntimeError("planted failure") when it is about to take its STEP-th step (1-based)."""

import sys

from orpo_local import cli
from orpo_local.backends import get_backend
from orpo_local.distributed import world


def main() -> int:
    rank, step, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    backend = get_backend(argv[argv.index("--backend") + 1] if "--backend" in argv else "torch")
    cls = type(backend)
    plain, taken = cls.train_step, [0]

    def train_step(self, *args, **kwargs):
        taken[0] += 1
        if world().rank == rank and taken[0] == step:
            raise RuntimeError("planted failure")
        return plain(self, *args, **kwargs)

    cls.train_step = train_step
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
