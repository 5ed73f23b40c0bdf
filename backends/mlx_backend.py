"""MLX backend: mlx-lm models with its own LoRA layers; QLoRA on an MLX 4-bit quantised model.

Follows mlx-lm's tuner: `mlx_lm.load`, `linear_to_lora_layers`, `nn.value_and_grad`, adapters
saved as `adapters.safetensors` + `adapter_config.json`, so `mlx_lm.load(base, adapter_path=...)`
and `mlx_lm.generate --adapter-path` read them with no orpo_local code.

On Apple Silicon it runs on the GPU in the model's dtype. On Linux it runs on MLX's CPU device in
float32 (MLX's CPU bf16 matmul is very slow); preload a system OpenBLAS for a ~20-30x faster
matmul than the reference BLAS of the mlx[cpu] wheel (orpo_local.openblas).

Each pair's prompt is computed once where the architecture allows it ("prefix" layout, PREFIX_CACHE): the
prompts pass first and every layer's keys and values are handed to both answers as a KV cache (PrefixCache),
gradients flowing through them. Only the targets' hidden states meet the vocabulary, in chunks of at most
LOGITS_BUDGET bytes of logits recomputed in the backward pass.

Each micro-batch's forward and backward pass (and the eval forward) is `mx.compile`d as mlx-lm compiles
its step, the same on either device: the model and random (LoRA dropout) state are captured, batches are
padded to a multiple of `pad_to` and the loss's target list to an eighth of the batch, so a handful of
graphs serve a whole run. The optimiser update of the small LoRA tensors runs plain. `MLXBackend(compile=False)`,
or ORPO_LOCAL_MLX_COMPILE=0 in the environment, runs the same functions uncompiled (for a model whose
code does not compile).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from orpo_local import openblas
from orpo_local.backend import Batch, ModelInfo, orpo_metrics, real_tokens, window_sizes
from orpo_local.batching import CHOSEN, PROMPT, REJECTED, prefix_targets
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig
from orpo_local.distributed import world

LN2 = math.log(2.0)
CLAMP = -1e-7
ADAPTER_LEAVES = ("lora_a", "lora_b")
COMPILE_ENV = "ORPO_LOCAL_MLX_COMPILE"  # "0" turns mx.compile off
TARGET_BUCKETS = 8  # the target list is padded to a multiple of 1/8 of the (2B, T-1) grid


# ----------------------------------------------------------------------------- the math

def _work(logits: mx.array) -> mx.array:
    return logits if logits.dtype == mx.float64 else logits.astype(mx.float32)


def token_logps(logits: mx.array, input_ids: mx.array) -> mx.array:
    """(N, T-1): log P(input_ids[:, t] | < t), in float32 (float64 stays float64)."""
    work = _work(logits[:, :-1])
    targets = input_ids[:, 1:].astype(mx.int32)
    picked = mx.take_along_axis(work, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(work, axis=-1)


def sequence_logps(logits: mx.array, input_ids: mx.array, response_mask: mx.array) -> mx.array:
    """(N,): mean log-prob of each row's response tokens."""
    tl = token_logps(logits, input_ids)
    mask = response_mask[:, 1:].astype(tl.dtype)
    return (tl * mask).sum(-1) / mask.sum(-1)


def log1mexp(v: mx.array) -> mx.array:
    """log(1 - exp(v)), stable on both sides of -ln 2; v clamped to <= -1e-7."""
    v = mx.minimum(v, CLAMP)
    return mx.where(v < -LN2, mx.log1p(-mx.exp(v)), mx.log(-mx.expm1(v)))


def orpo_loss(logits: mx.array, batch: dict[str, mx.array], lambda_: float = 0.1, nll_on_prompt: bool = False,
              num_tokens=None, num_pairs=None) -> tuple[mx.array, dict[str, mx.array]]:
    """ORPO loss (Hong et al. 2024, eq. 6-7) and metrics for a chosen-then-rejected batch; see the torch twin."""
    return orpo_loss_from_token_logps(token_logps(logits, batch["input_ids"]), batch, lambda_, nll_on_prompt, num_tokens, num_pairs)


