"""Did ORPO change the model the way we wanted? Score pairs with the base model and the tuned one.

    report = evaluate_run("runs/my-run", data="heldout.jsonl")   # or data=None: the run's validation pairs
    print(format_table(report))

Preference accuracy is the share of pairs with logp(chosen) > logp(rejected), the length-normalised
log-probs of ORPO_SPEC.md; margin is the mean logp(chosen) - logp(rejected); log-odds ratio is the
mean log odds(chosen) - log odds(rejected); NLL is the chosen responses' token-mean NLL.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .data import inspect_data
from .runs import final_adapter, resolve_checkpoint, run_backend, run_template
from .scoring import score_pairs
from .tokenization import ChatEncoder, tokenize_pairs

COLUMNS = (("accuracy", "rewards/accuracies"), ("logp chosen", "logps/chosen"), ("logp rejected", "logps/rejected"),
           ("margin", "margin"), ("log-odds ratio", "log_odds_chosen"), ("NLL chosen", "nll_loss"))


def _summary(metrics: dict, n_pairs: int) -> dict:
    out = {name: metrics[key] for name, key in COLUMNS if key in metrics}
    out["margin"] = metrics["logps/chosen"] - metrics["logps/rejected"]
    out["pairs"] = n_pairs
    return out


def evaluate_run(target: str | Path, data: str | None = None, split: str = "val", max_pairs: int = -1,
                 data_format: str = "auto", backend_name: str | None = None, checkpoint: str | None = None,
                 columns: dict | None = None, template: str = "auto") -> dict:
    """Metrics of the base model and (for a run) the tuned one on the same pairs.

    target: a run folder, or a model name/path (then only "base" is reported).
    data: pairs to score; None with a run = its own validation ("val") or training ("train") pairs.
    checkpoint: the run's adapter to score: None (the final one), "best", "step-N" or a folder.
    columns, template: data.columns for `data`, and the template of a model that is not a run (a run uses its own).
    """
    from .backends import get_backend
    from .train import prepare_data

    run_dir = Path(target) if (Path(target) / "config.yaml").exists() else None
    config = TrainConfig.from_yaml(run_dir / "config.yaml") if run_dir else TrainConfig().with_overrides({"model.name": str(target)})
    if backend_name is None:
        backend_name = run_backend(run_dir, config.model.backend) if run_dir else config.model.backend
    backend = get_backend(backend_name)
    backend.load(config.model, None, config.run.seed, trainable=False)
    encoder = ChatEncoder(backend.tokenizer, run_template(run_dir) if run_dir else template)
    if data is None:
        if run_dir is None:
            raise ValueError("give --data to evaluate a model that is not a run folder")
        train_pairs, val_pairs, _ = prepare_data(config, encoder)
        pairs, source = (val_pairs if split == "val" else train_pairs), f"{run_dir} ({split} split)"
        if not pairs:
            raise ValueError(f"{run_dir}: the run has no {split} pairs; pass --data")
    else:
        report = inspect_data(data, data_format, columns=columns)
        if not report.pairs:
            raise ValueError(f"{data}: no valid pairs")
        pairs, _ = tokenize_pairs(report.pairs, encoder, config.data.max_length, config.data.max_prompt_length)
        source = report.source
    if max_pairs > 0:
        pairs = pairs[:max_pairs]
    orpo = replace(config.orpo, nll_on_prompt=False)
    result = {"target": str(target), "data": source, "backend": backend.name,
              "base": _summary(score_pairs(backend, pairs, encoder.pad_id, orpo), len(pairs))}
    if run_dir is not None:
        folder = resolve_checkpoint(run_dir, checkpoint)
        adapter = folder / "adapter" if folder else final_adapter(run_dir)
        if adapter is None:
            raise FileNotFoundError(f"{run_dir}: no adapter yet")
        backend.load(config.model, None, config.run.seed, adapter=adapter, trainable=False)
        result["tuned"] = _summary(score_pairs(backend, pairs, encoder.pad_id, orpo), len(pairs))
        result["adapter"] = str(adapter)
    return result


def format_table(result: dict) -> str:
    models = [m for m in ("base", "tuned") if m in result]
    width = max(len(name) for name, _ in COLUMNS)
    lines = [f"{result['data']}: {result['base']['pairs']} pairs, {result['backend']} backend",
             f"{'':<{width}}  " + "  ".join(f"{m:>10}" for m in models)]
    for name, _ in COLUMNS:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{result[m][name]:>10.4f}" for m in models))
    return "\n".join(lines)
