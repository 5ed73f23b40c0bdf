"""orpo_local against its peers, side by side: one command, one run, one table.

    python bench/compare.py                                  # all three comparisons, default workload
    python bench/compare.py --long-prompt                    # multi-turn rows, prompt >= 3x the answers
    python bench/compare.py --only torch --steps 3 --repeats 1 --pairs 16 --batch-size 2 --max-length 128
    python bench/compare.py --out docs/benchmarks.md         # also write the table into that file's section

The comparisons (`--only torch,trainer,mlx` picks some), all on the same model folder, the same rows,
the same LoRA (rank 8, alpha 16, the 7 linear projections of every block), batch and max length:

  torch    our torch backend's `train_step` against TRL's `ORPOTrainer` loss path (what its Trainer
           does per step: `get_batch_loss_metrics`, backward, clip, AdamW) on the same token ids,
           base weights, seeded LoRA init and batches, with nll_on_prompt=True so the objectives are
           equal: in the fastest dtype on the device (pick_dtype "auto") and in float32. The first
           steps' losses are printed side by side.
  trainer  the whole `orpo_local.train()` (val_fraction 0: no evaluation) against TRL's whole
           `ORPOTrainer.train()` (LoRA through `peft_config`, no evaluation, saving or logging), each
           tokenising the rows its own way; plus one run of ours with the default evaluation to show
           what it costs. Users run trainers, not step functions: a step's time is the rest of the call
           after the first step over the steps after it (logging, the final save and, in the evaluation
           run, the last evaluation count); the time to the first step is printed below the table.
  mlx      our MLX backend's `train_step` against mlx-lm-lora's ORPO trainer (`train_orpo`, what
           `mlx_lm_lora.train --train-mode orpo` runs, drawing a random batch each step), both in
           float32 with OpenBLAS preloaded.
           On Linux its Metal-only `mx.device_info()["max_recommended_working_set_size"]` and
           `mx.set_wired_limit` are stubbed.

Each side runs in its own process (peak memory is its own), `--repeats` times, alternating which
side goes first. Reported: the median over the runs with its spread ((max - min) / median), of the
steps after the first `--warmup`:
  pairs/s, tokens/s  tokens of the pairs as two sequences (prompt counted twice), no padding, in each
                     side's own tokenisation;
  peak MB            RSS on CPU, torch.cuda.max_memory_allocated on CUDA (after the model has loaded),
                     MLX's own peak on Apple GPUs;
  MFU                model FLOP/s over the matmul peak measured in the same processes (the best of a
                     (tokens x hidden) @ (hidden x intermediate) and a square 2048 product, in the
                     dtype used). Model FLOPs count the tokens each side feeds the model (one prompt
                     per pair in orpo_local's shared and prefix layouts): 4 x the matmul parameters (blocks and
                     output layer) per token for LoRA, forward 2N plus backward 2N for the activations
                     with frozen weights, plus attention, 12 x (heads x head_dim) per causal
                     (query, key) pair and layer;
  ours/peer          the ratio of pairs/s, run by run (>1: orpo_local is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from torch_vs_trl import to_trl  # bench/: orpo_local's batch as TRL's per-side tensors

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 8, 16
COMPARISONS = ("torch", "trainer", "mlx")
SIDE_NAMES = {"torch_step": "orpo_local", "trl_step": "TRL ORPOTrainer", "ours_trainer": "orpo-local train",
              "ours_trainer_eval": "orpo-local train, default eval", "trl_trainer": "TRL ORPOTrainer.train()",
              "mlx_step": "orpo_local MLX", "mlx_lm_lora": "mlx-lm-lora ORPO"}
SECTION_START, SECTION_END = "<!-- bench/compare.py {key} -->", "<!-- /bench/compare.py {key} -->"


# ----------------------------------------------------------------------------- model FLOPs (framework-free)

def model_shape(model_dir: str) -> dict:
    """The dimensions the FLOP count needs, from the folder's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {"layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"],
            "heads": heads, "kv_heads": cfg.get("num_key_value_heads", heads), "head_dim": head_dim, "vocab": cfg["vocab_size"]}


def matmul_params(shape: dict) -> int:
    """Weights of the matrix products a token goes through: q, k, v, o, gate, up, down per block, and the output layer."""
    h, q, kv = shape["hidden"], shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    block = h * q + 2 * h * kv + q * h + 3 * h * shape["intermediate"]
    return shape["layers"] * block + h * shape["vocab"]


def pair_flops(prompt: int, chosen: int, rejected: int, shape: dict, shared: bool = False) -> float:
    """Model FLOPs of one pair's forward and backward with LoRA (frozen weights: no weight gradients).

    plain: two sequences, prompt + chosen and prompt + rejected. shared: one [prompt][chosen][rejected]
    row, each answer attending to the prompt and to itself (orpo_local.batching)."""
    p, c, r = prompt, chosen, rejected
    if shared:
        tokens = p + c + r
        qk = p * (p + 1) / 2 + c * p + c * (c + 1) / 2 + r * p + r * (r + 1) / 2
    else:
        tokens = 2 * p + c + r
        qk = (p + c) * (p + c + 1) / 2 + (p + r) * (p + r + 1) / 2
    attention = 12 * shape["heads"] * shape["head_dim"] * shape["layers"] * qk  # QK^T and AV: 4d forward, 8d backward
    return 4 * matmul_params(shape) * tokens + attention


