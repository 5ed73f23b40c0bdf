"""Did the run align the model? The end-of-run verdict from the validation evaluations.

The base model is the evaluation at step 0 (no adapter update yet), the tuned model the last one.
Better means a higher mean log-prob margin, logp(chosen) - logp(rejected), with preference accuracy
not lower. The margin is not λ-scaled (`rewards/margins` is), so it compares across λ, SFT included.
"""

from __future__ import annotations

from .events import Verdict


def margin(metrics: dict) -> float:
    return metrics["logps/chosen"] - metrics["logps/rejected"]


def is_better(metrics: dict, best: dict | None) -> bool:
    """Is this evaluation better than the best so far (by margin, then accuracy)?"""
    if best is None:
        return True
    key = (margin(metrics), metrics["rewards/accuracies"])
    return key > (best["margin"], best["accuracy"])


def verdict(evals: list[dict], best: dict | None, config) -> Verdict | None:
    """The verdict from eval rows (metrics.jsonl); None without a step-0 and a later evaluation."""
    by_step = {row["step"]: row for row in evals}
    if 0 not in by_step or max(by_step) == 0:
        return None
    base, last = by_step[0], by_step[max(by_step)]
    acc0, acc1, m0, m1 = base["rewards/accuracies"], last["rewards/accuracies"], margin(base), margin(last)
    text = f"validation preference accuracy {acc0:.2f} → {acc1:.2f}, margin {m0:+.3f} → {m1:+.3f}"
    if best is not None:
        text += f" (best at step {best['step']}: accuracy {best['accuracy']:.2f}, margin {best['margin']:+.3f})"
    better = m1 > m0 and acc1 >= acc0
    if not better:
        text = "the tuned model is not better than the base model on the validation pairs: " + text
        if best is not None and best["margin"] > m0 and best["accuracy"] >= acc0:
            text += f"; the best checkpoint is: use it with `--checkpoint best` (step {best['step']})"
        text += (f". To align more: raise λ (orpo.lambda_, now {config.orpo.lambda_:g}; 0 is plain SFT), train more "
                 f"epochs (optim.epochs, now {config.optim.epochs:g}), or pick a larger model")
    return Verdict(text=text, better=better, step=max(by_step),
                   base={"accuracy": acc0, "margin": m0}, tuned={"accuracy": acc1, "margin": m1}, best=best)
