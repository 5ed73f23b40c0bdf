"""LoRA adapters between the two backends' formats, and weights read without a framework (NumPy only).

    lora = read_adapter("runs/my-run/adapter")           # a PEFT folder or mlx-lm adapters, told apart by their files
    write_peft(lora, "out/peft", base="...", n_layers=30)  # adapter_config.json + adapter_model.safetensors
    write_mlx(lora, "out/mlx", n_layers=30)                # adapter_config.json + adapters.safetensors

Both formats hold the same update of a linear layer W (out, in) of the base model:

    PEFT:    W + (lora_alpha / r) * lora_B.weight (out, r) @ lora_A.weight (r, in)
    mlx-lm:  W + scale * lora_b.T (out, r) @ lora_a.T (r, in)     lora_a (in, r), lora_b (r, out)

so a conversion transposes the two matrices and keeps the scale (lora_alpha = scale * r). The module
names are the model's own in both (`model.layers.N.self_attn.q_proj`); PEFT prefixes them with
`base_model.model.`. mlx-lm puts adapters on the last `num_layers` blocks, each with the same `keys`;
PEFT names its layers (`layers_to_transform`): a PEFT adapter on other layers is written for mlx-lm
with zero matrices where it has none, which add nothing.

`Lora` is the neutral form in between; `Lora.delta` is one module's update, which GGUF export adds to its weight.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MLX_CONFIG, MLX_WEIGHTS = "adapter_config.json", "adapters.safetensors"
PEFT_PREFIX = "base_model.model."
BLOCK = re.compile(r"^((?:.*\.)?layers\.)(\d+)\.(.+)$")  # (model.layers.)(N).(path inside the block)

# safetensors dtype -> how to read it into NumPy; bf16 has no NumPy type and becomes float32
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class AdapterError(ValueError):
    """An adapter this conversion cannot represent; the message says which part and why."""


@dataclass
class Lora:
    """A LoRA adapter with no framework: module -> (A (r, in), B (out, r)), each update scale * B @ A."""

    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    scale: float
    rank: int
    dropout: float = 0.0

    def delta(self, module: str) -> np.ndarray | None:
        """(out, in) float32 update of `module`'s weight, or None where the adapter has none."""
        if module not in self.weights:
            return None
        a, b = self.weights[module]
        return self.scale * (b.astype(np.float32) @ a.astype(np.float32))


# ----------------------------------------------------------------------------- safetensors without a framework