# ----------------------------------------------------------------------------- workloads (the driver's side)

def load_rows(data: str, n_pairs: int):
    from orpo_local.data import load_pairs

    return load_pairs(data)[:n_pairs]


def long_prompt_rows(pairs, encoder, n_pairs: int, max_length: int, ratio: float = 3.0, tries: int = 64):
    """Multi-turn rows whose prompt is at least `ratio` x the mean answer: each row gets earlier pairs (user
    prompt, chosen answer) as earlier turns, nearest first, skipping a turn that would not fit, until it is;
    prompt + longer answer stay within `max_length` in `encoder`'s tokens, so orpo_local truncates nothing.
    Rows that get there within `tries` earlier pairs are kept."""
    from orpo_local.data import PreferencePair
    from orpo_local.tokenization import tokenize_pairs

    out = []
    for i, pair in enumerate(pairs):
        history: list[dict] = []
        for j in range(i - 1, i - 1 - min(tries, len(pairs) - 1), -1):
            earlier = pairs[j % len(pairs)]
            turns = [*earlier.prompt, {"role": "assistant", "content": earlier.chosen}] + history
            row = PreferencePair([*turns, *pair.prompt], pair.chosen, pair.rejected, pair.system, meta=dict(pair.meta))
            tokens, _ = tokenize_pairs([row], encoder, 10**6, 10**6 - 1)
            if not tokens or tokens[0].length > max_length:
                continue
            tok = tokens[0]
            history = turns
            if len(tok.prompt) >= ratio * (len(tok.chosen) + len(tok.rejected)) / 2:
                out.append(row)
                break
        if len(out) == n_pairs:
            break
    if len(out) < n_pairs:
        raise SystemExit(f"only {len(out)} long-prompt rows fit max_length {max_length}; raise --max-length or lower --pairs")
    return out


def write_rows(pairs, path: Path) -> None:
    """The rows in the conversational format, which orpo_local, TRL and mlx-lm-lora all read."""
    path.write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")


# ----------------------------------------------------------------------------- pieces the workers share

