"""Peak memory of one training step against the vocabulary size: the chunked vocabulary projection
(orpo_local's default) against one whole projection at the targets and against full logits over every
position (what TRL's ORPOTrainer computes), on a random Llama with Qwen2.5's 151,936-token vocabulary.

    python bench/vocab_memory.py                      # 2 layers of Qwen2.5-0.5B's width, batch 8 x 512
    python bench/vocab_memory.py --vocab 49152,151936  # SmolLM2's vocabulary and Qwen2.5's, one table

Each variant runs in its own process (peak RSS is per process); the step's loss is printed so the
variants can be seen to compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"chunked": "orpo_local default: vocabulary projection at the targets, 256 MiB of logits at a time",
            "whole": "projection at the targets, all at once",
            "full": "full logits (2B, T, V), as TRL's concatenated_forward"}


def build_model(folder: Path, vocab: int, layers: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                      num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def one_step(folder: str, variant: str, batch: int, length: int) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from orpo_local.batching import collate
    from orpo_local.backends import torch_backend as tb
    from orpo_local.tokenization import TokenizedPair

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                 "gate_proj", "up_proj", "down_proj"]))
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(rng.integers(0, vocab, length // 2).tolist(), rng.integers(0, vocab, length // 4).tolist(),
                           rng.integers(0, vocab, length // 4).tolist()) for _ in range(batch)]
    mb = collate(pairs, 0, 8, "plain")
    t = tb.to_device(mb, False, "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tic = time.perf_counter()
    if variant == "full":
        logits = model(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"], use_cache=False).logits
        loss, _ = tb.orpo_loss(logits, t, 2.0)
    else:
        if variant == "whole":
            tb.LOGITS_BUDGET = 1 << 62
        loss, _ = tb.orpo_loss_from_token_logps(tb.model_token_logps(model, t, False), t, 2.0)
    loss.backward()
    return {"variant": variant, "loss": float(loss), "seconds": time.perf_counter() - tic,
            "rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "targets": int(mb["response_mask"][:, 1:].sum()), "rows": len(mb["input_ids"]), "width": mb["input_ids"].shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="151936", help="vocabulary sizes, comma-separated")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence (half prompt, a quarter each answer)")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child[0], args.child[1], args.batch, args.length)))
        return
    rows = []
    for vocab in [int(v) for v in args.vocab.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            build_model(Path(folder), vocab, args.layers)
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--child", folder, variant, "--batch", str(args.batch),
                                      "--length", str(args.length)], capture_output=True, text=True, check=True)
                rows.append({"vocab": vocab, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"random Qwen2-shaped models: {args.layers} layers of width 896, bf16, LoRA r8 on all linear layers; "
          f"batch {args.batch} pairs x {args.length} tokens ({rows[0]['targets']:,} answer targets)\n")
    print("| vocabulary | variant | peak RSS (MB) | above the loaded model (MB) | step (s) | loss |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['vocab']:,} | {r['variant']}: {VARIANTS[r['variant']]} | {r['peak_rss_mb']:,.0f} | "
              f"{r['peak_rss_mb'] - r['rss_before_mb']:,.0f} | {r['seconds']:.1f} | {r['loss']:.6f} |")

if __name__ == "__main__":
    main()
