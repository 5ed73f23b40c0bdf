"""Configuration: the one source of every default and help text.

The CLI flags, YAML files and the UI's labels are generated from these dataclasses.
A `TrainConfig` is a tree of sections; each section validates itself in `__post_init__`
and every error lists all problems at once.

    cfg = TrainConfig.from_yaml("run.yaml").with_overrides(["optim.learning_rate=1e-4", "lambda_=0.2"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .data.formats import FORMATS
from .templates import TEMPLATES

BUNDLED_MODEL = "smollm2-135m-instruct"
BUNDLED_DATA = "zh-sample"


# The field names the data formats use; data.columns maps a source's columns onto them.
COLUMN_NAMES = ("prompt", "chosen", "rejected", "system", "conversations", "instruction", "input", "history")


class ConfigError(ValueError):
    """A configuration value is invalid; the message lists every problem."""


def _f(default: Any, help: str, choices: tuple | None = None, **kw):
    """A dataclass field carrying its help text (and allowed values) as metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _check(section: Any, rules: list[tuple[bool, str]]) -> None:
    """Raise one ConfigError naming every broken rule, plus choices violations."""
    problems = [msg for ok, msg in rules if not ok]
    for f in fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices is not None and value not in choices:
            problems.append(f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}")
    if problems:
        name = type(section).__name__
        raise ConfigError(f"{name}: " + "; ".join(problems))


@dataclass
class ModelConfig:
    """Which model to tune and how to load it."""

    name: str = _f(BUNDLED_MODEL, "Model: the bundled 'smollm2-135m-instruct' (offline), a local Hugging Face/MLX folder, or a Hub id.")
    backend: str = _f("auto", "Training backend: auto picks MLX on Apple Silicon, torch with CUDA where a GPU is present, torch on CPU otherwise.", choices=("auto", "torch", "mlx"))
    dtype: str = _f("auto", "Compute dtype of the frozen weights: auto = bf16 on CUDA and on CPUs with native bf16, else float32 (always float32 on MLX-CPU).", choices=("auto", "float32", "bfloat16", "float16"))
    load_in_4bit: bool = _f(False, "QLoRA: quantise the frozen base weights to 4 bits (NF4 via bitsandbytes on torch, MLX affine quantisation on MLX).")
    quant_group_size: int = _f(64, "MLX 4-bit quantisation group size (32, 64 or 128).", choices=(32, 64, 128))
    quant_bits: int = _f(4, "MLX quantisation bits for QLoRA (4 or 8).", choices=(4, 8))
    prefix_sharing: bool = _f(True, "Compute each pair's prompt once, both answers attending to it: the same loss and gradients with less work (on the architectures that allow it: with torch Llama, Mistral without a sliding window, Qwen2/3, OLMo 2; with MLX also Phi-3 and StarCoder2; others compute the prompt twice). run.json's batch_layout says which ran.")
    allow_pickle_weights: bool = _f(False, "Also load weights stored as pickles (pytorch_model.bin), which can run code when loaded: only for a model you trust that has no safetensors files.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, about 30% slower.")
    fsdp: bool = _f(False, "Shard the model across the training processes (FSDP2, torch, 2+ processes from --nproc N or torchrun): each decoder block's weights, the LoRA gradients and the optimiser state are split over the processes, so a model too big for one device trains; the loss and the updates stay those of one process. With 4-bit it is FSDP-QLoRA (the 4-bit weights stored in the compute dtype so they can be sharded). docs/distributed.md.")

    def __post_init__(self):
        _check(self, [(bool(self.name.strip()), "name must not be empty"),
                      (not (self.fsdp and self.backend == "mlx"),
                       "fsdp shards a model across torch processes: use backend torch, or turn fsdp off for MLX")])


@dataclass
class LoraConfig:
    """Low-rank adapters attached to the frozen model."""

    rank: int = _f(8, "LoRA rank r: size of the low-rank update (higher = more capacity, more memory).")
    alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the LoRA input during training (0 disables it).")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Names of the linear layers that get adapters.")
    num_layers: int = _f(-1, "Attach adapters to the last N transformer blocks only (-1 = all blocks).")

    def __post_init__(self):
        _check(self, [
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (len(self.target_modules) > 0, "target_modules must name at least one layer"),
            (self.num_layers == -1 or self.num_layers >= 1, f"num_layers must be -1 (all) or >= 1, got {self.num_layers}"),
        ])


