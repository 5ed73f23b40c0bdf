"""Side by side: TRL's ORPOTrainer loss path vs orpo_local's torch backend, same run, same data.

    python bench/torch_vs_trl.py                      # bundled model, bundled Chinese sample, CPU
    python bench/torch_vs_trl.py --steps 10 --dtype bfloat16 --batch-size 8

Both sides get the same token ids (orpo_local's tokenisation), the same base weights, the same
LoRA initialisation (seeded), the same AdamW and learning rate, and the same batches in the same
order; orpo_local runs with nll_on_prompt=True, TRL's objective. TRL's side is exactly what its
Trainer does per step: `ORPOTrainer.get_batch_loss_metrics` -> backward -> clip -> AdamW step.
Each side runs in its own process so peak memory (RSS on CPU, max allocated on CUDA) is its own.
It prints the loss of every step for both (the trajectories must agree) and s/step, tokens/s,
peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice


def worker(args) -> dict:
    import torch
    from orpo_local.backends.torch_backend import TorchBackend
    from orpo_local.batching import iterate_batches
    from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig
    from orpo_local.data import load_pairs
    from orpo_local.tokenization import ChatEncoder, tokenize_pairs

    backend = TorchBackend()
    backend.load(ModelConfig(name=args.model, dtype=args.dtype, load_in_4bit=args.four_bit), LoraConfig(), seed=0)
    enc = ChatEncoder(backend.tokenizer)
    pairs, _ = tokenize_pairs(load_pairs(args.data)[: args.steps * args.batch_size * 2], enc, 512, 256)
    batches = [b for _, b in islice(iterate_batches(pairs, args.batch_size, enc.pad_id, seed=0, pad_to=8), args.steps)]
    orpo = OrpoConfig(lambda_=0.1, nll_on_prompt=True)
    backend.init_optimizer(OptimConfig(learning_rate=args.lr))

    if args.worker == "trl":
        from datasets import Dataset
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        cfg = ORPOConfig(output_dir=tempfile.mkdtemp(prefix="orpo_local_bench_trl-"), beta=orpo.lambda_, report_to=[], padding_value=enc.pad_id,
                         bf16=False, use_cpu=backend.device == "cpu")
        trainer = ORPOTrainer(model=backend.model, args=cfg, processing_class=backend.tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
        params = [p for p in backend.model.parameters() if p.requires_grad]

        def step(batch):
            trl_batch = to_trl(batch, backend.device)
            backend.model.train()
            loss, _ = trainer.get_batch_loss_metrics(backend.model, trl_batch, "train")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            backend.optimizer.step()
            backend.optimizer.zero_grad(set_to_none=True)
            return float(loss)
    else:
        def step(batch):
            return backend.train_step([batch], args.lr, orpo, 1.0)["loss"]

    times, losses, tokens = [], [], []
    for batch in batches:
        if backend.device == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        losses.append(step(batch))
        if backend.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
        tokens.append(int(batch["attention_mask"].sum()))
    return {"impl": args.worker, "device": backend.device, "dtype": args.dtype, "losses": losses, "times": times,
            "tokens": tokens, "peak_mem_mb": backend.peak_memory_mb()}


def to_trl(batch, device):
    """orpo_local's (2B, T) chosen-then-rejected arrays -> TRL's per-side tensors, labels -100 on prompt and pads."""
    import torch

    b = len(batch["input_ids"]) // 2
    out = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
        ids = torch.from_numpy(batch["input_ids"][rows]).long()
        labels = torch.where(torch.from_numpy(batch["response_mask"][rows]).bool(), ids, torch.full_like(ids, -100))
        out.update({f"{side}_input_ids": ids.to(device), f"{side}_attention_mask": torch.from_numpy(batch["attention_mask"][rows]).long().to(device),
                    f"{side}_labels": labels.to(device)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="zh-sample")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--worker", choices=("trl", "orpo_local"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    results = []
    for impl in ("trl", "orpo_local"):
        cmd = [sys.executable, __file__, "--worker", impl] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    trl, ours = results
    print(f"{args.model}, {args.data}, batch {args.batch_size} pairs, {args.steps} steps, device {ours['device']}, dtype {args.dtype}"
          f"{', 4-bit' if args.four_bit else ''}")
    print("loss per step   TRL: " + " ".join(f"{v:.5f}" for v in trl["losses"]))
    print("          orpo_local: " + " ".join(f"{v:.5f}" for v in ours["losses"]))
    print(f"max relative loss difference: {max(abs(a - b) / abs(a) for a, b in zip(trl['losses'], ours['losses'])):.2e}")
    print(f"{'':<12}{'s/step':>10}{'tokens/s':>12}{'peak MB':>10}   (first step excluded from timing)")
    for r in results:
        t = statistics.mean(r["times"][1:]) if len(r["times"]) > 1 else r["times"][0]
        tok = sum(r["tokens"][1:]) / sum(r["times"][1:]) if len(r["times"]) > 1 else r["tokens"][0] / r["times"][0]
        print(f"{r['impl']:<12}{t:>10.2f}{tok:>12.0f}{r['peak_mem_mb']:>10.0f}")


if __name__ == "__main__":
    main()