def orpo_loss_from_token_logps(tl: mx.array, batch: dict[str, mx.array], lambda_: float = 0.1, nll_on_prompt: bool = False,
                               num_tokens=None, num_pairs=None) -> tuple[mx.array, dict[str, mx.array]]:
    """`orpo_loss` from per-token log-probs tl (2B, T-1); entries outside the target masks are ignored."""
    resp = batch["response_mask"][:, 1:].astype(tl.dtype)
    b = resp.shape[0] // 2
    nll_mask = (batch["attention_mask"][:, 1:].astype(tl.dtype) if nll_on_prompt else resp)[:b]
    logps = (tl * resp).sum(-1) / resp.sum(-1)
    return orpo_terms(logps[:b], logps[b:], (tl[:b] * nll_mask).sum(), nll_mask.sum(), lambda_, b, num_tokens, num_pairs)


def prefix_orpo_loss(picked: mx.array, batch: dict[str, mx.array], lambda_: float = 0.1, nll_on_prompt: bool = False,
                     num_tokens=None, num_pairs=None) -> tuple[mx.array, dict[str, mx.array]]:
    """`orpo_loss` of a "prefix" batch (orpo_local.batching) from the (K,) log-probs of its targets: each answer
    token counts for its row's mean, and the chosen answers (with nll_on_prompt also the prompts) for the NLL.
    Padded targets (segment PAD) count nowhere."""
    seg, n = batch["target_segment"], batch["answer_len"]
    b = n.shape[0] // 2
    answer = (seg == CHOSEN) | (seg == REJECTED)
    logps = mx.zeros(n.shape, dtype=picked.dtype).at[batch["target_row"]].add(mx.where(answer, picked, 0.0)) / n
    nll_sum = mx.where((seg == CHOSEN) | (seg == PROMPT), picked, 0.0).sum()
    nll_count = n[:b].sum() + ((batch["prompt_len"] - 1).sum() if nll_on_prompt else 0)
    return orpo_terms(logps[:b], logps[b:], nll_sum, nll_count, lambda_, b, num_tokens, num_pairs)


