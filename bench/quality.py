"""Evidence that ORPO aligns: λ = 0 (plain SFT on the chosen answers) against ORPO on the bundled
model, the same seed, data, schedule and steps; the tables and plot of docs/quality.md.

    python bench/quality.py --out docs/quality           # about 25 min on 2 CPU cores (torch backend)

1. Bundled Chinese sample (zh-sample), a held-out split: the held-out log-probs of the chosen and
   the rejected answers every few steps of both runs -> <out>/logps.png (Hong et al. 2024, §3: under
   SFT the rejected answers become more likely along with the chosen ones).
2. Synthetic arithmetic (orpo_local.data.synthetic): two more runs trained on N pairs and scored on
   M pairs with other questions (arithmetic_pairs never repeats a question within one call, so one
   call cut in two gives disjoint sets).
3. Base / SFT / ORPO on both held-out sets with orpo_local.evaluate.evaluate_run (what `orpo-local
   eval` reports), greedy answers to a few held-out prompts side by side, and on arithmetic the share
   of held-out questions whose greedy answer ends with the right number.

Writes <out>/logps.png, <out>/results.json and <out>/report.md (the tables docs/quality.md shows);
progress goes to stderr. Run folders go to a temporary folder unless --runs-dir is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

BASE_MODEL = "smollm2-135m-instruct"
EVAL_KEYS = ("accuracy", "logp chosen", "logp rejected", "margin", "log-odds ratio", "NLL chosen")


def log(text: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/quality", help="folder for logps.png, results.json and report.md")
    p.add_argument("--runs-dir", default=None, help="keep the four run folders here (default: a temporary folder)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=1.0, help="λ of the ORPO runs (the SFT runs use 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40, help="optimiser steps of each zh-sample run")
    p.add_argument("--eval-every", type=int, default=5, help="score the zh-sample held-out split every N steps")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of zh-sample held out (0.1 = 32 pairs)")
    p.add_argument("--max-length", type=int, default=256, help="data.max_length (prompt + response tokens)")
    p.add_argument("--arith-steps", type=int, default=40, help="optimiser steps of each arithmetic run (8 pairs a step)")
    p.add_argument("--arith-train", type=int, default=400, help="arithmetic training pairs")
    p.add_argument("--arith-held", type=int, default=100, help="arithmetic held-out pairs (other questions)")
    p.add_argument("--gen-checks", type=int, default=30, help="held-out arithmetic questions answered greedily and checked")
    return p.parse_args(argv)


def settings(args, data: str, **over) -> dict:
    """Config overrides shared by the SFT and the ORPO run of one data set (only λ differs)."""
    return {"model.name": BASE_MODEL, "model.backend": "torch", "data.path": data, "data.max_length": args.max_length,
            "data.max_prompt_length": min(256, args.max_length // 2), "run.seed": args.seed, "run.save_every": 0,
            "run.eval_max_pairs": -1, "optim.batch_size": 4, **over}


def train_pair_of_runs(args, runs_dir: Path, name: str, over: dict) -> dict:
    """The λ = 0 run and the ORPO run; returns {label: {"run_dir", "evals", "train", "wall_s"}}."""
    from orpo_local import TrainConfig, train
    from orpo_local.events import Evaluated, Step

    runs = {}
    for label, lam in (("sft", 0.0), ("orpo", args.lambda_)):
        evals, steps = [], []

        def record(event, evals=evals, steps=steps):
            if isinstance(event, Evaluated):
                evals.append({"step": event.step, **event.metrics})
            elif isinstance(event, Step):
                steps.append({"step": event.step, **event.metrics})

        config = TrainConfig().with_overrides({**over, "orpo.lambda_": lam, "run.runs_dir": str(runs_dir), "run.name": f"{name}-{label}"})
        log(f"{name}: training {label} (λ = {lam:g}), {config.optim.max_steps} steps")
        tic = time.perf_counter()
        result = train(config, on_event=record)
        if result.status != "finished":
            raise SystemExit(f"{name}-{label} did not finish: {result.status}")
        runs[label] = {"run_dir": result.run_dir, "evals": evals, "train": steps, "wall_s": time.perf_counter() - tic}
    return runs


def held_out_scores(runs: dict, data: str | None) -> dict:
    """{"base", "sft", "orpo"} summaries of evaluate_run on the held-out pairs (data None = each run's val split)."""
    from orpo_local.evaluate import evaluate_run

    scores = {}
    for label, run in runs.items():
        log(f"scoring base and {label} on the held-out pairs")
        result = evaluate_run(run["run_dir"], data=data, split="val", backend_name="torch")
        scores.setdefault("base", result["base"])
        scores[label] = result["tuned"]
    return scores


def sessions(runs: dict, max_tokens: int):
    """(label, ChatSession) for base, SFT and ORPO in turn, greedy."""
    from orpo_local import ChatSession

    yield "base", ChatSession.from_model(BASE_MODEL, backend="torch", temperature=0.0, max_tokens=max_tokens)
    for label, run in runs.items():
        yield label, ChatSession.from_run(run["run_dir"], temperature=0.0, max_tokens=max_tokens)


def greedy_replies(runs: dict, prompts: list[str], max_tokens: int) -> dict[str, list[str]]:
    replies = {}
    for label, chat in sessions(runs, max_tokens):
        log(f"greedy replies from {label} to {len(prompts)} prompts")
        replies[label] = []
        for prompt in prompts:
            chat.reset()
            replies[label].append(chat.reply(prompt))
    return replies


def final_number(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def write_jsonl(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def zh_part(args, runs_dir: Path) -> dict:
    over = settings(args, "zh-sample", **{"optim.max_steps": args.steps, "run.eval_every": args.eval_every,
                                          "data.val_fraction": args.val_fraction})
    runs = train_pair_of_runs(args, runs_dir, "zh", over)
    scores = held_out_scores(runs, None)
    prompts = held_out_prompts(runs["orpo"]["run_dir"], 3)
    replies = greedy_replies(runs, prompts, max_tokens=80)
    return {"overrides": over, "runs": runs, "scores": scores, "prompts": prompts, "replies": replies}


def held_out_prompts(run_dir: Path, n: int) -> list[str]:
    """The first `n` single-turn prompts of the run's held-out split."""
    from orpo_local.config import TrainConfig
    from orpo_local.data import inspect_data, split_pairs

    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    pairs = inspect_data(config.data.path, config.data.format, config.data.max_pairs).pairs
    _, val = split_pairs(pairs, config.data.val_fraction, config.run.seed, config.data.val_min_pairs)
    single = [p.prompt_messages()[-1]["content"] for p in val if len(p.prompt_messages()) == 1]
    return single[:n]


def arith_part(args, runs_dir: Path) -> dict:
    from orpo_local.data.synthetic import arithmetic_pairs

    pairs = arithmetic_pairs(args.arith_train + args.arith_held, seed=args.seed)
    train_file = write_jsonl(runs_dir / "arith-train.jsonl", pairs[: args.arith_train])
    held = pairs[args.arith_train:]
    held_file = write_jsonl(runs_dir / "arith-held-out.jsonl", held)
    # short pairs (~70 tokens): 8 a step at twice the default learning rate cost less than 4 zh-sample pairs
    over = settings(args, str(train_file), **{"optim.max_steps": args.arith_steps, "optim.batch_size": 8, "optim.learning_rate": 1e-3,
                                              "run.eval_every": 0, "data.val_fraction": 0.0})
    runs = train_pair_of_runs(args, runs_dir, "arith", over)
    scores = held_out_scores(runs, str(held_file))
    checked = held[: args.gen_checks]
    replies = greedy_replies(runs, [p.prompt_messages()[-1]["content"] for p in checked], max_tokens=40)
    for label, texts in replies.items():
        right = sum(final_number(t) == p.meta["answer"] for t, p in zip(texts, checked))
        scores[label]["greedy correct"] = right / len(checked)
    over["data.path"] = f"arithmetic_pairs({args.arith_train + args.arith_held}, seed={args.seed})[:{args.arith_train}]"
    return {"overrides": over, "runs": runs, "scores": scores, "held_out": len(held),
            "prompts": [p.prompt_messages()[-1]["content"] for p in checked], "answers": [p.meta["answer"] for p in checked],
            "replies": replies}


def plot(zh: dict, lam: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = {"sft": "SFT (λ = 0)", "orpo": f"ORPO (λ = {lam:g})"}
    colors = {"sft": "tab:blue", "orpo": "tab:red"}
    for ax, label in zip(axes[:2], ("sft", "orpo")):
        evals = zh["runs"][label]["evals"]
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["logps/chosen"] for e in evals], "o-", color="tab:green", label="chosen")
        ax.plot(steps, [e["logps/rejected"] for e in evals], "s--", color="tab:purple", label="rejected")
        ax.set_title(f"{titles[label]}: held-out log-probs")
        ax.set_xlabel("step")
        ax.set_ylabel("mean log-prob per response token")
        ax.grid(alpha=0.3)
        ax.legend()
    low = min(min(e["logps/rejected"], e["logps/chosen"]) for r in zh["runs"].values() for e in r["evals"])
    high = max(max(e["logps/rejected"], e["logps/chosen"]) for r in zh["runs"].values() for e in r["evals"])
    pad = 0.05 * (high - low)
    for ax in axes[:2]:
        ax.set_ylim(low - pad, high + pad)
    for label in ("sft", "orpo"):
        evals = zh["runs"][label]["evals"]
        axes[2].plot([e["step"] for e in evals], [e["logps/chosen"] - e["logps/rejected"] for e in evals], "o-",
                     color=colors[label], label=titles[label])
    axes[2].set_title("held-out margin: chosen − rejected")
    axes[2].set_xlabel("step")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(f"{BASE_MODEL}, zh-sample held-out split, same seed and steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_rows(zh: dict) -> list[dict]:
    by_step = {}
    for label in ("sft", "orpo"):
        for e in zh["runs"][label]["evals"]:
            by_step.setdefault(e["step"], {"step": e["step"]})[label] = {
                "chosen": e["logps/chosen"], "rejected": e["logps/rejected"], "margin": e["logps/chosen"] - e["logps/rejected"],
                "accuracy": e["rewards/accuracies"]}
    return [by_step[s] for s in sorted(by_step)]


def report(results: dict) -> str:
    """Markdown tables of one run of this script."""
    lam = results["lambda"]
    names = {"base": "base", "sft": "SFT (λ = 0)", "orpo": f"ORPO (λ = {lam:g})"}
    out = ["### Held-out log-probs over training (zh-sample)", "",
           "| step | SFT chosen | SFT rejected | SFT margin | ORPO chosen | ORPO rejected | ORPO margin |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in results["zh"]["curves"]:
        cells = [f"{row[m][k]:.3f}" if k != "margin" else f"{row[m][k]:+.3f}" for m in ("sft", "orpo") for k in ("chosen", "rejected", "margin")]
        out.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    for part, title in (("zh", "zh-sample held-out split"), ("arith", "synthetic arithmetic, held-out questions")):
        scores = results[part]["scores"]
        keys = [k for k in EVAL_KEYS + ("greedy correct",) if k in scores["base"]]
        out += ["", f"### {title} ({scores['base']['pairs']} pairs)", "",
                "| model | " + " | ".join(keys) + " |", "| --- |" + " ---: |" * len(keys)]
        for label in ("base", "sft", "orpo"):
            out.append(f"| {names[label]} | " + " | ".join(f"{scores[label][k]:+.4f}" if k == "margin" else f"{scores[label][k]:.4f}"
                                                           for k in keys) + " |")
    for part in ("zh", "arith"):
        shown = results[part]["prompts"][:3] if part == "zh" else results[part]["prompts"][:4]
        out += ["", f"### Greedy replies ({'zh-sample' if part == 'zh' else 'arithmetic'} held-out prompts)", ""]
        for i, prompt in enumerate(shown):
            answer = f" (right answer: {results[part]['answers'][i]})" if part == "arith" else ""
            out += [f"**{prompt}**{answer}", "", "| model | greedy reply |", "| --- | --- |"]
            for label in ("base", "sft", "orpo"):
                text = results[part]["replies"][label][i].rstrip("\ufffd").replace("|", "\\|").replace("\n", "<br>")
                out.append(f"| {names[label]} | {text} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def plain(part: dict) -> dict:
    """A part's results without run folders (they live in a temporary folder) and with rounded curves."""
    runs = {label: {"wall_s": round(r["wall_s"], 1), "evals": r["evals"], "train": r["train"]} for label, r in part["runs"].items()}
    return {**{k: v for k, v in part.items() if k != "runs"}, "runs": runs}


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orpo-quality-") as tmp:
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        zh = zh_part(args, runs_dir)
        zh["curves"] = curve_rows(zh)
        plot(zh, args.lambda_, out / "logps.png")
        arith = arith_part(args, runs_dir)
        info = json.loads((zh["runs"]["orpo"]["run_dir"] / "run.json").read_text(encoding="utf-8"))
    import torch

    results = {
        "command": "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "lambda": args.lambda_, "seed": args.seed,
        "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "device": info.get("device"), "dtype": info.get("dtype")},
        "wall_s": round(time.perf_counter() - tic, 1),
        "zh": plain(zh), "arith": plain(arith),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(report(results), encoding="utf-8")
    log(f"done in {results['wall_s'] / 60:.1f} min: {out / 'logps.png'}, {out / 'results.json'}, {out / 'report.md'}")


if __name__ == "__main__":
    main()
