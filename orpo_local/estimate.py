"""Size a model and its training memory before loading it, from files alone.

    size = model_size("smollm2-135m-instruct")       # parameters, layers, hidden size, vocabulary
    est = training_memory(size, TrainConfig())        # GB: weights, LoRA + AdamW, activations, total

Parameter counts come from the safetensors headers (shapes only, no tensor is read), so this is
instant for any local model and needs no framework; a preset (models.PRESETS) that is not on disk
yet is sized from its config.json numbers instead, with no download. The memory figure is an
estimate for LoRA training, meant to say "fits / does not fit", not to the megabyte:

    weights      n_params x bytes per weight (2 for bf16/fp16, 4 for fp32, ~0.56 for 4-bit)
    LoRA+AdamW   r x (d_in + d_out) per adapted layer, x 16 bytes (fp32 weight, grad, two moments)
    activations  per token and block ~ 34 x hidden x 2 bytes (Korthikanti et al. 2022, no recompute;
                 ~2 x hidden with gradient checkpointing), for 2 x batch_size sequences of max_length,
                 plus fp32 log-probs over the vocabulary at up to half the tokens (the response part)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


@dataclass
class ModelSize:
    path: str
    n_params: int
    n_layers: int
    hidden: int
    intermediate: int
    vocab: int
    checkpoint_bytes: int
    linear_shapes: dict  # module suffix (q_proj, ...) -> (d_in, d_out) of one block's layer


def _headers(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors


def model_size(name: str, progress=lambda message: None) -> ModelSize:
    """Parameters and shapes of a model on disk (the bundled one is prepared first), or of a preset from its
    numbers when it is not downloaded yet; nothing is downloaded. Raises ModelNotFound."""
    from .models import ModelNotFound, local_model, preset

    folder = local_model(name, progress=progress)
    if folder is None:
        known = preset(name)
        if known is None:
            raise ModelNotFound(f"{name} is not on disk and not a preset: it is sized once downloaded (training downloads it); "
                                "pick a preset or a local folder to see a size now")
        return preset_size(known)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = {**config.get("text_config", {}), **config}
    tensors = _headers(folder)
    if not tensors:
        raise ModelNotFound(f"{folder}: no .safetensors weights to size")
    n_params, nbytes, linear = 0, 0, {}
    quant_bits = (config.get("quantization") or {}).get("bits")
    for key, t in tensors.items():
        count = 1
        for d in t["shape"]:
            count *= d
        nbytes += count * _DTYPE_BYTES.get(t["dtype"], 4)
        leaf = key.rsplit(".", 1)[-1]
        if quant_bits and t["dtype"] == "U32" and leaf == "weight":
            count = count * 32 // quant_bits  # an MLX-quantised weight packs 32 / bits values per uint32
        elif quant_bits and leaf in ("scales", "biases") and key.rsplit(".", 1)[0] + ".weight" in tensors:
            continue
        n_params += count
        parts = key.split(".")  # model.layers.0.self_attn.q_proj.weight -> one block's q_proj
        if leaf == "weight" and len(t["shape"]) == 2 and any(p.isdigit() for p in parts) and parts[-2] not in linear:
            out_dim, in_dim = t["shape"]
            packed = 32 // quant_bits if quant_bits and t["dtype"] == "U32" else 1
            linear[parts[-2]] = (in_dim * packed, out_dim)
    return ModelSize(str(folder), n_params, int(config.get("num_hidden_layers", 0)), int(config.get("hidden_size", 0)),
                     int(config.get("intermediate_size", 0)), int(config.get("vocab_size", 0)), nbytes, linear)


def preset_size(preset) -> ModelSize:
    """A models.Preset's size from its config.json numbers, shaped as `model_size` reads a checkpoint (16-bit weights)."""
    a = preset.arch
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    linear = {"q_proj": (a.hidden, q), "k_proj": (a.hidden, kv), "v_proj": (a.hidden, kv), "o_proj": (q, a.hidden),
              "gate_proj": (a.hidden, a.intermediate), "up_proj": (a.hidden, a.intermediate), "down_proj": (a.intermediate, a.hidden)}
    return ModelSize(preset.name, a.n_params, a.layers, a.hidden, a.intermediate, a.vocab, a.n_params * 2, linear)


def training_memory(size: ModelSize, config: TrainConfig) -> dict:
    """Estimated GB for LoRA/QLoRA training of `size` with `config` (see the module docstring; dtype auto = 2 bytes)."""
    m, lora, opt = config.model, config.lora, config.optim
    weight_bytes = 0.5625 if m.load_in_4bit else (4 if m.dtype == "float32" else 2)
    weights = size.n_params * weight_bytes
    layers = size.n_layers if lora.num_layers == -1 else min(lora.num_layers, size.n_layers)
    lora_params = layers * sum(lora.rank * (d_in + d_out) for name, (d_in, d_out) in size.linear_shapes.items() if name in lora.target_modules)
    adapters = lora_params * 16
    tokens = 2 * opt.batch_size * config.data.max_length
    per_token_block = (2 if m.gradient_checkpointing else 34) * size.hidden * 2
    activations = tokens * size.n_layers * per_token_block + tokens / 2 * size.vocab * 4 * 2
    gb = lambda b: round(b / 1e9, 2)  # noqa: E731
    return {"weights_gb": gb(weights), "lora_optimizer_gb": gb(adapters), "activations_gb": gb(activations),
            "total_gb": gb(weights + adapters + activations), "lora_params": lora_params}