def orpo_terms(c: mx.array, r: mx.array, nll_sum: mx.array, nll_count, lambda_: float, b: int,
               num_tokens=None, num_pairs=None) -> tuple[mx.array, dict[str, mx.array]]:
    """The loss from the (B,) mean log-probs of the chosen and rejected answers and the summed NLL
    log-probs; num_tokens / num_pairs: the whole window's normalisers (default: this batch's)."""
    n_tok = nll_count if num_tokens is None else num_tokens
    n_pairs = b if num_pairs is None else num_pairs
    nll = -nll_sum / n_tok
    log_odds = (c - log1mexp(c)) - (r - log1mexp(r))
    log_sig = -mx.logaddexp(mx.zeros_like(log_odds), -log_odds)
    loss = nll - lambda_ * log_sig.sum() / n_pairs
    metrics = orpo_metrics(loss, nll, log_sig, log_odds, c, r, (c > r).astype(c.dtype).sum(), lambda_, n_pairs)
    metrics = {k: mx.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics


def to_mx(batch: Batch, nll_on_prompt: bool = False, bucket_targets: bool = False) -> dict[str, mx.array]:
    """NumPy batch -> MLX arrays, plus `targets`: flat indices into (2B, T-1) of the next-token
    predictions the loss reads (MLX has no boolean indexing, so they are found in NumPy).

    bucket_targets pads `targets` with index 0 up to a multiple of 1/TARGET_BUCKETS of the grid and adds
    `target_mask` (False on the padding), so that batches of one width need at most TARGET_BUCKETS compiled
    graphs, at the price of at most 1/TARGET_BUCKETS of the grid's vocabulary projections."""
    if "prompt_ids" in batch:
        return prefix_to_mx(batch, nll_on_prompt, bucket_targets)
    out = {k: mx.array(v) for k, v in batch.items()}
    mask = batch["response_mask"][:, 1:].astype(bool)
    if nll_on_prompt:
        b = len(mask) // 2
        mask[:b] |= batch["attention_mask"][:b, 1:].astype(bool)
    targets = np.flatnonzero(mask).astype(np.int32)
    if bucket_targets:
        step = -(-mask.size // TARGET_BUCKETS)
        size = min(-(-len(targets) // step) * step, mask.size)
        out["target_mask"] = mx.array(np.arange(size) < len(targets))
        targets = np.pad(targets, (0, size - len(targets)))
    out["targets"] = mx.array(targets)
    return out


def prefix_to_mx(batch: Batch, nll_on_prompt: bool = False, bucket_targets: bool = False) -> dict[str, mx.array]:
    """A "prefix" batch as MLX arrays, with its targets (orpo_local.batching.prefix_targets) and the answers'
    attention mask over [prompt keys][answer keys] (2B, 1, A, P + A): a prompt's real tokens, then causal.
    bucket_targets pads the targets (segment PAD) as `to_mx` does, to a multiple of 1/TARGET_BUCKETS of the
    hidden states."""
    t = prefix_targets(batch, nll_on_prompt)
    (b, width_p), (rows, width_a) = batch["prompt_ids"].shape, batch["answer_ids"].shape
    if bucket_targets:
        grid = b * width_p + rows * width_a
        step = -(-grid // TARGET_BUCKETS)
        size = min(-(-len(t["src"]) // step) * step, grid)
        t = {k: np.pad(v, (0, size - len(v))) for k, v in t.items()}  # segment 0: PAD
    sees_prompt = np.arange(width_p)[None, :] < np.tile(batch["prompt_len"], 2)[:, None]  # (2B, P)
    causal = np.tri(width_a, dtype=bool)  # (A, A)
    attention = np.concatenate([np.broadcast_to(sees_prompt[:, None, None, :], (rows, 1, width_a, width_p)),
                                np.broadcast_to(causal[None, None], (rows, 1, width_a, width_a))], axis=-1)
    out = {k: mx.array(v) for k, v in batch.items()}
    out.update(answer_attention=mx.array(attention), **{f"target_{k}": mx.array(v) for k, v in t.items()})
    return out


# Architectures whose logits are exactly the (tied) output projection of the last hidden state.
PLAIN_LOGITS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "starcoder2"}


def _head(model):
    """(decoder, output projection) for PLAIN_LOGITS models, else None (full forward pass)."""
    if getattr(model, "model_type", None) not in PLAIN_LOGITS or not hasattr(model, "model"):
        return None
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model, model.model.embed_tokens.as_linear
    return model.model, model.lm_head


# Float32 logits computed at once, at most (bytes): above it the vocabulary projection runs in chunks, each
# recomputed in the backward pass (mx.checkpoint), so peak memory stays flat however large the vocabulary is.
LOGITS_BUDGET = 256 << 20


def head_logps(head, hidden: mx.array, tokens: mx.array, vocab: int, budget: int | None = None) -> mx.array:
    """(K,) log P(tokens | hidden (K, H)) through the (frozen) output layer, never holding more than `budget`
    (default LOGITS_BUDGET) bytes of (K, V) logits."""
    budget = LOGITS_BUDGET if budget is None else budget
    def logps(h, y):
        logits = _work(head(h))
        y = mx.stop_gradient(y)  # ids: mx.checkpoint differentiates every input
        return mx.take_along_axis(logits, y[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)

    chunk = max(1, budget // (4 * vocab))
    if hidden.shape[0] <= chunk:
        return logps(hidden, tokens)
    step = mx.checkpoint(logps)
    return mx.concatenate([step(hidden[i: i + chunk], tokens[i: i + chunk]) for i in range(0, hidden.shape[0], chunk)])


def _vocab(decoder) -> int:
    return decoder.embed_tokens.weight.shape[0]


def model_token_logps(model, batch: dict[str, mx.array]) -> mx.array:
    """(2B, T-1) token log-probs, projecting to the vocabulary only at `batch["targets"]`: prompt and
    pad positions skip the (H x V) head and no (2B, T, V) logits exist. mlx-lm models take ids only:
    with right padding the causal mask keeps real tokens from seeing pads, and pads are never targets."""
    ids, parts = batch["input_ids"], _head(model)
    if parts is None:
        return token_logps(model(ids), ids)
    decoder, head = parts
    hidden = decoder(ids)[:, :-1]  # (2B, T-1, H)
    n, t, h = hidden.shape
    idx = batch["targets"]
    picked = head_logps(head, hidden.reshape(n * t, h)[idx], ids[:, 1:].reshape(-1)[idx], _vocab(decoder))  # (K,)
    if "target_mask" in batch:  # bucketed padding: repeats of index 0 that must add nothing there
        picked = mx.where(batch["target_mask"], picked, 0.0)
    return mx.zeros((n * t,), dtype=picked.dtype).at[idx].add(picked).reshape(n, t)


class PrefixCache:
    """One layer's keys and values of the prompts, played to an mlx-lm attention layer as its KV cache (the
    `offset`, `update_and_fetch`, `make_mask` it calls): the prompt pass stores them; the answer pass puts them
    in front of both answers' own, its positions starting at each prompt's length (RoPE takes one offset per
    row) under a mask that hides the prompts' padding. They stay arrays of the one graph, so the answers'
    gradients flow back into the prompt pass."""

    def __init__(self):
        self.keys = self.values = None
        self.offset, self.mask = 0, "causal"

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:  # the prompts (B, heads, P, D)
            self.keys, self.values = keys, values
            return keys, values
        both = [self.keys, self.keys], [self.values, self.values]  # the chosen rows, then the rejected ones
        return (mx.concatenate([mx.concatenate(both[0]), keys], axis=2),
                mx.concatenate([mx.concatenate(both[1]), values], axis=2))

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        if isinstance(self.mask, str) and return_array:
            from mlx_lm.models.base import create_causal_mask

            return create_causal_mask(n)
        return self.mask


def prefix_token_logps(model, batch: dict[str, mx.array]) -> mx.array:
    """(K,) log-probs of a "prefix" batch's targets: the prompts pass once through the decoder, each layer
    keeping its keys and values (PrefixCache); the 2B answers pass after them. Only the targets' hidden
    states are projected to the vocabulary."""
    decoder, head = _head(model)
    caches = [PrefixCache() for _ in decoder.layers]
    h_prompt = decoder(batch["prompt_ids"], cache=caches)  # (B, P, H)
    offset = mx.concatenate([batch["prompt_len"], batch["prompt_len"]])
    for c in caches:
        c.offset, c.mask = offset, batch["answer_attention"]
    h_answer = decoder(batch["answer_ids"], cache=caches)  # (2B, A, H)
    h = h_prompt.shape[-1]
    hidden = mx.concatenate([h_prompt.reshape(-1, h), h_answer.reshape(-1, h)])[batch["target_src"]]  # (K, H)
    return head_logps(head, hidden, batch["target_token"], _vocab(decoder))


# Architectures whose mlx-lm attention reads the cache's offset, update_and_fetch and make_mask as PrefixCache
# plays them, with logits a plain projection: they run "prefix" batches. A sliding-window layer keeps the plain layout.
PREFIX_CACHE = {"llama", "qwen2", "qwen3", "olmo2", "phi3", "starcoder2"}


def pick_layout(model, wanted: bool) -> str:
    """The batch layout this model runs: "prefix" where PREFIX_CACHE allows it (and prefix sharing is on)."""
    ok = (wanted and getattr(model, "model_type", None) in PREFIX_CACHE and _head(model) is not None
          and not any(getattr(layer, "use_sliding", False) for layer in model.layers))
    return "prefix" if ok else "plain"


def model_loss(model, batch: dict[str, mx.array], lambda_: float, nll_on_prompt: bool, num_tokens, num_pairs):
    """Forward pass + ORPO loss for one micro-batch made by `to_mx(batch, nll_on_prompt)`, in either layout."""
    if "prompt_ids" in batch:
        return prefix_orpo_loss(prefix_token_logps(model, batch), batch, lambda_, nll_on_prompt, num_tokens, num_pairs)
    return orpo_loss_from_token_logps(model_token_logps(model, batch), batch, lambda_, nll_on_prompt, num_tokens, num_pairs)


def clip_grads(grads, max_norm: float):
    """(grads scaled to a global norm of at most max_norm, or as they are when max_norm <= 0; their global norm)."""
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))


# ----------------------------------------------------------------------------- the backend

def mlx_model_config(path: str) -> dict:
    """Config overrides so mlx-lm reads folders written by transformers 5, which moved the RoPE settings
    into `rope_parameters` (mlx-lm would silently use its own defaults: Llama's theta 10000, no scaling,
    every dimension rotary). `save_merged` writes the same keys into the exported config."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        return {}
    cfg = json.loads(cfg_file.read_text())
    out = rope_args(cfg)
    text = cfg.get("text_config")
    if isinstance(text, dict) and (lifted := rope_args(text)):
        out["text_config"] = {**text, **lifted}  # mlx-lm's config.update is shallow
    return out


def rope_args(cfg: dict) -> dict:
    """cfg's `rope_parameters` as the keys its mlx-lm ModelArgs takes: rope_theta, rope_scaling and
    partial_rotary_factor from the global (full-attention) entry, rope_local_base_freq from the sliding one.
    transformers 5 writes one dict ({"rope_type": "llama3", "rope_theta": ..., "factor": ...}) or one per
    layer type (Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}); models whose ModelArgs
    read `rope_parameters` themselves get nothing."""
    from mlx_lm.utils import _get_classes  # the lookup mlx_lm.load does

    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "model_type" not in cfg:
        return {}
    try:
        fields = inspect.signature(_get_classes(cfg)[1]).parameters
    except ValueError:  # a model type mlx-lm lacks: its load says so
        return {}
    if "rope_parameters" in fields:
        return {}
    by_layer = all(isinstance(v, dict) for v in rope.values())
    full = (rope.get("full_attention") or {}) if by_layer else rope
    sliding = (rope.get("sliding_attention") or {}) if by_layer else {}
    rope_type = full.get("rope_type", full.get("type", "default"))
    scaling = {k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")}
    lifted = {
        "rope_theta": full.get("rope_theta"),
        # mlx-lm models read the type as "type" (Phi-3) or "rope_type" (Llama 3 via initialize_rope)
        "rope_scaling": None if rope_type == "default" else {**scaling, "rope_type": rope_type, "type": rope_type},
        "partial_rotary_factor": full.get("partial_rotary_factor"),
        "rope_local_base_freq": sliding.get("rope_theta"),
    }
    return {k: v for k, v in lifted.items() if v is not None and k in fields}


def lora_keys(model, targets: list[str]) -> list[str]:
    """Module paths inside one transformer block whose last name is a LoRA target."""
    return sorted(name for name, _ in model.layers[0].named_modules() if name.rsplit(".", 1)[-1] in set(targets))


class MLXBackend:
    """Holds model, optimiser, step count and the (compiled) step functions; the math is in the functions above."""

    name = "mlx"
    pad_to = 32  # repeated shapes let MLX reuse compiled graphs and buffers (on Apple GPUs; see __init__)
    layout = "plain"  # until a model is loaded: then pick_layout's choice

    def __init__(self, compile: bool | None = None):
        # None: on unless ORPO_LOCAL_MLX_COMPILE=0
        self.compile = os.environ.get(COMPILE_ENV, "1").strip() != "0" if compile is None else compile
        self.model = None
        self.tokenizer = None
        self.optimizer = None
        self.seed = 0
        self.steps = 0
        self.lora_config: dict = {}
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        if self.device == "cpu":  # compiling gains nothing measurable there, padding costs: 8 is 12% faster a step than 32
            self.pad_to = 8

    def load(self, model: ModelConfig, lora: LoraConfig | None, seed: int, adapter=None, trainable: bool = True) -> ModelInfo:
        from mlx_lm import load as mlx_load
        from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
        from orpo_local.models import resolve_model

        advice = openblas.advice()
        if advice:
            print(f"note: {advice}", file=sys.stderr)
        path = resolve_model(model.name, progress=lambda m: print(m, file=sys.stderr))
        net, wrapper = mlx_load(path, model_config=mlx_model_config(path))
        self.path = path
        self.tokenizer = wrapper._tokenizer  # the Hugging Face tokenizer inside mlx-lm's wrapper
        dtype = self._dtype(model.dtype)
        if dtype is not None:
            net.set_dtype(dtype)
        quantized = model.load_in_4bit or any(isinstance(m, nn.QuantizedLinear) for _, m in net.named_modules())
        if model.load_in_4bit and not any(isinstance(m, nn.QuantizedLinear) for _, m in net.named_modules()):
            nn.quantize(net, group_size=model.quant_group_size, bits=model.quant_bits,
                        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % model.quant_group_size == 0)
        net.freeze()
        self.seed = seed
        mx.random.seed(seed)  # LoRA init
        if adapter is not None:
            load_adapters(net, str(adapter))
            self.lora_config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        elif lora is not None:
            n_layers = len(net.layers) if lora.num_layers == -1 else min(lora.num_layers, len(net.layers))
            params = {"rank": lora.rank, "scale": lora.alpha / lora.rank, "dropout": lora.dropout,
                      "keys": lora_keys(net, lora.target_modules)}
            linear_to_lora_layers(net, n_layers, params)
            self.lora_config = {"fine_tune_type": "lora", "num_layers": n_layers, "lora_parameters": params}
        if not trainable:
            net.freeze()
        net.train(trainable)  # inference loads must not apply LoRA dropout
        mx.eval(net.parameters())
        self.model = net
        self.layout = pick_layout(net, model.prefix_sharing)
        self._build_forward()
        n_train = sum(v.size for _, v in tree_flatten(net.trainable_parameters()))
        n_params = count_parameters(net)
        return ModelInfo("mlx", path, self.device, str(self._param_dtype()).replace("mlx.core.", ""), quantized, n_params, n_train,
                         batch_layout=self.layout)

    def _dtype(self, name: str):
        if name == "auto":
            return mx.float32 if self.device == "cpu" else None  # keep the checkpoint's dtype on Apple GPUs
        return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[name]

    def _param_dtype(self):
        return next(v.dtype for _, v in tree_flatten(self.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))

    def init_optimizer(self, optim_cfg: OptimConfig) -> None:
        # bias_correction=True: the same update rule as torch.optim.AdamW
        self.optimizer = optim.AdamW(learning_rate=optim_cfg.learning_rate, weight_decay=optim_cfg.weight_decay, bias_correction=True)
        self.optimizer.init(self.model.trainable_parameters())
        self.steps = 0
        mx.reset_peak_memory()

    def _jit(self, fn, state=None, new_state=None):
        """fn compiled as mlx-lm compiles its step (reading `state`, writing `new_state`), or fn itself when
        compiling is off. A graph is traced once per input shape and Python constant, then reused."""
        return mx.compile(fn, inputs=state, outputs=new_state) if self.compile else fn

    def _build_forward(self) -> None:
        """The gradient and metrics of one micro-batch (train mode: LoRA dropout advances mx.random's state)
        and the metrics alone (eval mode). The normalisers and lambda come in as arrays, so one graph
        serves every accumulation window; a Python flag such as the train/eval mode is fixed at tracing,
        hence one function per mode."""
        model = self.model
        value_and_grad = nn.value_and_grad(model, model_loss)

        def grad(batch, lambda_, nll_on_prompt, n_tok, n_pairs):
            (_, metrics), g = value_and_grad(model, batch, lambda_, nll_on_prompt, n_tok, n_pairs)
            return metrics, g

        def metrics(batch, lambda_, nll_on_prompt, n_tok, n_pairs):
            return model_loss(model, batch, lambda_, nll_on_prompt, n_tok, n_pairs)[1]

        # model.state is an output too: nn.value_and_grad leaves the traced weights in the model, and the
        # compiled function must put real arrays back (mlx-lm's step captures it the same way)
        state = [model.state, mx.random.state]
        self._grad = self._jit(grad, state, state)
        self._metrics = self._jit(metrics, [model.state])
        self._clip = self._jit(clip_grads)

    def train_step(self, micro_batches: list[Batch], learning_rate: float, orpo: OrpoConfig, max_grad_norm: float) -> dict[str, float]:
        mx.random.seed(self.seed * 1_000_003 + self.steps)  # dropout depends on (seed, step) only: exact resume
        grads, totals, tokens = self.window_grads(micro_batches, orpo)
        grads, norm = self._clip(grads, max_grad_norm)
        out = {k: v.item() for k, v in totals.items()}
        out.update(grad_norm=norm.item(), tokens=float(tokens))
        if math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]):
            self.optimizer.learning_rate = mx.array(learning_rate, dtype=mx.float32)
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
        self.steps += 1
        return out

    def window_grads(self, micro_batches: list[Batch], orpo: OrpoConfig):
        """(gradient, summed metrics, real tokens) of one accumulation window in train mode (LoRA dropout on):
        each micro-batch normalised by the whole window's NLL tokens and pairs, so they add up to one big batch.

        Under mlx.launch each process holds its share of the window (orpo_local.distributed): the normalisers
        come from the whole window, and the gradient, metrics and tokens are summed over the processes, so every
        process ends with those of the whole window, as one process would (and clips the same global gradient)."""
        self.model.train()
        lambda_, n_tok, n_pairs = self._scalars(micro_batches, orpo)
        grads, totals, tokens = None, {}, 0
        for mb in micro_batches:
            metrics, g = self._grad(to_mx(mb, orpo.nll_on_prompt, self.compile), lambda_, orpo.nll_on_prompt, n_tok, n_pairs)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            totals = metrics if not totals else {k: totals[k] + v for k, v in metrics.items()}
            mx.eval(grads, totals)
            tokens += real_tokens(mb)
        if _group() is None:
            return grads, totals, tokens
        if grads is None:  # a share with no micro-batch (a last window shorter than the processes) adds zeros
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        sums = _global_sum([totals[k].item() if totals else 0.0 for k in METRIC_NAMES] + [tokens])
        totals = {k: mx.array(v, dtype=mx.float32) for k, v in zip(METRIC_NAMES, sums[:-1])}  # float32, as one process's
        return _global_sum_tree(grads), totals, int(sums[-1])

    @staticmethod
    def _scalars(batches: list[Batch], orpo: OrpoConfig) -> tuple[mx.array, mx.array, mx.array]:
        """lambda and the window's normalisers (every process's share of it together) as float32 arrays: inputs of
        the compiled graph, not constants in it."""
        sizes = _global_sum(window_sizes(batches, orpo.nll_on_prompt))
        return tuple(mx.array(float(v), dtype=mx.float32) for v in (orpo.lambda_, *sizes))

    def evaluate(self, batches: list[Batch], orpo: OrpoConfig) -> dict[str, float]:
        """Metrics of `batches` as one window. Under mlx.launch every process is given all of them and scores its
        share (batches r, r + W, ...) with the whole list's normalisers, and the sums are added over the processes:
        the metrics of one process (the same sums in another order), in 1/W of the time."""
        self.model.eval()
        mine = world().share(batches)
        lambda_, n_tok, n_pairs = self._scalars(mine, orpo)
        totals: dict[str, float] = {}
        for mb in mine:
            metrics = self._metrics(to_mx(mb, orpo.nll_on_prompt, self.compile), lambda_, orpo.nll_on_prompt, n_tok, n_pairs)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.item()
        if _group() is None:
            return totals
        return dict(zip(METRIC_NAMES, _global_sum([totals.get(k, 0.0) for k in METRIC_NAMES])))

    def generate(self, prompt_ids, max_tokens, temperature, top_p, stop_ids, seed=None) -> Iterator[int]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        self.model.eval()
        if seed is not None:
            mx.random.seed(seed)
        sampler = make_sampler(temp=max(temperature, 0.0), top_p=top_p if 0 < top_p < 1 else 0.0)
        for token, _ in generate_step(mx.array(prompt_ids), self.model, max_tokens=max_tokens, sampler=sampler):
            token = int(token)
            yield token
            if token in stop_ids:
                return

    def save_adapter(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v for k, v in tree_flatten(self.model.trainable_parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
        mx.save_safetensors(str(path / "adapters.safetensors"), weights)
        (path / "adapter_config.json").write_text(json.dumps(self.lora_config, indent=2))

    def save_merged(self, path: Path) -> None:
        """mlx-lm's fuse: each LoRA layer folded back into its linear layer, saved as an mlx-lm model folder."""
        from mlx_lm.utils import load_config, save_config, save_model

        fused = [(name, m.fuse()) for name, m in self.model.named_modules() if hasattr(m, "fuse")]
        if fused:
            self.model.update_modules(tree_unflatten(fused))
        path = Path(path)
        save_model(path, self.model, donate_model=False)
        config = {**load_config(Path(self.path)), **mlx_model_config(self.path)}
        save_config(config, config_path=path / "config.json")
        self.tokenizer.save_pretrained(str(path))

    def save_state(self, path: Path) -> None:
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(Path(path) / "optimizer.safetensors"), state)
        (Path(path) / "mlx_state.json").write_text(json.dumps({"steps": self.steps, "seed": self.seed}))

    def load_state(self, path: Path) -> None:
        loaded = mx.load(str(Path(path) / "optimizer.safetensors"))
        self.optimizer.state = tree_unflatten(list(loaded.items()))
        meta = json.loads((Path(path) / "mlx_state.json").read_text())
        self.steps, self.seed = meta["steps"], meta["seed"]
        mx.eval(self.optimizer.state)

    def peak_memory_mb(self) -> float:
        return mx.get_peak_memory() / 2**20


def count_parameters(net) -> int:
    """Model parameters; a quantised weight packs 32 / bits values per uint32 (scales/biases not counted)."""
    bits = {name: m.bits for name, m in net.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    total = 0
    for key, value in tree_flatten(net.parameters()):
        owner, leaf = key.rsplit(".", 1)
        if owner not in bits:
            total += value.size
        elif leaf == "weight":
            total += value.size * 32 // bits[owner]
    return total


# ----------------------------------------------------------------------------- several processes (mlx.launch)

# orpo_metrics' names in its order: a process with no batch of its own adds a zero for each
METRIC_NAMES = tuple(orpo_metrics(*[np.zeros(1)] * 7, lambda_=0.0, n_pairs=1))


def _group():
    """mx.distributed's group when this process is one of several (orpo_local.distributed.init_mlx joined it), else None."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def _global_sum(values) -> list[float]:
    """`values` summed over every process in float64, on the CPU as mlx-lm sums its losses (unchanged in one process)."""
    if _group() is None:
        return [float(v) for v in values]
    return mx.distributed.all_sum(mx.array([float(v) for v in values], dtype=mx.float64), stream=mx.cpu).tolist()


def _global_sum_tree(tree):
    """A gradient tree summed over every process in one flat float32 buffer (one all_sum, as torch's all_reduce_grads)."""
    flat = tree_flatten(tree)
    summed = mx.distributed.all_sum(mx.concatenate([g.reshape(-1).astype(mx.float32) for _, g in flat]), stream=mx.cpu)
    ends = np.cumsum([g.size for _, g in flat])[:-1].tolist()
    parts = mx.split(summed, ends) if ends else [summed]
    return tree_unflatten([(k, p.reshape(g.shape).astype(g.dtype)) for (k, g), p in zip(flat, parts)])