@dataclass(frozen=True)
class Stored:
    """One tensor of a .safetensors file: its shape from the header, its values when called (memory-mapped)."""

    path: Path
    offset: int  # of the first byte in the file
    nbytes: int
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]

    def __call__(self) -> np.ndarray:
        if self.dtype not in _DTYPES:
            raise AdapterError(f"{self.path}: a tensor of dtype {self.dtype}, which this reader does not know")
        dtype = np.dtype(_DTYPES[self.dtype])
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype=np.float32 if self.dtype == "BF16" else dtype)
        data = np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=(self.nbytes // dtype.itemsize,))
        data = data.reshape(self.shape)
        if self.dtype == "BF16":  # the high half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data


def safetensors_index(path: str | Path) -> dict[str, Stored]:
    """Every tensor of one .safetensors file, read from its header; no values are read."""
    path = Path(path)
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {name: Stored(path, 8 + size + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0],
                         info["dtype"], tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    return {name: load() for name, load in safetensors_index(path).items()}


def model_tensors(folder: str | Path) -> dict[str, Stored]:
    """Every weight of a model folder (one model.safetensors or the shards its index names), unread."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.exists()
             else sorted(p.name for p in folder.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights (a model folder written by transformers or mlx-lm has them)")
    out: dict[str, Stored] = {}
    for name in files:
        out.update(safetensors_index(folder / name))
    return out


def model_config(folder: str | Path) -> dict:
    """A model folder's config.json, with a multimodal model's text_config lifted to the top."""
    cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return {**cfg, **cfg["text_config"]} if isinstance(cfg.get("text_config"), dict) else cfg


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------- reading

def adapter_format(folder: str | Path) -> str:
    """"peft" or "mlx", from the weight file's name (the two formats share adapter_config.json's name)."""
    folder = Path(folder)
    if (folder / PEFT_WEIGHTS).exists():
        return "peft"
    if (folder / MLX_WEIGHTS).exists():
        return "mlx"
    raise FileNotFoundError(f"{folder}: neither a PEFT adapter ({PEFT_WEIGHTS}) nor mlx-lm adapters ({MLX_WEIGHTS})")


def read_adapter(folder: str | Path) -> Lora:
    return read_peft(folder) if adapter_format(folder) == "peft" else read_mlx(folder)


def read_peft(folder: str | Path) -> Lora:
    """A PEFT LoRA folder (no DoRA, no per-module ranks or alphas, no extra trained modules)."""
    folder = Path(folder)
    cfg = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    problems = [f"{key}={cfg[key]!r}" for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias")
                if cfg.get(key)]
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.insert(0, f"peft_type={cfg['peft_type']!r}")
    if problems:
        raise AdapterError(f"{folder}: a plain LoRA adapter converts; this one has {', '.join(problems)}")
    rank = int(cfg["r"])
    scale = cfg["lora_alpha"] / (rank ** 0.5 if cfg.get("use_rslora") else rank)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_safetensors(folder / PEFT_WEIGHTS).items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise AdapterError(f"{folder / PEFT_WEIGHTS}: {key} is not a LoRA matrix of a linear layer")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    return Lora({mod: (ab["A"], ab["B"]) for mod, ab in _complete(pairs, folder, "AB")}, scale, rank, cfg.get("lora_dropout", 0.0))


def read_mlx(folder: str | Path) -> Lora:
    """mlx-lm LoRA adapters (fine_tune_type lora)."""
    folder = Path(folder)
    cfg = json.loads((folder / MLX_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise AdapterError(f"{folder}: fine_tune_type={cfg['fine_tune_type']!r}; only LoRA adapters convert")
    params = cfg["lora_parameters"]
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_safetensors(folder / MLX_WEIGHTS).items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"{folder / MLX_WEIGHTS}: {key} is not a LoRA matrix (lora_a, lora_b)")
        pairs.setdefault(module, {})[leaf[-1]] = value.T  # (in, r) -> (r, in); (r, out) -> (out, r)
    return Lora({mod: (ab["a"], ab["b"]) for mod, ab in _complete(pairs, folder, "ab")}, float(params["scale"]),
                int(params["rank"]), float(params.get("dropout", 0.0)))


def _complete(pairs: dict[str, dict[str, np.ndarray]], folder: Path, names: str) -> Iterator[tuple[str, dict]]:
    broken = sorted(mod for mod, ab in pairs.items() if set(ab) != set(names))
    if broken:
        raise AdapterError(f"{folder}: these modules lack one of their two LoRA matrices: {', '.join(broken)}")
    yield from sorted(pairs.items())


# ----------------------------------------------------------------------------- writing

def block_layers(lora: Lora) -> tuple[list[int], list[str]]:
    """(the block indices, the module paths inside a block) the adapter touches; refuses modules outside blocks."""
    outside = [mod for mod in lora.weights if BLOCK.match(mod) is None]
    if outside:
        raise AdapterError(f"adapters outside the transformer blocks cannot be written for mlx-lm: {', '.join(outside)}")
    found = [BLOCK.match(mod).groups() for mod in lora.weights]
    return sorted({int(n) for _, n, _ in found}), sorted({path for _, _, path in found})


def write_peft(lora: Lora, folder: str | Path, base: str, n_layers: int) -> None:
    """A standard PEFT LoRA folder: plain `PeftModel.from_pretrained(model, folder)` loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, keys = block_layers(lora)
    targets = sorted({path.rsplit(".", 1)[-1] for path in keys})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.scale * lora.rank, "lora_dropout": lora.dropout,
        "target_modules": targets, "layers_to_transform": None if layers == list(range(n_layers)) else layers,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = {}
    for module, (a, b) in lora.weights.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    save_safetensors(tensors, folder / PEFT_WEIGHTS, {"format": "pt"})


def write_mlx(lora: Lora, folder: str | Path, n_layers: int) -> None:
    """mlx-lm adapters: plain `mlx_lm.load(model, adapter_path=folder)` loads them. mlx-lm adapts the last
    `num_layers` blocks with one set of keys, so a block or key the adapter lacks there gets zero matrices."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers, keys = block_layers(lora)
    prefix = BLOCK.match(next(iter(lora.weights))).group(1)  # "model.layers." in the decoder-only models
    shapes = {BLOCK.match(mod).group(3): (a.shape, b.shape, a.dtype) for mod, (a, b) in lora.weights.items()}
    tensors = {}
    for n in range(layers[0], n_layers):
        for key in keys:
            a_shape, b_shape, dtype = shapes[key]
            a, b = lora.weights.get(f"{prefix}{n}.{key}", (np.zeros(a_shape, dtype), np.zeros(b_shape, dtype)))
            tensors[f"{prefix}{n}.{key}.lora_a"] = a.T
            tensors[f"{prefix}{n}.{key}.lora_b"] = b.T
    config = {"fine_tune_type": "lora", "num_layers": n_layers - layers[0],
              "lora_parameters": {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": keys}}
    (folder / MLX_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_safetensors(tensors, folder / MLX_WEIGHTS, {"format": "mlx"})


def convert_adapter(source: str | Path, folder: str | Path, to: str, base: str, n_layers: int) -> None:
    """Write the adapter in `source` (either format) as `to` ("peft" or "mlx") into `folder`."""
    lora = read_adapter(source)
    if to == "peft":
        write_peft(lora, folder, base, n_layers)
    elif to == "mlx":
        write_mlx(lora, folder, n_layers)
    else:
        raise ValueError(f"unknown adapter format {to!r}; use peft or mlx")
