"""Take a run's result elsewhere: to the other backend, to transformers or mlx-lm as a merged model, and to
llama.cpp, Ollama and LM Studio as one GGUF file.

    export("runs/my-run", "peft")                 # a PEFT LoRA folder, from a torch or an MLX run
    export("runs/my-run", "mlx")                  # mlx-lm adapters, from either
    export("runs/my-run", "merged")               # a transformers model folder with the adapter folded in
    export("runs/my-run", "merged-mlx")           # the same for mlx-lm
    export("runs/my-run", "gguf", quant="q8_0")   # exports/my-run-gguf-q8_0/{my-run-q8_0.gguf, Modelfile}
    export_adapter("runs/my-run")                 # the run's own adapter as a self-describing zip

Every target takes the final adapter or a checkpoint (`checkpoint="best"`, "step-20"), and every output
folder is written beside its place and renamed into it when complete, so an existing export is replaced
whole or not at all. The chat template a run trained with (chat_template.jinja) goes along: beside a
converted adapter, into a merged model's tokenizer, into the GGUF file's metadata.

Merging into a model folder uses the framework's own code (peft's merge_and_unload, mlx-lm's fuse) and
reloads the base model unquantised: a 4-bit base is merged into full weights, never re-quantised. GGUF
needs neither framework: orpo_local.gguf_export merges in NumPy while it writes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .convert import adapter_format, convert_adapter, model_config, read_adapter
from .fsutil import replace_folder
from .gguf_export import QUANTS
from .runs import TEMPLATE_FILE, final_adapter, refuse_if_active, resolve_checkpoint, run_backend, run_template
from .templates import apply_template, resolve_template

# Each target once, with what it is for: the CLI's --to help and the Runs tab read these.
TARGETS = {
    "peft": "PEFT LoRA adapter folder, for transformers + peft (from a torch or an MLX run)",
    "mlx": "mlx-lm adapter folder, for mlx_lm.load(..., adapter_path=...) (from either backend)",
    "merged": "model folder with the adapter merged in, for transformers (needs torch)",
    "merged-mlx": "model folder with the adapter merged in, for mlx-lm (needs MLX)",
    "gguf": "one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it",
}
ADAPTER_FORMAT = {"torch": "peft", "mlx": "mlx"}  # the adapter format each backend loads


def _adapter_of(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """checkpoint: None (the final adapter), "best", "step-N" or a checkpoint folder."""
    folder = resolve_checkpoint(run_dir, checkpoint)
    adapter = folder / "adapter" if folder else final_adapter(run_dir)
    if adapter is None or not adapter.exists():
        raise FileNotFoundError(f"{run_dir}: no adapter yet (no final adapter and no checkpoint)")
    return adapter


def export_adapter(run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None) -> Path:
    """Zip the adapter with config.yaml and run.json; returns the zip's path."""
    refuse_if_active(run_dir, "export")
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
    """Base model + adapter merged into one model folder of the run's own framework (written through a temporary folder)."""
    refuse_if_active(run_dir, "export")
    run_dir = Path(run_dir)
    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    if backend is None:
        from .backends import get_backend

        backend = get_backend(run_backend(run_dir, config.model.backend))
    out = Path(out) if out else run_dir / "exports" / f"{run_dir.name}-merged"
    with replace_folder(out) as tmp:
        _save_merged(run_dir, config, _adapter_of(run_dir, checkpoint), backend, tmp)
    return out


def _save_merged(run_dir: Path, config: TrainConfig, adapter: Path, backend, folder: Path) -> None:
    """`backend`'s merged model folder of the base model and `adapter` (in that backend's format), with the run's template."""
    backend.load(replace(config.model, load_in_4bit=False), None, config.run.seed, adapter=adapter, trainable=False)
    apply_template(backend.tokenizer, run_template(run_dir))
    backend.save_merged(folder)


# ----------------------------------------------------------------------------- every target

