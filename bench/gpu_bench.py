"""CUDA QLoRA, orpo_local against TRL + bitsandbytes, on random-initialised models of realistic shape.

    bash bench/gpu.sh                                           # on the GPU machine: installs the carried wheels, runs this
    python bench/gpu_bench.py --models qwen2.5-1.5b --batch-size 4 --max-length 1024
    python bench/gpu_bench.py --models tiny --steps 2 --max-batch 4      # a smoke run of every path, on CPU too

Per model shape a random bf16 model is saved once (with a stand-in tokenizer: the batches are random
token ids), then each side runs in its own process, capped at --memory-gib of GPU memory
(torch.cuda.set_per_process_memory_fraction) as on a consumer card:

  orpo_local  TorchBackend with load_in_4bit (NF4, double quantisation, bf16 compute) and its train_step;
  TRL         ORPOTrainer's own QLoRA set-up (peft_config on a bitsandbytes 4-bit model: it runs
              prepare_model_for_kbit_training, get_peft_model and its bf16 casting) and what its Trainer
              does per step: get_batch_loss_metrics under its autocast, backward, clip, AdamW.

Both get LoRA rank 8, alpha 16 on the 7 projections, gradient checkpointing (on by default, as 24 GB
QLoRA recipes have it) and the same batches of full-length pairs (prompt and each answer max_length / 2
tokens: the memory worst case). Printed per side: s/step, pairs/s, tokens/s, peak GPU memory
(max_memory_allocated after loading), MFU against the bf16 matmul peak measured in the same process
(model FLOPs as in bench/compare.py; recomputation is not counted), and the largest batch of such
pairs one training step fits in the cap (doubling, then bisecting; '>= N' when --search-s ran out).
Whatever does not fit --deadline-s is skipped and said so.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import compare  # bench/compare.py: FLOP count, matmul peak, TRL batch conversion (no heavy imports at the top)

# The shapes from each model's config.json; the weights are random.
SHAPES = {
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                     "rope_theta": 1e6, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
                   "rope_theta": 5e5, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True, "max_position_embeddings": 4096},
}
SIDES = ("orpo_local", "trl")
PAD_ID = 0


# ----------------------------------------------------------------------------- the model folder

def stand_in_tokenizer():
    """A word-level tokenizer of a few tokens: the batches are random ids, but both loaders want a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="a")


def make_model(name: str, folder: Path) -> None:
    """Save a random bf16 model of shape `name` (initialised on the GPU when there is one: seconds, not minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = dict(SHAPES[name])
    cfg = AutoConfig.for_model(dims.pop("model_type"), pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    stand_in_tokenizer().save_pretrained(folder)


# ----------------------------------------------------------------------------- the two sides (each in its own process)

def load_ours(args, device: str):
    """orpo_local's QLoRA path; returns step(pairs) -> loss and the batch layout it takes."""
    from orpo_local.backends import get_backend
    from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig

    backend = get_backend("torch")
    backend.load(ModelConfig(name=str(args.model_dir), backend="torch", load_in_4bit=True,
                             gradient_checkpointing=args.gradient_checkpointing), LoraConfig(), args.seed)
    backend.init_optimizer(OptimConfig(learning_rate=args.lr))
    orpo, layout = OrpoConfig(lambda_=0.1, nll_on_prompt=True), getattr(backend, "layout", "plain")
    pad_to = getattr(backend, "pad_to", 8)

    def step(pairs) -> float:
        return backend.train_step([compare.collate_as(pairs, PAD_ID, pad_to, layout)], args.lr, orpo, 1.0)["loss"]

    return step, layout, backend.optimizer


