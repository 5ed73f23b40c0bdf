"""The recipe sweep behind the config's defaults: which λ, learning rate, epochs and NLL scope make a
default run align the bundled model on prompts it never trained on?

    python bench/recipe.py --out docs/recipe                              # torch sweep, zh-sample + en-sample
    LD_PRELOAD="$(python -c 'from orpo_local.openblas import find_openblas; print(find_openblas())')" \
      python bench/recipe.py --out docs/recipe-mlx --backend mlx --max-steps 24 --skip-sweep --data zh-sample   # MLX, shorter

Every run trains on the same training split and is scored on the same held-out split: the run's own
validation pairs (data.val_fraction 0.1, at least 32 pairs, prompt-disjoint from training, never
trained on), evaluated at step 0 (the base model), every --eval-every steps and at the end. The
sweep is adaptive, in stages, each judged by the held-out margin (accuracy as tie-break); stages
1-3 are a screen of --screen-epochs (half an epoch: 36 steps of 4 pairs on zh-sample), so that the
sweep fits in about an hour of a 2-core CPU:
  1. λ in --lambdas at the default learning rate, with SFT (λ = 0) as the control;
  2. the best λ at the other learning rates;
  3. the best (λ, lr) with the NLL over prompt and answer (TRL's and the paper's scope);
  4. the best recipe for --long-epochs epochs (the screen's length is the other epoch count).
"chosen" is the config's current defaults (what a default `orpo-local train` runs), and SFT at the
same steps; both are run on each data set. Greedy replies of base / SFT / chosen to a few held-out
prompts close the report.

Writes <out>/results.json after every run and <out>/report.md with the tables docs/quality.md
shows; run folders go to --runs-dir. A rerun of the same command reuses every run whose recipe it
already has (so a stopped sweep continues, and "chosen" costs nothing when it equals a swept
recipe). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

BASE_MODEL = "smollm2-135m-instruct"


def log(text: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/recipe", help="folder for results.json and report.md")
    p.add_argument("--model", default=BASE_MODEL, help="model to tune (default: the bundled one)")
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--data", default="zh-sample,en-sample", help="comma-separated data sets; the sweep runs on the first")
    p.add_argument("--lambdas", default="0.1,0.25,0.5,1,2", help="λ values of stage 1")
    p.add_argument("--lrs", default="1e-3", help="other learning rates of stage 2")
    p.add_argument("--screen-epochs", type=float, default=0.5, help="epochs of the stage 1-3 runs (a screen: half an epoch)")
    p.add_argument("--long-epochs", type=float, default=1.0, help="epochs of stage 4")
    p.add_argument("--eval-every", type=int, default=24)
    p.add_argument("--max-steps", type=int, default=-1, help="cap every run at this many steps (-1 = by epochs)")
    p.add_argument("--skip-sweep", action="store_true", help="run only the defaults and SFT at the same steps")
    p.add_argument("--runs-dir", default="runs/recipe", help="where the run folders go (kept, so a rerun can reuse them)")
    p.add_argument("--replies", type=int, default=3, help="held-out prompts answered greedily by base / SFT / chosen")
    return p.parse_args(argv)


def base_overrides(args, data: str) -> dict:
    """What every run shares: model, data, backend, split, seed and evaluation (not the recipe)."""
    return {"model.name": args.model, "model.backend": args.backend, "data.path": data, "run.save_every": 0,
            "run.eval_every": args.eval_every, "run.eval_max_pairs": -1, "optim.max_steps": args.max_steps}


def chosen_recipe() -> dict:
    """The config's defaults for the settings the sweep varies."""
    from orpo_local import TrainConfig

    c = TrainConfig()
    return {"orpo.lambda_": c.orpo.lambda_, "optim.learning_rate": c.optim.learning_rate, "optim.epochs": c.optim.epochs,
            "orpo.nll_on_prompt": c.orpo.nll_on_prompt, "optim.warmup_steps": c.optim.warmup_steps, "optim.schedule": c.optim.schedule}


def label(recipe: dict) -> str:
    parts = [f"λ={recipe['orpo.lambda_']:g}", f"lr={recipe['optim.learning_rate']:g}", f"epochs={recipe['optim.epochs']:g}"]
    return " ".join(parts) + (" nll+prompt" if recipe.get("orpo.nll_on_prompt") else "")