def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def our_tokens(tokenizer, data: str, max_length: int):
    """The rows as orpo_local tokenises them (the default max_prompt_length ratio: half of max_length)."""
    from orpo_local.data import load_pairs
    from orpo_local.tokenization import ChatEncoder, tokenize_pairs

    encoder = ChatEncoder(tokenizer)
    pairs, _ = tokenize_pairs(load_pairs(data), encoder, max_length, max_length // 2)
    return encoder, pairs


def step_batches(pairs, batch_size: int, steps: int, seed: int) -> list[list]:
    """`steps` length-bucketed batches of pairs in a seeded order, the same for both sides of a comparison."""
    from orpo_local.batching import bucket, epoch_order

    groups = bucket(pairs, batch_size)
    order = [int(k) for epoch in range(steps // len(groups) + 1) for k in epoch_order(len(groups), seed, epoch)]
    return [[pairs[i] for i in groups[k]] for k in order[:steps]]


def collate_as(pairs, pad_id: int, pad_to: int, layout: str):
    from orpo_local.batching import collate

    return collate(pairs, pad_id, pad_to) if layout == "plain" else collate(pairs, pad_id, pad_to, layout=layout)


def lengths_of(pairs) -> list[list[int]]:
    return [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs]


def time_best(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def torch_matmul_peak(dtype, device: str, shape: dict, tokens: int) -> float:
    """GFLOP/s: the best of a model-shaped and a square 2048 matrix product in `dtype`."""
    import torch

    best = 0.0
    for m, k, n in ((max(tokens, 64), shape["hidden"], shape["intermediate"]), (2048, 2048, 2048)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)

        def product():
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * m * k * n / time_best(product) / 1e9)
    return best


def mlx_matmul_peak(dtype, shape: dict, tokens: int) -> float:
    import mlx.core as mx

    best = 0.0
    for m, k, n in ((max(tokens, 64), shape["hidden"], shape["intermediate"]), (2048, 2048, 2048)):
        a, b = mx.random.normal((m, k)).astype(dtype), mx.random.normal((k, n)).astype(dtype)
        mx.eval(a, b)
        best = max(best, 2 * m * k * n / time_best(lambda: mx.eval(a @ b)) / 1e9)
    return best


def typical_tokens(step_lengths: list, shared: bool) -> int:
    """Tokens of a median step, the row count of the model-shaped peak product."""
    per_step = [sum((p + c + r) if shared else (2 * p + c + r) for p, c, r in step) for step in step_lengths]
    return int(statistics.median(per_step)) if per_step else 512


def torch_timer(device: str):
    import torch

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    return now


def torch_peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()


def reset_torch_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- workers: one side each, in its own process

def worker_backend_step(spec: dict, name: str) -> dict:
    """orpo_local's `name` backend ("torch" or "mlx"), step by step on our batches, in its batch layout."""
    from orpo_local.backends import get_backend
    from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig

    backend = get_backend(name)
    info = backend.load(ModelConfig(name=spec["model"], backend=name, dtype=spec["dtype"]), LoraConfig(), spec["seed"])
    encoder, pairs = our_tokens(backend.tokenizer, spec["data"], spec["max_length"])
    layout, pad_to = getattr(backend, "layout", "plain"), getattr(backend, "pad_to", 32)
    groups = step_batches(pairs, spec["batch_size"], spec["steps"], spec["seed"])
    backend.init_optimizer(OptimConfig(learning_rate=spec["lr"]))
    orpo = OrpoConfig(lambda_=spec["lambda_"], nll_on_prompt=True)
    now = torch_timer(backend.device) if name == "torch" else time.perf_counter  # MLX: train_step returns floats, so it has run
    times, losses = [], []
    for group in groups:
        batch = collate_as(group, encoder.pad_id, pad_to, layout)
        tic = now()
        losses.append(backend.train_step([batch], spec["lr"], orpo, 1.0)["loss"])
        times.append(now() - tic)
    step_lengths = [lengths_of(g) for g in groups]
    shape, tokens = model_shape(info.model_path), typical_tokens(step_lengths, layout != "plain")
    if name == "torch":
        peak_mb, gflops = torch_peak_mb(backend.device), torch_matmul_peak(backend.model.dtype, backend.device, shape, tokens)
    else:
        peak_mb, gflops = mlx_peak_mb(), mlx_matmul_peak(mlx_param_dtype(backend.model), shape, tokens)
    return {"device": backend.device, "dtype": info.dtype, "layout": layout, "times": times, "losses": losses,
            "step_lengths": step_lengths, "peak_mb": peak_mb, "framework": name, "peak_gflops": gflops}


def load_trl_side(spec: dict):
    """The model as our backend loads it (same weights, same seeded LoRA init), for TRL's step path."""
    import torch
    from orpo_local.backends.torch_backend import pick_device, pick_dtype
    from orpo_local.models import resolve_model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, device = resolve_model(spec["model"], progress=lambda m: None), pick_device()
    dtype = pick_dtype(spec["dtype"], device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.config.use_cache = False
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    return path, device, dtype, model, AutoTokenizer.from_pretrained(path)


def worker_trl_step(spec: dict) -> dict:
    """TRL's ORPOTrainer per step: get_batch_loss_metrics -> backward -> clip -> AdamW, on our batches."""
    import torch
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    path, device, dtype, model, tokenizer = load_trl_side(spec)
    encoder, pairs = our_tokens(tokenizer, spec["data"], spec["max_length"])
    groups = step_batches(pairs, spec["batch_size"], spec["steps"], spec["seed"])
    args = ORPOConfig(output_dir=spec["scratch"], beta=spec["lambda_"], report_to=[], padding_value=encoder.pad_id, bf16=False,
                      gradient_checkpointing=False, use_cpu=device == "cpu")
    trainer = ORPOTrainer(model=model, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    params = [p for p in model.parameters() if p.requires_grad]
    reset_torch_peak(device)
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    now, times, losses = torch_timer(device), [], []
    for group in groups:
        batch = to_trl(collate_as(group, encoder.pad_id, 1, "plain"), device)  # TRL's collator pads to the longest
        tic = now()
        model.train()
        loss, _ = trainer.get_batch_loss_metrics(model, batch, "train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(now() - tic)
    step_lengths = [lengths_of(g) for g in groups]
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "layout": "plain", "times": times, "losses": losses,
            "step_lengths": step_lengths, "peak_mb": torch_peak_mb(device), "framework": "torch",
            "peak_gflops": torch_matmul_peak(dtype, device, model_shape(path), typical_tokens(step_lengths, False))}


def worker_ours_trainer(spec: dict, evaluate: bool = False) -> dict:
    """The whole `orpo_local.train()`; val_fraction 0 (no evaluation) unless `evaluate` keeps the defaults."""
    from orpo_local import TrainConfig, train
    from orpo_local.backends import get_backend
    from orpo_local.events import Step
    from orpo_local.models import resolve_model

    start = time.perf_counter()
    over = {"model.name": spec["model"], "model.backend": "torch", "model.dtype": spec["dtype"], "data.path": spec["data"],
            "data.max_length": spec["max_length"], "data.max_prompt_length": spec["max_length"] // 2,
            "optim.batch_size": spec["batch_size"], "optim.max_steps": spec["steps"], "optim.learning_rate": spec["lr"],
            "orpo.lambda_": spec["lambda_"], "orpo.nll_on_prompt": True, "run.seed": spec["seed"], "run.save_every": 0,
            "run.runs_dir": spec["scratch"]}
    if not evaluate:
        over.update({"data.val_fraction": 0.0, "run.eval_every": 10**6})
    config = TrainConfig().with_overrides(over)
    ends: list[float] = []
    backend = get_backend("torch")
    now = torch_timer(backend.device)
    run = train(config, progress=False, backend=backend, on_event=lambda e: ends.append(now()) if isinstance(e, Step) else None)
    end = now()
    info = json.loads((run.run_dir / "run.json").read_text())
    _, pairs = our_tokens(backend.tokenizer, spec["data"], spec["max_length"])
    layout, lengths = getattr(backend, "layout", "plain"), lengths_of(pairs)
    shape = model_shape(resolve_model(spec["model"], progress=lambda m: None))
    return {"device": backend.device, "dtype": info.get("dtype", spec["dtype"]), "layout": layout, "framework": "torch",
            "times": step_times(start, ends, end), "losses": [], "pair_lengths": lengths,
            "pairs_per_step": mean_batch(info["data"]["train_pairs"], spec["batch_size"]), "peak_mb": torch_peak_mb(backend.device),
            "peak_gflops": torch_matmul_peak(backend.model.dtype, backend.device, shape,
                                             typical_tokens([lengths[: spec["batch_size"]]], layout != "plain"))}


def step_times(start: float, ends: list[float], end: float) -> list[float]:
    """Per-step wall times of a whole trainer call from the ends of its steps: the first from the call's start
    (loading and data preparation included), then the rest of the call (the later steps, logging, evaluation,
    the final save) spread evenly over the steps after the first."""
    if len(ends) < 2:
        return [end - start]
    rest = (end - ends[0]) / (len(ends) - 1)
    return [ends[0] - start] + [rest] * (len(ends) - 1)


def mean_batch(n_pairs: int, batch_size: int) -> float:
    """Pairs per step over an epoch whose last batch is short."""
    return n_pairs / -(-n_pairs // batch_size)


def worker_trl_trainer(spec: dict) -> dict:
    """TRL's whole `ORPOTrainer.train()`, LoRA through `peft_config`, its own tokenisation of the same rows."""
    import torch
    from datasets import Dataset
    from orpo_local.backends.torch_backend import pick_device, pick_dtype
    from orpo_local.models import resolve_model
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    start = time.perf_counter()
    path, device = resolve_model(spec["model"], progress=lambda m: None), pick_device()
    dtype = pick_dtype(spec["dtype"], device)
    now, ends = torch_timer(device), []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(now())

    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    args = ORPOConfig(output_dir=spec["scratch"], per_device_train_batch_size=spec["batch_size"],
                      max_steps=spec["steps"], learning_rate=spec["lr"], beta=spec["lambda_"], max_length=spec["max_length"],
                      max_grad_norm=1.0, gradient_checkpointing=False, bf16=dtype == torch.bfloat16, fp16=False,
                      use_cpu=device == "cpu", report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
                      disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"])
    peft = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = ORPOTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(path), train_dataset=dataset,
                          peft_config=peft, callbacks=[StepEnds()])
    reset_torch_peak(device)
    trainer.train()
    end = now()
    tokenized = trainer.train_dataset
    lengths = [[len(p), len(c) - len(p), len(r) - len(p)] for p, c, r in
               zip(tokenized["prompt_input_ids"], tokenized["chosen_input_ids"], tokenized["rejected_input_ids"])]
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "layout": "plain", "framework": "torch",
            "times": step_times(start, ends, end), "losses": [], "pair_lengths": lengths,
            "pairs_per_step": mean_batch(len(rows), spec["batch_size"]), "peak_mb": torch_peak_mb(device),
            "peak_gflops": torch_matmul_peak(dtype, device, model_shape(path), typical_tokens([lengths[: spec["batch_size"]]], False))}


def mlx_peak_mb() -> float:
    """RSS on MLX's CPU device; on Apple GPUs MLX's own peak, as unified memory is not in RSS."""
    import mlx.core as mx

    return peak_rss_mb() if mx.default_device() == mx.cpu else mx.get_peak_memory() / 2**20


def mlx_param_dtype(model):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def stub_metal_only_calls() -> list[str]:
    """mlx-lm-lora's trainers call `mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`,
    which only Metal answers; on MLX's CPU device the key is missing. Returns what was stubbed."""
    import mlx.core as mx

    if "max_recommended_working_set_size" in mx.device_info():
        return []
    info = mx.device_info
    mx.device_info = lambda *a, **k: {**info(*a, **k), "max_recommended_working_set_size": 0}
    mx.set_wired_limit = lambda limit: 0
    return ["mx.device_info", "mx.set_wired_limit"]


class PromptConversationDataset:
    """mlx-lm-lora's ORPODataset takes the prompt as one user turn; this renders a whole prompt conversation
    the way it renders one: the chat template of prompt + answer, the prompt length from the generation prompt."""

    def __init__(self, rows: list[dict], tokenizer):
        self.items = []
        for row in rows:
            ids = [tokenizer.apply_chat_template(row["prompt"] + row[k], add_generation_prompt=False) for k in ("chosen", "rejected")]
            n_prompt = len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True))
            self.items.append({"chosen": ids[0], "rejected": ids[1], "chosen_prompt_length": n_prompt,
                               "rejected_prompt_length": n_prompt, "preference_score": 1.0})

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]

    def __len__(self) -> int:
        return len(self.items)

    def process(self, d):
        return d


def mlx_lm_lora_dataset(rows: list[dict], tokenizer):
    """The rows as mlx-lm-lora reads them: single-turn ones through its own ORPODataset (prompt, system and
    answers as strings), multi-turn prompts through PromptConversationDataset."""
    from mlx_lm_lora.trainer.datasets import ORPODataset

    if any(len([m for m in r["prompt"] if m["role"] != "system"]) > 1 for r in rows):
        return PromptConversationDataset(rows, tokenizer)
    flat = []
    for r in rows:
        system = [m["content"] for m in r["prompt"] if m["role"] == "system"]
        flat.append({"prompt": r["prompt"][-1]["content"], "chosen": r["chosen"][-1]["content"],
                     "rejected": r["rejected"][-1]["content"], **({"system": system[0]} if system else {})})
    return ORPODataset(flat, tokenizer, system_key="system")


def worker_mlx_lm_lora(spec: dict) -> dict:
    """mlx-lm-lora's `train_orpo` on its own tokenisation of the same rows, timed by its per-step report."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer import orpo_trainer
    from orpo_local.backends.mlx_backend import mlx_model_config
    from orpo_local.models import resolve_model

    stubbed = stub_metal_only_calls()
    path = resolve_model(spec["model"], progress=lambda m: None)
    mx.random.seed(spec["seed"])
    np.random.seed(spec["seed"])
    # The RoPE settings lifted from transformers 5's `rope_parameters`, so both sides run the same model.
    model, tokenizer = load(path, model_config=mlx_model_config(path))
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # the float32 folder: MLX's CPU bf16 products are slow
    model.freeze()
    # No "keys": every linear layer of every block, as mlx-lm-lora's from_pretrained does.
    linear_to_lora_layers(model, len(model.layers), {"rank": LORA_RANK, "scale": LORA_ALPHA / LORA_RANK, "dropout": 0.0})
    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = CacheDataset(mlx_lm_lora_dataset(rows, tokenizer))
    batches, ends = [], []
    original = orpo_trainer.iterate_orpo_batches

    def recording(*args, **kwargs):  # the arrays each step trains on, for its real lengths
        for batch in original(*args, **kwargs):
            batches.append([np.array(a) for a in batch[2:4]])
            yield batch

    class StepEnds(TrainingCallback):
        def on_train_loss_report(self, info):
            ends.append(time.perf_counter())

    orpo_trainer.iterate_orpo_batches = recording
    args = orpo_trainer.ORPOTrainingArgs(batch_size=spec["batch_size"], iters=spec["steps"], steps_per_report=1,
                                         steps_per_eval=10**9, steps_per_save=10**9, adapter_file=Path(spec["scratch"]) / "adapters.safetensors",
                                         max_seq_length=spec["max_length"], beta=spec["lambda_"])
    optimizer = optim.AdamW(learning_rate=spec["lr"], weight_decay=0.0, bias_correction=True)
    start = time.perf_counter()
    orpo_trainer.train_orpo(model=model, optimizer=optimizer, train_dataset=dataset, val_dataset=None, args=args,
                            training_callback=StepEnds())
    times = [b - a for a, b in zip([start] + ends, ends)]
    step_lengths = [mask_lengths(chosen, rejected) for chosen, rejected in batches[: len(times)]]
    dtype = mlx_param_dtype(model)
    return {"device": "gpu" if mx.default_device() == mx.gpu else "cpu", "dtype": str(dtype).replace("mlx.core.", ""), "layout": "plain",
            "times": times, "losses": [], "step_lengths": step_lengths, "peak_mb": mlx_peak_mb(), "framework": "mlx", "stubbed": stubbed,
            "peak_gflops": mlx_matmul_peak(dtype, model_shape(path), typical_tokens(step_lengths, False))}


def mask_lengths(chosen_masks, rejected_masks) -> list[list[int]]:
    """(prompt, chosen, rejected) per row of an mlx-lm-lora ORPO batch: its masks are 1 from the prompt's end to the sequence's."""
    import numpy as np

    def end(mask, p: int) -> int:
        nonzero = np.flatnonzero(mask)
        return int(nonzero[-1]) + 1 if nonzero.size else p  # a response truncated to nothing

    out = []
    for c, r in zip(chosen_masks, rejected_masks):
        p = int(np.argmax(c > 0))
        out.append([p, end(c, p) - p, end(r, p) - p])
    return out


WORKERS = {"torch_step": lambda spec: worker_backend_step(spec, "torch"), "trl_step": worker_trl_step, "ours_trainer": worker_ours_trainer,
           "ours_trainer_eval": lambda spec: worker_ours_trainer(spec, evaluate=True), "trl_trainer": worker_trl_trainer,
           "mlx_step": lambda spec: worker_backend_step(spec, "mlx"), "mlx_lm_lora": worker_mlx_lm_lora}


# ----------------------------------------------------------------------------- the driver

@dataclass
class Comparison:
    key: str  # torch | trainer | mlx
    title: str
    ours: str  # worker names
    peer: str | None
    dtype: str
    env: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # worker -> [result, ...]


def peer_missing(key: str) -> str:
    """Why a comparison's peer cannot run here ('' when it can)."""
    import importlib.util

    need = {"torch": ("trl", "datasets"), "trainer": ("trl", "datasets"), "mlx": ("mlx_lm_lora", "mlx_lm")}[key]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)}: pip install 'orpo-local[bench]'" if missing else ""