def load_trl(args, device: str):
    """TRL's QLoRA set-up (ORPOTrainer with peft_config on a 4-bit model) and its per-step path."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    bf16 = device == "cuda"  # on CPU (a smoke run) bitsandbytes computes in float32 for both sides' sake
    dtype = torch.bfloat16 if bf16 else torch.float32
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, quantization_config=nf4, device_map={"": device})
    model.config.use_cache = False
    cfg = ORPOConfig(output_dir=str(args.model_dir.parent / "trl-output"), beta=0.1, max_length=args.max_length, bf16=bf16,
                     gradient_checkpointing=args.gradient_checkpointing, use_cpu=device == "cpu", report_to=[], padding_value=PAD_ID)
    peft = LoraConfig(r=compare.LORA_RANK, lora_alpha=compare.LORA_ALPHA, lora_dropout=0.0, target_modules=compare.LORA_TARGETS,
                      task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    trainer = ORPOTrainer(model=model, args=cfg, processing_class=AutoTokenizer.from_pretrained(args.model_dir), peft_config=peft,
                          train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **({"fused": True} if device == "cuda" else {}))

    def step(pairs) -> float:
        model.train()
        with trainer.compute_loss_context_manager():
            loss, _ = trainer.get_batch_loss_metrics(model, compare.to_trl(compare.collate_as(pairs, PAD_ID, 1, "plain"), device), "train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, "plain", optimizer


def random_pairs(n: int, prompt: int, answer: int, vocab: int, seed: int):
    """`n` pairs of random token ids: a `prompt`-token prompt and two `answer`-token answers."""
    import numpy as np
    from orpo_local.tokenization import TokenizedPair

    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, vocab, k).tolist()  # noqa: E731  (0-2: pad, bos, eos)
    return [TokenizedPair(ids(prompt), ids(answer), ids(answer)) for _ in range(n)]


def largest_batch(fits, start: int, limit: int, budget_s: float) -> tuple[int, bool]:
    """The largest n <= limit with fits(n), doubling from `start` then bisecting; (n, whether the search finished)."""
    deadline = time.perf_counter() + budget_s
    ok, bad, n = 0, None, min(start, limit)
    while n <= limit and time.perf_counter() < deadline:
        if not fits(n):
            bad = n
            break
        ok, n = n, n * 2
    if bad is None:
        return ok, n > limit
    while bad - ok > 1 and time.perf_counter() < deadline:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    return ok, bad - ok <= 1


def worker(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and args.memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    step, layout, optimizer = (load_ours if args.worker == "orpo_local" else load_trl)(args, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shape = compare.model_shape(args.model_dir)
    half = args.max_length // 2
    pairs = random_pairs(args.batch_size * args.steps, half, half, shape["vocab"], args.seed)
    now, times, losses = compare.torch_timer(device), [], []

    def fits(pairs) -> bool:
        try:
            losses.append(step(pairs))
            return True
        except torch.OutOfMemoryError:
            pass
        # outside the except block, where the failed step's frames (and their tensors) are gone
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return False

    for i in range(args.steps):
        tic = now()
        if not fits(pairs[i * args.batch_size: (i + 1) * args.batch_size]):
            times = []  # the recipe's batch does not fit the cap: nothing to time
            break
        times.append(now() - tic)
    peak_mb = compare.torch_peak_mb(device)
    biggest, finished = largest_batch(lambda n: fits(random_pairs(n, half, half, shape["vocab"], args.seed + n)),
                                      args.batch_size, args.max_batch, args.search_s)
    out = {"side": args.worker, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "layout": layout,
           "losses": losses[: len(times)], "max_batch": biggest, "max_batch_final": finished, "s_step": None}
    timed = times[args.warmup:]
    if not timed:
        return out
    flops = sum(compare.pair_flops(half, half, half, shape, layout == "shared") for _ in range(args.batch_size)) * len(timed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gflops = compare.torch_matmul_peak(dtype, device, shape, 2 * args.batch_size * args.max_length)
    return {**out, "s_step": sum(timed) / len(timed), "pairs_s": args.batch_size * len(timed) / sum(timed),
            "tokens_s": 2 * args.batch_size * args.max_length * len(timed) / sum(timed), "peak_mb": peak_mb,
            "mfu": flops / sum(timed) / (gflops * 1e9), "peak_gflops": gflops}


# ----------------------------------------------------------------------------- the driver

def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--models", default="qwen2.5-1.5b,llama-3-8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (a 24 GB QLoRA recipe's)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence: prompt and each answer get half")
    p.add_argument("--steps", type=int, default=4, help="timed steps after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory-gib", type=float, default=24.0, help="GPU memory cap per side (0: none)")
    p.add_argument("--max-batch", type=int, default=128, help="largest batch the search tries")
    p.add_argument("--search-s", type=float, default=45.0, help="seconds each side may spend finding its largest batch")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "orpo_local_gpu_models")
    p.add_argument("--deadline-s", type=float, default=420.0, help="work still running after this many seconds is stopped, later work skipped")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--make-model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps += args.warmup  # from here on: all steps run, the first `warmup` untimed
    if args.make_model:
        return make_model(args.make_model, args.model_dir)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        p.error(f"unknown model shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    results = drive(args, models)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def worker_argv(args) -> list[str]:
    """The settings a side's process needs, as options."""
    out = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("batch_size", "max_length", "warmup", "memory_gib", "max_batch",
                                                                   "search_s", "lr", "seed")]
    return out + [f"--steps={args.steps - args.warmup}"] + ([] if args.gradient_checkpointing else ["--no-gradient-checkpointing"])


