"""Framework backends, installed as orpo_local.backends.

    available_backends()   -> {"torch": "", "mlx": "why not"}  ("" = usable)
    get_backend("auto")    -> MLX on Apple Silicon, torch with CUDA where a GPU is present, torch on CPU otherwise

Nothing heavy is imported until a backend is asked for.
"""

from __future__ import annotations

import importlib.util
import platform

INSTALL_HINT = {"torch": "pip install 'orpo-local[torch]'", "mlx": "pip install 'orpo-local[mlx]'"}
REQUIRES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx_lm")}


def _missing(name: str) -> list[str]:
    return [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]


def available_backends() -> dict[str, str]:
    """Each backend's name with "" when usable, else the reason and the fix."""
    out = {}
    for name in REQUIRES:
        missing = _missing(name)
        out[name] = f"missing {', '.join(missing)}: {INSTALL_HINT[name]}" if missing else ""
    return out


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def resolve_backend(name: str = "auto") -> str:
    """The concrete backend for `name`; raises RuntimeError naming the fix when it is missing."""
    avail = available_backends()
    if name == "auto":
        order = ("mlx", "torch") if is_apple_silicon() else ("torch", "mlx")
        for candidate in order:
            if not avail[candidate]:
                return candidate
        raise RuntimeError("no training backend is installed: " + "; ".join(f"{k}: {v}" for k, v in avail.items()))
    if name not in avail:
        raise RuntimeError(f"unknown backend {name!r}; choose auto, torch or mlx")
    if avail[name]:
        raise RuntimeError(f"backend {name!r} is not usable here ({avail[name]})")
    return name


def get_backend(name: str = "auto"):
    """A fresh backend object implementing orpo_local.backend.Backend."""
    resolved = resolve_backend(name)
    if resolved == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend()
    from .mlx_backend import MLXBackend

    return MLXBackend()