@dataclass
class DataConfig:
    """Where the preference pairs come from and how they are cut to length."""

    path: str = _f(BUNDLED_DATA, "Preference data: 'zh-sample' / 'en-sample' (bundled), a .jsonl/.json/.csv/.parquet file, a folder of them, a saved `datasets` folder or a Hub id.")
    format: str = _f("auto", "Row format; auto detects it from the fields (after the column mapping).", choices=("auto", *FORMATS))
    columns: dict = _f({}, "Column mapping {standard name: your column}, applied before format detection, for every format and file type, e.g. prompt=question,system=sys (a dict in YAML). Standard names: " + ", ".join(COLUMN_NAMES) + ". 'question' and 'query' are read as the prompt without a mapping.")
    template: str = _f("auto", "Chat template: auto = the tokenizer's own (a base model without one gets plain); or zephyr (the paper's Mistral-ORPO format, fits any base model), chatml, llama3, qwen (need their control tokens in the vocabulary), plain ('Human:' / 'Assistant:' as text). The run records it; chat, eval and exports use it.", choices=TEMPLATES)
    val_fraction: float = _f(0.1, "Share of pairs held out for validation, never trained on and prompt-disjoint from training (pairs sharing a prompt stay on one side); it scores every evaluation, the best checkpoint and the end-of-run verdict (0 = none).")
    val_min_pairs: int = _f(32, "Hold out at least this many pairs (at most half the data) when val_fraction > 0: fewer cannot show a change in preference accuracy.")
    max_length: int = _f(512, "Maximum tokens of prompt + response; longer pairs are truncated (prompt first) or dropped.")
    max_prompt_length: int = _f(256, "Truncation never cuts the prompt below this many tokens.")
    max_pairs: int = _f(-1, "Use at most this many pairs after loading (-1 = all).")

    def __post_init__(self):
        _check(self, [
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.val_min_pairs >= 0, f"val_min_pairs must be >= 0, got {self.val_min_pairs}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (1 <= self.max_prompt_length < self.max_length,
             f"max_prompt_length must be in [1, max_length={self.max_length}), got {self.max_prompt_length}"),
            (self.max_pairs == -1 or self.max_pairs >= 1, f"max_pairs must be -1 (all) or >= 1, got {self.max_pairs}"),
            (set(self.columns) <= set(COLUMN_NAMES),
             f"columns maps unknown name(s) {sorted(set(self.columns) - set(COLUMN_NAMES))}; the standard names are {', '.join(COLUMN_NAMES)}"),
            (all(isinstance(v, str) and v for v in self.columns.values()), f"columns values must be column names, got {self.columns}"),
        ])


@dataclass
class OrpoConfig:
    """The ORPO objective: L = L_NLL + lambda * L_OR (Hong et al. 2024, eq. 6)."""

    lambda_: float = _f(2.0, "ORPO λ: weight of the odds-ratio term (the paper's λ, TRL's `beta`, `alpha` in the paper's code). Higher pushes the rejected answers down harder against the chosen ones; 0 is plain SFT on the chosen answers, which makes the rejected ones more likely too. The paper's 0.1 is too weak to show in a few hundred steps on a small model (docs/quality.md).")
    nll_on_prompt: bool = _f(False, "Also count the chosen prompt's tokens in the NLL term, as TRL's ORPOTrainer and the paper's code do: more language modelling of the prompts, a smaller share of the loss for the preference term.")

    def __post_init__(self):
        _check(self, [(self.lambda_ >= 0, f"lambda_ must be >= 0, got {self.lambda_}")])


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    learning_rate: float = _f(1e-3, "Peak AdamW learning rate of the LoRA weights: higher moves both answers' log-probs faster, and too high lets the NLL term swamp the preference (suits small models like the bundled one; use 1e-4 to 2e-4 for 7B+ models).")
    batch_size: int = _f(4, "Preference pairs per micro-batch (each pair is two sequences).")
    grad_accumulation: int = _f(1, "Micro-batches per optimiser step; the loss is normalised over the whole window.")
    epochs: float = _f(1.0, "Passes over the training pairs (ignored when max_steps > 0): more passes widen the chosen-rejected margin; the validation margin shows when it stops carrying over to new prompts (best/ keeps the best step).")
    max_steps: int = _f(-1, "Stop after this many optimiser steps (-1 = derive from epochs).")
    warmup_steps: int = _f(3, "Linear warm-up steps from 0 to the peak learning rate: keeps the first, noisiest updates from undoing the base model's preferences.")
    schedule: str = _f("cosine", "Learning-rate decay after warm-up: cosine and linear let the margin settle at the end of the run; constant keeps moving it.", choices=("cosine", "linear", "constant"))
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value (0 disables clipping).")

    def __post_init__(self):
        _check(self, [
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accumulation >= 1, f"grad_accumulation must be >= 1, got {self.grad_accumulation}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.max_steps == -1 or self.max_steps >= 1, f"max_steps must be -1 or >= 1, got {self.max_steps}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
        ])