def drive(args, models: list[str]) -> list[dict]:
    """Each model shape: make its folder, then each side in its own process, inside the deadline."""
    start, results = time.perf_counter(), []
    left = lambda: args.deadline_s - (time.perf_counter() - start)  # noqa: E731
    print(f"{'model':<14}{'side':<12}{'s/step':>8}{'pairs/s':>9}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}{'max batch':>11}", flush=True)
    for name in models:
        folder = args.work_dir / name
        if not (folder / "config.json").exists():
            made = run([sys.executable, __file__, "--make-model", name, "--model-dir", str(folder)], left())
            if made.returncode != 0:
                print(f"{name}: could not make the model folder:\n{made.stderr[-3000:]}", flush=True)
                continue
        for side in SIDES:
            if left() < 30:
                print(f"{name:<14}{side:<12}skipped: the deadline (--deadline-s {args.deadline_s:.0f}) is near", flush=True)
                continue
            try:
                proc = run([sys.executable, __file__, *worker_argv(args), "--worker", side, "--model-dir", str(folder)], left())
            except subprocess.TimeoutExpired:
                print(f"{name:<14}{side:<12}stopped at the deadline", flush=True)
                continue
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name:<14}{side:<12}failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            res = {"model": name, **json.loads(lines[-1][7:])}
            results.append(res)
            print(result_line(res), flush=True)
    if results:
        print(f"device: {results[0]['device']}; batch {args.batch_size} pairs of {args.max_length}-token sequences, "
              f"{args.steps - args.warmup} timed steps; cap {args.memory_gib:g} GiB a side; matmul peak "
              + ", ".join(f"{r['model']}/{r['side']} {r['peak_gflops']:.0f} GFLOP/s" for r in results if r["s_step"]), flush=True)
    return results


def result_line(res: dict) -> str:
    biggest = ("" if res["max_batch_final"] else ">= ") + str(res["max_batch"])
    if res["s_step"] is None:
        return f"{res['model']:<14}{res['side']:<12}{'the batch does not fit the cap':>54}{biggest:>11}"
    return (f"{res['model']:<14}{res['side']:<12}{res['s_step']:>8.3f}{res['pairs_s']:>9.2f}{res['tokens_s']:>10.0f}"
            f"{res['peak_mb'] / 2**10:>10.2f}{res['mfu'] * 100:>6.1f}%{biggest:>11}")


if __name__ == "__main__":
    main()