def score(result: dict) -> tuple[float, float]:
    final = result["evals"][-1]
    return final["margin"], final["accuracy"]


def run_one(args, runs_dir: Path, data: str, name: str, recipe: dict) -> dict:
    from orpo_local import TrainConfig, train
    from orpo_local.events import Evaluated, Verdict

    evals, verdicts = [], []

    def record(event):
        if isinstance(event, Evaluated):
            m = event.metrics
            evals.append({"step": event.step, "accuracy": m["rewards/accuracies"], "margin": m["logps/chosen"] - m["logps/rejected"],
                          "chosen": m["logps/chosen"], "rejected": m["logps/rejected"], "nll": m["nll_loss"]})
        elif isinstance(event, Verdict):
            verdicts.append(event.text)

    config = TrainConfig().with_overrides({**base_overrides(args, data), **recipe, "run.runs_dir": str(runs_dir), "run.name": name})
    log(f"{data}: {name} ({label(recipe)})")
    tic = time.perf_counter()
    run = train(config, on_event=record, progress=False)
    info = json.loads((run.run_dir / "run.json").read_text(encoding="utf-8"))
    return {"name": name, "data": data, "recipe": recipe, "backend": args.backend, "max_steps": args.max_steps, "label": label(recipe), "steps": run.step, "evals": evals,
            "verdict": verdicts[0] if verdicts else "", "best": info.get("best"), "wall_s": round(time.perf_counter() - tic, 1),
            "run_dir": os.path.relpath(run.run_dir), "val_pairs": info["data"]["val_pairs"], "train_pairs": info["data"]["train_pairs"],
            "device": info.get("device"), "dtype": info.get("dtype")}


class Sweep:
    """Runs recipes once each, saving results.json after every run, so a rerun continues."""

    def __init__(self, args, out: Path, runs_dir: Path):
        self.args, self.out, self.runs_dir = args, out, runs_dir
        path = out / "results.json"
        self.results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"runs": {}}
        self.results["command"] = "python bench/recipe.py " + " ".join(sys.argv[1:])

    def run(self, data: str, name: str, recipe: dict) -> dict:
        key = f"{data}/{name}"
        same = [r for r in self.results["runs"].values() if r["data"] == data and r["recipe"] == recipe
                and r["backend"] == self.args.backend and r["max_steps"] == self.args.max_steps and Path(r["run_dir"]).exists()]
        if same:
            done = {**same[0], "name": name}
        else:
            done = run_one(self.args, self.runs_dir, data, name, recipe)
        if self.results["runs"].get(key) != done:
            self.results["runs"][key] = done
            self.save()
        log(f"  {key}: held-out margin {done['evals'][-1]['margin']:+.4f}, accuracy {done['evals'][-1]['accuracy']:.3f}")
        return done

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, ensure_ascii=False), encoding="utf-8")


def sft_of(recipe: dict) -> dict:
    return {**recipe, "orpo.lambda_": 0.0}


# Where the sweep starts: the paper's λ and the learning rate the defaults had before the sweep.
START = {"orpo.lambda_": 0.1, "optim.learning_rate": 5e-4, "optim.epochs": 1.0, "orpo.nll_on_prompt": False,
         "optim.warmup_steps": 3, "optim.schedule": "cosine"}


def sweep(s: Sweep, data: str) -> None:
    """Stages 1-4 of the module docstring on `data`."""
    screen = {**START, "optim.epochs": s.args.screen_epochs}
    lr0 = START["optim.learning_rate"]
    s.run(data, "sft-screen", sft_of(screen))
    stage1 = [s.run(data, f"lambda-{lam:g}", {**screen, "orpo.lambda_": lam}) for lam in map(float, s.args.lambdas.split(","))]
    best = max(stage1, key=score)
    stage2 = [best] + [s.run(data, f"lambda-{best['recipe']['orpo.lambda_']:g}-lr-{lr:g}", {**best["recipe"], "optim.learning_rate": lr})
                       for lr in map(float, s.args.lrs.split(",")) if lr != lr0]
    best = max(stage2, key=score)
    nll = s.run(data, "best-nll-on-prompt", {**best["recipe"], "orpo.nll_on_prompt": True})
    best = max([best, nll], key=score)
    # SFT at the longer run's steps is the control "chosen" gets when the defaults take more epochs
    s.run(data, "best-long", {**best["recipe"], "optim.epochs": s.args.long_epochs})