def plan(only: list[str]) -> list[Comparison]:
    out = []
    if "torch" in only:
        out += [Comparison("torch", "torch step, fastest dtype", "torch_step", "trl_step", "auto"),
                Comparison("torch", "torch step, float32", "torch_step", "trl_step", "float32")]
    if "trainer" in only:
        out += [Comparison("trainer", "whole trainer", "ours_trainer", "trl_trainer", "auto"),
                Comparison("trainer", "whole trainer, our default evaluation", "ours_trainer_eval", None, "auto")]
    if "mlx" in only:
        from orpo_local.openblas import find_openblas

        lib = find_openblas()
        env = {"LD_PRELOAD": " ".join(filter(None, [os.environ.get("LD_PRELOAD", ""), lib]))} if lib and platform.system() == "Linux" else {}
        out.append(Comparison("mlx", "MLX step", "mlx_step", "mlx_lm_lora", "float32", env))
    return out


def run_worker(worker: str, spec: dict, env: dict) -> dict:
    """One side's run in its own process; what it writes (run folders, trainer output) goes with its temporary folder."""
    with tempfile.TemporaryDirectory(prefix="orpo_local_bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", worker, "--spec", json.dumps({**spec, "result": str(result), "scratch": tmp})]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env})
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"{worker} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def run_all(comparisons: list[Comparison], spec: dict, repeats: int, log=print) -> list[str]:
    """Each comparison `repeats` times, alternating which side runs first; returns notes on what did not run:
    the float32 comparison when the fastest dtype already was float32, a comparison one of whose runs failed."""
    fastest, notes = {}, []
    for comp in comparisons:
        if comp.key == "torch" and comp.dtype == "float32" and fastest.get("torch") == "float32":
            notes.append(f"{comp.title}: float32 is the fastest dtype here, so the comparison above is the float32 one")
            continue
        sides = [comp.ours] + ([comp.peer] if comp.peer else [])
        try:
            for r in range(repeats if comp.peer else 1):  # our evaluation-cost run: once
                for worker in (sides if r % 2 == 0 else sides[::-1]):
                    tic = time.perf_counter()
                    res = run_worker(worker, {**spec, "dtype": comp.dtype}, comp.env)
                    comp.runs.setdefault(worker, []).append(res)
                    log(f"  {comp.title}: {SIDE_NAMES[worker]} run {r + 1} {summary(res, spec['warmup'])['s_step']:.2f} s/step "
                        f"({time.perf_counter() - tic:.0f} s)")
        except RuntimeError as e:
            log(str(e))
            lines = str(e).strip().splitlines()
            notes.append(f"{comp.title}: {lines[0].rstrip(':')}: {lines[-1]}")
            comp.runs = {}
            continue
        fastest.setdefault(comp.key, comp.runs[comp.ours][0]["dtype"])
    return notes