@dataclass
class RunConfig:
    """Bookkeeping: where runs go, seeding, how often to evaluate and save."""

    runs_dir: str = _f("runs", "Folder that holds one sub-folder per run.")
    name: str = _f("", "Run folder name (empty = '<timestamp>-<model>').")
    seed: int = _f(42, "Seed for data order, splits, LoRA init and dropout.")
    eval_every: int = _f(24, "Evaluate on the validation pairs every N steps, each one a candidate for best/ (0 = only before training and at the end).")
    save_every: int = _f(100, "Write a resumable checkpoint every N steps (0 = only at the end).")
    eval_max_pairs: int = _f(64, "Evaluate on at most this many validation pairs (-1 = all).")

    def __post_init__(self):
        _check(self, [
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.eval_max_pairs == -1 or self.eval_max_pairs >= 1, f"eval_max_pairs must be -1 or >= 1, got {self.eval_max_pairs}"),
        ])


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "orpo": OrpoConfig, "optim": OptimConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """Everything one training run needs; saved as config.yaml in every run folder."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": LoraConfig.__doc__})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    orpo: OrpoConfig = field(default_factory=OrpoConfig, metadata={"help": OrpoConfig.__doc__})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": OptimConfig.__doc__})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": RunConfig.__doc__})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "TrainConfig":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(SECTIONS))
        problems = [f"unknown section {k!r} (sections: {', '.join(SECTIONS)})" for k in unknown]
        built = {}
        for key, section_cls in SECTIONS.items():
            values = raw.get(key) or {}
            if not isinstance(values, dict):
                problems.append(f"section {key!r} must be a mapping, got {type(values).__name__}")
                continue
            names = {f.name: f for f in fields(section_cls)}
            bad = sorted(set(values) - set(names))
            problems += [f"unknown field {key}.{b} (fields: {', '.join(names)})" for b in bad]
            try:
                kwargs = {k: _coerce(names[k], v, f"{key}.{k}") for k, v in values.items() if k in names}
                built[key] = section_cls(**kwargs)
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from e
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def with_overrides(self, items: list[str] | dict[str, Any]) -> "TrainConfig":
        """Apply overrides: `["section.field=value", ...]` (values parse as YAML, as on a command
        line) or `{"section.field": value}` (values taken as they are). A unique bare field name works too."""
        typed = isinstance(items, dict)
        pairs = items.items() if typed else [_split_override(s) for s in items]
        raw = self.to_dict()
        problems = []
        for key, value in pairs:
            try:
                section, name = resolve_key(key)
                raw[section][name] = value if typed else yaml.safe_load(value)
            except ConfigError as e:
                problems.append(str(e))
            except yaml.YAMLError as e:
                problems.append(f"{key}: cannot read the value {value!r} ({e.problem if hasattr(e, 'problem') else e})")
        if problems:
            raise ConfigError("; ".join(problems))
        return TrainConfig.from_dict(raw)


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.learning_rate=1e-4")
    key, value = item.split("=", 1)
    return key.strip(), value


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.learning_rate' or a unique bare 'learning_rate' -> ('optim', 'learning_rate')."""
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}:
            return section, name
        raise ConfigError(f"unknown config key {key!r}")
    hits = [(s, key) for s, c in SECTIONS.items() if key in {f.name for f in fields(c)}]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(f"unknown config key {key!r}; see `orpo-local train --help` for the keys")
    raise ConfigError(f"config key {key!r} is ambiguous: use one of {', '.join(f'{s}.{k}' for s, k in hits)}")


def field_info(section: str, name: str) -> dataclasses.Field:
    """The dataclass field (default, help, choices) of `section.name`, for CLI and UI builders."""
    for f in fields(SECTIONS[section]):
        if f.name == name:
            return f
    raise KeyError(f"{section}.{name}")


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert YAML/CLI values to the field's type, refusing silent nonsense like bool('no')."""
    kind = type(field_default(f))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if kind is dict:
        return parse_columns(value, where)
    if kind is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return list(value)
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value



def parse_columns(value: Any, where: str = "data.columns") -> dict:
    """A column mapping from a dict, or from 'prompt=question,system=sys' (CLI, UI); '' or None is none."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a mapping like prompt=question,system=sys, got {value!r}")
    out = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, column = (x.strip() for x in item.partition("="))
        if not sep or not name or not column:
            raise ConfigError(f"{where}: {item!r} must look like NAME=COLUMN, e.g. prompt=question")
        out[name] = column
    return out


def format_columns(columns: dict) -> str:
    """The mapping as the CLI and the UI take it: 'prompt=question,system=sys'."""
    return ",".join(f"{k}={v}" for k, v in columns.items())