def greedy(s: Sweep, data: str, n: int) -> dict:
    """Greedy replies of base, SFT and chosen to the first n single-turn held-out prompts."""
    from orpo_local import ChatSession
    from orpo_local.config import TrainConfig
    from orpo_local.data import inspect_data, split_pairs

    chosen = s.results["runs"][f"{data}/chosen"]
    config = TrainConfig.from_yaml(Path(chosen["run_dir"]) / "config.yaml")
    _, val = split_pairs(inspect_data(config.data.path).pairs, config.data.val_fraction, config.run.seed, config.data.val_min_pairs)
    prompts = [p.prompt_messages()[-1]["content"] for p in val if len(p.prompt_messages()) == 1][:n]
    sessions = {"base": ChatSession.from_model(s.args.model, backend=s.args.backend, temperature=0.0, max_tokens=60)}
    for name, key in (("SFT", "sft-steps"), ("chosen", "chosen")):
        sessions[name] = ChatSession.from_run(s.results["runs"][f"{data}/{key}"]["run_dir"], temperature=0.0, max_tokens=60)
    replies = {}
    for name, chat in sessions.items():
        replies[name] = []
        for prompt in prompts:
            chat.reset()
            replies[name].append(chat.reply(prompt))
    return {"prompts": prompts, "replies": replies}


def report(results: dict) -> str:
    out = []
    for data in results["data"]:
        runs = [r for k, r in results["runs"].items() if r["data"] == data]
        if not runs:
            continue
        first = runs[0]
        base = first["evals"][0]
        out += [f"### {data}: {first['val_pairs']} held-out pairs (prompt-disjoint), {first['train_pairs']} training pairs", "",
                "| run | recipe | steps | accuracy | margin | logp chosen | logp rejected | NLL chosen | best step (margin) | wall |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                f"| base | (no training) | 0 | {base['accuracy']:.3f} | {base['margin']:+.4f} | {base['chosen']:.3f} | "
                f"{base['rejected']:.3f} | {-base['chosen']:.3f} | | |"]
        for r in runs:
            e = r["evals"][-1]
            nll = f"{e['nll']:.3f}" + ("ᵖ" if r["recipe"].get("orpo.nll_on_prompt") else "")
            best = f"{r['best']['step']} ({r['best']['margin']:+.4f})" if r.get("best") else ""
            out.append(f"| {r['name']} | {r['label']} | {r['steps']} | {e['accuracy']:.3f} | {e['margin']:+.4f} | {e['chosen']:.3f} | "
                       f"{e['rejected']:.3f} | {nll} | {best} | {r['wall_s'] / 60:.1f} min |")
        out.append("")
        gen = results.get("greedy", {}).get(data)
        if gen:
            out += [f"Greedy replies to held-out {data} prompts (60 tokens at most):", ""]
            for i, prompt in enumerate(gen["prompts"]):
                out += [f"**{prompt}**", "", "| model | greedy reply |", "| --- | --- |"]
                for name, texts in gen["replies"].items():
                    out.append(f"| {name} | {texts[i].replace('|', '/').replace(chr(10), '<br>')} |")
                out.append("")
    out.append("ᵖ: the NLL of a run with `nll_on_prompt` counts prompt tokens too (its own objective); the other columns compare as they are.")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = args.data.split(",")
    tic = time.perf_counter()
    s = Sweep(args, out, Path(args.runs_dir).resolve())
    default = chosen_recipe()
    s.results.update(data=datasets, defaults=default, backend=args.backend)
    for i, data in enumerate(datasets):
        if i == 0 and not args.skip_sweep:
            sweep(s, data)
        s.run(data, "chosen", default)
        s.run(data, "sft-steps", sft_of(default))
        s.results.setdefault("greedy", {})[data] = greedy(s, data, args.replies)
        s.save()
    import torch

    s.results["machine"] = {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                            "torch": torch.__version__}
    s.results["wall_s"] = round(time.perf_counter() - tic, 1)
    s.save()
    (out / "report.md").write_text(report(s.results), encoding="utf-8")
    log(f"done in {(time.perf_counter() - tic) / 60:.1f} min: {out / 'results.json'}, {out / 'report.md'}")


if __name__ == "__main__":
    main()