def summary(res: dict, warmup: int) -> dict:
    """One run's timed steps (after `warmup`) as s/step, pairs/s, tokens/s and FLOP/s."""
    times = res["times"][warmup:] or res["times"][-1:]
    seconds = sum(times)
    shape = res["shape"]
    shared = res.get("layout", "plain") != "plain"  # "shared" or "prefix": each prompt computed once
    if res.get("step_lengths"):
        steps = res["step_lengths"][len(res["times"]) - len(times):]
        pairs = sum(len(s) for s in steps)
        tokens = sum(2 * p + c + r for s in steps for p, c, r in s)
        flops = sum(pair_flops(p, c, r, shape, shared) for s in steps for p, c, r in s)
    else:  # whole trainers: their batches are their own, so the mean pair of their tokenised rows
        lengths = res["pair_lengths"]
        pairs = res["pairs_per_step"] * len(times)
        tokens = pairs * statistics.mean(2 * p + c + r for p, c, r in lengths)
        flops = pairs * statistics.mean(pair_flops(p, c, r, shape, shared) for p, c, r in lengths)
    return {"s_step": seconds / len(times), "pairs_s": pairs / seconds, "tokens_s": tokens / seconds, "flops": flops / seconds,
            "tokens_pair": tokens / pairs}


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median); spread 0 for one value."""
    mid = statistics.median(values)
    return mid, (max(values) - min(values)) / mid if mid else 0.0


def fmt(value: float, spread: float | None = None, digits: int = 3) -> str:
    text = f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return text if spread is None or spread == 0 else f"{text} ±{spread * 100:.0f}%"


def table_rows(comparisons: list[Comparison], warmup: int) -> tuple[list[list[str]], dict]:
    """Markdown rows, and the matmul peak per (framework, device, dtype): the best any process measured."""
    peaks: dict[tuple, float] = {}
    for comp in comparisons:
        for runs in comp.runs.values():
            for res in runs:
                key = (res["framework"], res["device"], res["dtype"])
                peaks[key] = max(peaks.get(key, 0.0), res["peak_gflops"])
    rows = []
    for comp in comparisons:
        if not comp.runs:
            continue
        ours = [summary(r, warmup) for r in comp.runs[comp.ours]]
        peer = [summary(r, warmup) for r in comp.runs.get(comp.peer, [])] if comp.peer else []
        for worker, sums in ((comp.ours, ours), (comp.peer, peer)):
            if not sums:
                continue
            first = comp.runs[worker][0]
            peak = peaks[(first["framework"], first["device"], first["dtype"])]
            ratio = "" if worker != comp.ours or not peer else fmt(*median_spread([o["pairs_s"] / p["pairs_s"] for o, p in zip(ours, peer)]))
            layout = "" if first["layout"] == "plain" else f", {first['layout']} layout"
            rows.append([comp.title, SIDE_NAMES[worker], first["dtype"] + layout, fmt(*column(sums, "s_step")), fmt(*column(sums, "pairs_s")),
                         fmt(*column(sums, "tokens_s")), f"{column(sums, 'tokens_pair')[0]:.0f}",
                         f"{statistics.median(r['peak_mb'] for r in comp.runs[worker]):.0f}",
                         f"{statistics.median(s['flops'] for s in sums) / (peak * 1e9) * 100:.1f}%", ratio])
    return rows, peaks


def column(sums: list[dict], key: str) -> tuple[float, float]:
    return median_spread([s[key] for s in sums])


HEADER = ["comparison", "side", "dtype", "s/step", "pairs/s", "tokens/s", "tokens/pair", "peak MB", "MFU", "ours/peer (pairs/s)"]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def loss_lines(comparisons: list[Comparison]) -> list[str]:
    """The first run's losses of both sides of each step comparison, and their largest relative difference."""
    out = []
    for comp in comparisons:
        if not comp.peer or not comp.runs or not comp.runs[comp.ours][0]["losses"] or not comp.runs[comp.peer][0]["losses"]:
            continue
        a, b = comp.runs[comp.ours][0]["losses"], comp.runs[comp.peer][0]["losses"]
        diff = max(abs(x - y) / abs(y) for x, y in zip(a, b))
        out.append(f"- {comp.title}: losses {SIDE_NAMES[comp.ours]} {' '.join(f'{v:.5f}' for v in a)}; "
                   f"{SIDE_NAMES[comp.peer]} {' '.join(f'{v:.5f}' for v in b)} (max relative difference {diff:.1e})")
    return out