def export(run_dir: str | Path, to: str, out: str | Path | None = None, checkpoint: str | Path | None = None,
           quant: str = "f16", progress: Callable[[str], None] = print) -> Path:
    """Write the run's adapter (the final one, or `checkpoint`) as `to` (one of TARGETS) into the folder `out`
    (default: RUN/exports/RUN-TO[-QUANT][-CHECKPOINT]); returns that folder."""
    refuse_if_active(run_dir, "export")
    run_dir = Path(run_dir)
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}")
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantisation {quant!r}; use one of {', '.join(QUANTS)}")
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    adapter = _adapter_of(run_dir, checkpoint)
    out = Path(out) if out else run_dir / "exports" / default_name(run_dir, to, quant, checkpoint)
    progress(f"Exporting {run_dir.name} ({adapter.relative_to(run_dir) if adapter.is_relative_to(run_dir) else adapter}) "
             f"as {to}{' ' + quant if to == 'gguf' else ''} to {out}")
    with replace_folder(out) as tmp:
        if to in ("peft", "mlx"):
            _write_adapter(config, adapter, to, tmp, progress)
            (tmp / TEMPLATE_FILE).write_text(run_template(run_dir), encoding="utf-8")
        elif to == "gguf":
            stem = "-".join([run_dir.name, *([Path(str(checkpoint)).name] if checkpoint else []), quant])
            _write_gguf(run_dir, config, adapter, tmp, stem, quant, progress)
        else:
            from .backends import get_backend

            backend_name = "torch" if to == "merged" else "mlx"
            with tempfile.TemporaryDirectory(prefix=".adapter-", dir=tmp.parent) as converted:
                here = _adapter_in(config, adapter, ADAPTER_FORMAT[backend_name], Path(converted) / "adapter", progress)
                progress(f"Loading the base model with the adapter on {backend_name} and merging it ...")
                _save_merged(run_dir, config, here, get_backend(backend_name), tmp)
    progress(f"Wrote {out}")
    return out


def default_name(run_dir: Path, to: str, quant: str, checkpoint: str | Path | None) -> str:
    """RUN-TO, plus the quantisation of a GGUF and the checkpoint when it is not the final adapter."""
    parts = [run_dir.name, "gguf-" + quant if to == "gguf" else to]
    if checkpoint:
        parts.append(Path(str(checkpoint)).name)
    return "-".join(parts)


def adapter_for(run_dir: str | Path, backend: str, checkpoint: str | Path | None = None,
                progress: Callable[[str], None] = print) -> Path:
    """The run's adapter in the format `backend` ("torch" or "mlx") loads: the run's own where it matches,
    else a converted copy in RUN/exports (made once, remade when the adapter is newer). Chat on the other
    backend loads this."""
    run_dir = Path(run_dir)
    adapter, fmt = _adapter_of(run_dir, checkpoint), ADAPTER_FORMAT[backend]
    if adapter_format(adapter) == fmt:
        return adapter
    out = run_dir / "exports" / default_name(run_dir, fmt, "", checkpoint)
    newest = max(p.stat().st_mtime for p in adapter.iterdir())
    if not out.exists() or min(p.stat().st_mtime for p in out.iterdir()) < newest:
        export(run_dir, fmt, out, checkpoint, progress=progress)
    return out


def _base_folder(config: TrainConfig, progress, weights: bool) -> Path:
    from .models import resolve_model

    return Path(resolve_model(config.model.name, progress=progress, weights=weights))


def _adapter_in(config: TrainConfig, adapter: Path, fmt: str, folder: Path, progress) -> Path:
    """`adapter` itself when it is in format `fmt`, else its conversion written to `folder`."""
    if adapter_format(adapter) == fmt:
        return adapter
    _write_adapter(config, adapter, fmt, folder, progress)
    return folder


def _write_adapter(config: TrainConfig, adapter: Path, fmt: str, folder: Path, progress) -> None:
    """`adapter` as format `fmt` in `folder`: copied when it is in that format already, else converted."""
    if adapter_format(adapter) == fmt:
        shutil.copytree(adapter, folder, dirs_exist_ok=True)
        return
    base = _base_folder(config, progress, weights=False)
    progress(f"Converting the {adapter_format(adapter)} adapter to {fmt} (base model {base})")
    convert_adapter(adapter, folder, fmt, base=str(base), n_layers=int(model_config(base)["num_hidden_layers"]))


def _write_gguf(run_dir: Path, config: TrainConfig, adapter: Path, folder: Path, stem: str, quant: str, progress) -> None:
    from transformers import AutoTokenizer

    from .gguf_export import modelfile, write_gguf

    base = _base_folder(config, progress, weights=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    _, template = resolve_template(tokenizer, run_template(run_dir))
    progress(f"Merging the adapter into {base} and writing GGUF ({quant}) ...")
    file = write_gguf(base, read_adapter(adapter), folder / f"{stem}.gguf", template, quant, name=run_dir.name, progress=progress)
    (folder / "Modelfile").write_text(modelfile(file.name, template, tokenizer), encoding="utf-8")


def gguf_commands(folder: str | Path) -> list[str]:
    """The two commands that run a GGUF export: Ollama (from its Modelfile) and llama.cpp's own chat."""
    folder = Path(folder)
    (file,) = folder.glob("*.gguf")
    name = re.sub(r"[^a-z0-9._-]+", "-", file.stem.lower()).strip("-.") or "orpo-local"
    return [f"ollama create {name} -f {folder / 'Modelfile'}", f"llama-cli -m {file}"]
