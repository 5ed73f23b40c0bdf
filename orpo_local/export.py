"""Take a run's result elsewhere: its adapter as a zip, or a merged full model folder.

    export_adapter("runs/my-run")                 # -> runs/my-run/exports/my-run-adapter.zip
    export_merged("runs/my-run", "merged/")      # -> a transformers (torch) or mlx-lm (MLX) model folder

The adapter zip holds adapter/ (a PEFT folder or mlx-lm adapters), config.yaml, run.json and the
chat template the run trained with (chat_template.jinja), so it describes itself. The merged
folder's tokenizer carries that template as its `chat_template`. Merging reloads the base model unquantised (a 4-bit base is merged into full
weights, never re-quantised) and folds the adapter in.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .fsutil import replace_folder
from .runs import TEMPLATE_FILE, final_adapter, resolve_checkpoint, run_backend, run_template
from .templates import apply_template


def _adapter_of(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """checkpoint: None (the final adapter), "best", "step-N" or a checkpoint folder."""
    folder = resolve_checkpoint(run_dir, checkpoint)
    adapter = folder / "adapter" if folder else final_adapter(run_dir)
    if adapter is None or not adapter.exists():
        raise FileNotFoundError(f"{run_dir}: no adapter yet (no final adapter and no checkpoint)")
    return adapter


def export_adapter(run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None) -> Path:
    """Zip the adapter with config.yaml and run.json; returns the zip's path."""
    run_dir = Path(run_dir)
    adapter = _adapter_of(run_dir, checkpoint)
    out = Path(out) if out else run_dir / "exports" / f"{run_dir.name}-adapter.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(adapter.rglob("*")):
            if file.is_file():
                zf.write(file, Path("adapter") / file.relative_to(adapter))
        for name in ("config.yaml", "run.json", TEMPLATE_FILE):
            if (run_dir / name).exists():
                zf.write(run_dir / name, name)
    os.replace(tmp, out)
    return out


def export_merged(run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None,
                  backend=None) -> Path:
    """Base model + adapter merged into one model folder (written through a temporary folder)."""
    run_dir = Path(run_dir)
    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    adapter = _adapter_of(run_dir, checkpoint)
    if backend is None:
        from .backends import get_backend

        backend = get_backend(run_backend(run_dir, config.model.backend))
    backend.load(replace(config.model, load_in_4bit=False), None, config.run.seed, adapter=adapter, trainable=False)
    apply_template(backend.tokenizer, run_template(run_dir))
    out = Path(out) if out else run_dir / "exports" / f"{run_dir.name}-merged"
    with replace_folder(out) as tmp:
        backend.save_merged(tmp)
    return out