def startup_lines(comparisons: list[Comparison]) -> list[str]:
    """What the whole trainers spend before their second step: loading, tokenising and the first step."""
    out = []
    for comp in comparisons:
        if comp.key == "trainer" and comp.runs:
            sides = [f"{SIDE_NAMES[w]} {statistics.median(r['times'][0] for r in runs):.1f} s" for w, runs in comp.runs.items()]
            out.append(f"- {comp.title}: from the call to the end of the first step (loading, tokenising, the first step): "
                       + "; ".join(sides))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    versions = []
    for name in ("torch", "transformers", "peft", "trl", "mlx", "mlx-lm", "mlx-lm-lora"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu} ({os.cpu_count()} cores{memory}), {platform.system()}; " + ", ".join(versions)


def report(comparisons: list[Comparison], args, n_pairs: int, command: str, skipped: list[str]) -> str:
    rows, peaks = table_rows(comparisons, args.warmup)
    gpus = sorted({r.get("device_name", "") for c in comparisons for runs in c.runs.values() for r in runs} - {""})
    stubbed = sorted({s for c in comparisons for runs in c.runs.values() for r in runs for s in r.get("stubbed", [])})
    workload = "multi-turn rows, prompt >= 3x the answers" if args.long_prompt else "rows as they are"
    lines = [f"machine: {machine()}{'; ' + ', '.join(gpus) if gpus else ''}", f"command: `{command}`",
             f"date: {time.strftime('%Y-%m-%d')}",
             f"workload: {args.model}, {args.data} ({n_pairs} pairs, {workload}), batch {args.batch_size} pairs, max length "
             f"{args.max_length}; {args.steps} steps a run, the first {args.warmup} untimed; {args.repeats} run{'s' * (args.repeats != 1)} "
             f"a side, alternating which goes first; median ±spread ((max - min) / median) over the runs", "", markdown_table(rows), ""]
    lines += ["- tokens: the pairs' tokens as two sequences, no padding, in each side's own tokenisation. MFU: model FLOPs of "
              "the tokens each side feeds the model (bench/compare.py's docstring) over the matmul peak below. ours/peer > 1: "
              "orpo_local is faster."]
    if peaks:
        lines.append("- matmul peak, the best measured in the same processes: "
                     + ", ".join(f"{fw} {dev} {dt} {gflops:.0f} GFLOP/s" for (fw, dev, dt), gflops in sorted(peaks.items())))
    lines += loss_lines(comparisons) + startup_lines(comparisons)
    lines += [f"- stubbed for mlx-lm-lora on this platform: {', '.join(stubbed)}"] if stubbed else []
    lines += [f"- not run: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` between this key's markers in `path`: replaced where they are, else appended."""
    start, end = SECTION_START.format(key=key), SECTION_END.format(key=key)
    block = f"{start}\n{text}{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    path.write_text(new, encoding="utf-8")


def parse_args(argv=None):
    from orpo_local.config import BUNDLED_DATA, BUNDLED_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", default=BUNDLED_MODEL, help="model folder, Hub id or the bundled model (default)")
    p.add_argument("--data", default=BUNDLED_DATA, help="preference rows (default: the bundled Chinese sample)")
    p.add_argument("--pairs", type=int, default=0, help="rows to use (default: steps x batch size, one batch per step)")
    p.add_argument("--long-prompt", action="store_true",
                   help="multi-turn rows: earlier pairs prepended as history until the prompt is >= 3x the answers")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="steps per run, the first --warmup untimed")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating which goes first")
    p.add_argument("--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {', '.join(COMPARISONS)}")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.1, help="ORPO λ (TRL's and mlx-lm-lora's beta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the report into this markdown file (its section for this workload)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in COMPARISONS] + ([] if args.steps > args.warmup else [f"--steps {args.steps} <= --warmup {args.warmup}"])
    if bad:
        p.error(f"invalid: {', '.join(bad)} (--only takes {', '.join(COMPARISONS)}; at least one step must be timed)")
    args.only = only
    return args


