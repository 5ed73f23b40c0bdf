"""Metric records (metrics.jsonl rows) as long-form tables for gr.LinePlot: one line per series."""

from __future__ import annotations

import pandas as pd

from orpo_local.runs import read_metrics

# plot key -> (metric, series name) pairs; train rows are drawn for every step, eval rows as "eval ..."
PLOTS = {
    "plot.loss": (("loss", "loss"), ("nll_loss", "NLL"), ("or_loss", "λ·OR part")),
    "plot.accuracy": (("rewards/accuracies", "accuracy"),),
    "plot.logps": (("logps/chosen", "chosen"), ("logps/rejected", "rejected")),
    "plot.margin": (("margin", "logp margin"), ("log_odds_chosen", "log odds ratio")),
}
COLUMNS = ["step", "value", "series"]


def table(points: list[tuple]) -> pd.DataFrame:
    """Typed columns: the browser fixes each axis's type (quantitative vs nominal) from the first value."""
    df = pd.DataFrame(points, columns=COLUMNS)
    return df.astype({"step": "int64", "value": "float64", "series": "string"})


def _value(row: dict, metric: str) -> float | None:
    if metric == "margin":
        return row["logps/chosen"] - row["logps/rejected"] if "logps/chosen" in row else None
    if metric == "or_loss" and "loss" in row and "nll_loss" in row:
        return row["loss"] - row["nll_loss"]  # the λ-weighted odds-ratio part of this loss
    return row.get(metric)


def frames(rows: list[dict]) -> dict[str, pd.DataFrame]:
    """{plot key: DataFrame(step, value, series)} from metric records.

    Every series is present from the first frame on (a NaN point where it has no data yet): the
    browser fixes a plot's legend at its first data, and a series that appears later is never drawn.
    """
    out = {}
    for key, series in PLOTS.items():
        points = [(0, float("nan"), prefix + name) for prefix in ("", "eval ") for _, name in series]
        for row in rows:
            prefix = "eval " if row.get("split") == "eval" else ""
            for metric, name in series:
                value = _value(row, metric)
                if value is not None:
                    points.append((row["step"], float(value), prefix + name))
        out[key] = table(points)
    return out


def run_frames(run_dir: str | None) -> dict[str, pd.DataFrame]:
    return frames(read_metrics(run_dir) if run_dir else [])


def line_plots(engine, prefix: str, scale: int = 1) -> list:
    """The four metric plots (elem_id "<prefix>-plot-loss", ...), registered for translation, in PLOTS order."""
    import gradio as gr

    plots = []
    for key in PLOTS:
        plot = gr.LinePlot(None, x="step", y="value", color="series", label=engine.t(key),
                           show_label=True, scale=scale, min_width=560,
                           elem_id=f"{prefix}-{key.replace('.', '-')}")
        plots.append(engine.tr(plot, key))
    return plots
