"""Time training steps of one backend on the bundled model and a fixed batch of the Chinese sample.

    python bench/step_time.py --backend torch --dtype bfloat16
    python bench/step_time.py --no-prefix-sharing --profile   # the plain layout; then torch.profiler's top ops
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python bench/step_time.py --backend mlx

Prints the batch shape, each step's seconds (the first includes warm-up) and the loss, so two
settings can be compared on exactly the same work.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", action="store_true", help="torch: profile one more step and print the top ops by CPU time")
    args = p.parse_args()

    from orpo_local.backends import get_backend
    from orpo_local.batching import bucket, collate
    from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig
    from orpo_local.data import load_pairs
    from orpo_local.tokenization import ChatEncoder, tokenize_pairs

    backend = get_backend(args.backend)
    info = backend.load(ModelConfig(dtype=args.dtype, load_in_4bit=args.four_bit, prefix_sharing=args.prefix_sharing), LoraConfig(), 0)
    backend.init_optimizer(OptimConfig())
    enc = ChatEncoder(backend.tokenizer)
    pairs, _ = tokenize_pairs(load_pairs("zh-sample")[:10 * args.batch_size], enc, 512, 256)
    chosen = bucket(pairs, args.batch_size)[5]  # a fixed, mid-length batch
    batch = collate([pairs[i] for i in chosen], enc.pad_id, backend.pad_to, getattr(backend, "layout", "plain"))
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        metrics = backend.train_step([batch], 1e-4, OrpoConfig(), 1.0)
        times.append(time.perf_counter() - tic)
    print(f"{info.backend} ({info.device}, {info.dtype}{', 4-bit' if info.quantized else ''}, {info.batch_layout} layout) "
          f"batch {' + '.join(str(v.shape) for k, v in batch.items() if k.endswith('_ids'))}: "
          f"s/step {' '.join(f'{t:.2f}' for t in times)}  loss after {args.steps} steps {metrics['loss']:.5f}  "
          f"peak {backend.peak_memory_mb():.0f} MB")
    if args.profile and args.backend == "torch":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            backend.train_step([batch], 1e-4, OrpoConfig(), 1.0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