def worker_main(name: str, spec: dict) -> None:
    result = WORKERS[name](spec)
    from orpo_local.models import resolve_model

    result["shape"] = model_shape(resolve_model(spec["model"], progress=lambda m: None))
    if result["device"] == "cuda":
        import torch

        result["device_name"] = torch.cuda.get_device_name()
    Path(spec["result"]).write_text(json.dumps(result))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec))
    from orpo_local.models import load_tokenizer, resolve_model
    from orpo_local.tokenization import ChatEncoder

    n_pairs = args.pairs or args.steps * args.batch_size
    model_dir = resolve_model(args.model, progress=lambda m: print(m, file=sys.stderr))
    if args.long_prompt:
        encoder = ChatEncoder(load_tokenizer(model_dir, progress=lambda m: None))
        rows = long_prompt_rows(load_rows(args.data, 10**9), encoder, n_pairs, args.max_length)
    else:
        rows = load_rows(args.data, n_pairs)
    comparisons, skipped = [], []
    for comp in plan(args.only):
        why = peer_missing(comp.key) if comp.peer else ""
        if why:
            skipped.append(f"{comp.title}: {why}")
        else:
            comparisons.append(comp)
    with tempfile.TemporaryDirectory(prefix="orpo_local_bench-") as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(rows, data)
        spec = {"model": model_dir, "data": str(data), "batch_size": args.batch_size, "max_length": args.max_length,
                "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "lambda_": args.lambda_, "seed": args.seed}
        print(f"{len(comparisons)} comparisons x {args.repeats} runs per side on {len(rows)} rows", file=sys.stderr)
        skipped += run_all(comparisons, spec, args.repeats, log=lambda m: print(m, file=sys.stderr, flush=True))
    command = "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(comparisons, args, len(rows), command.strip(), skipped)
    print(text)
    if args.out:
        write_section(args.out, section_key(args), text)


def section_key(args) -> str:
    """The markdown section a run writes: its workload, and the comparisons when it ran only some, so a run of
    a subset never replaces the table of another."""
    workload = "long-prompt" if args.long_prompt else "default"
    only = [c for c in COMPARISONS if c in args.only]  # parse_args made it a list
    return workload if only == list(COMPARISONS) else f"{workload} {','.join(only)}"


if __name__ == "__main__":
    main()
