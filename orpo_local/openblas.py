"""MLX on Linux: the mlx[cpu] wheel ships a reference BLAS (~5 GFLOP/s on 2 cores); preloading a
system OpenBLAS makes its float32 matmul ~20-30x faster. The CLI re-executes itself with
LD_PRELOAD for MLX runs (set ORPO_LOCAL_OPENBLAS=0 to opt out); this module only finds the
library and explains, it imports no framework.
"""

from __future__ import annotations

import os
import platform
import sys

CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
              "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")


def find_openblas() -> str:
    return next((c for c in CANDIDATES if os.path.exists(c)), "")


def preloaded() -> bool:
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def advice() -> str:
    """How to get a fast BLAS under MLX on Linux ('' when nothing to do)."""
    if platform.system() != "Linux" or preloaded():
        return ""
    lib = find_openblas()
    if lib:
        return (f"MLX on Linux is using the slow reference BLAS of the mlx[cpu] wheel (~5 GFLOP/s). Run with "
                f"LD_PRELOAD={lib} for a ~20-30x faster matmul (the orpo-local command does this by itself).")
    return ("MLX on Linux is using the slow reference BLAS of the mlx[cpu] wheel (~5 GFLOP/s). Install OpenBLAS "
            "(Debian/Ubuntu: apt-get install libopenblas0-pthread) for a ~20-30x faster matmul.")


def reexec_with_openblas(argv: list[str]) -> None:
    """Replace this process by `python -m orpo_local.cli ARGV` with OpenBLAS preloaded, when that helps.

    Only for a real command-line process: LD_PRELOAD must be set before the process starts."""
    lib = find_openblas()
    if platform.system() != "Linux" or preloaded() or not lib or os.environ.get("ORPO_LOCAL_OPENBLAS") == "0":
        return
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), lib]))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "orpo_local.cli", *argv], env)
