"""Metric records (metrics.jsonl rows) as the Train and Runs tabs' charts (Altair, drawn by gr.Plot).

Per-step training values are noisy (reward accuracy over 4 pairs jumps between 0 and 1), so each
training series is drawn as faint points with a smoothed line over them; validation results,
step 0's (the base model) included, are markers joined by a dashed line. The accuracy chart also
shows the odds-ratio term's share of the loss, so a λ too small to matter is visible.
"""

from __future__ import annotations

import pandas as pd

from orpo_local.runs import read_metrics

# plot key -> (metric, series name) pairs
PLOTS = {
    "plot.loss": (("loss", "loss"), ("nll_loss", "NLL"), ("or_part", "λ·OR part")),
    "plot.accuracy": (("rewards/accuracies", "accuracy"), ("or_share", "λ·OR share of loss")),
    "plot.logps": (("logps/chosen", "chosen"), ("logps/rejected", "rejected")),
    "plot.margin": (("margin", "logp margin"), ("log_odds_chosen", "log odds ratio")),
}
COLUMNS = ["step", "value", "series", "kind"]  # kind: step (raw per-step point) | smoothed | eval
SMOOTHING = 0.8  # weight of the running average, as TensorBoard's smoothing slider


def _value(row: dict, metric: str) -> float | None:
    if metric == "margin":
        return row["logps/chosen"] - row["logps/rejected"] if "logps/chosen" in row else None
    if metric in ("or_part", "or_share") and "loss" in row and "nll_loss" in row:
        part = row["loss"] - row["nll_loss"]  # the λ-weighted odds-ratio term of this loss
        return part if metric == "or_part" else (part / row["loss"] if row["loss"] else None)
    return row.get(metric)


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first point is itself, later ones lean on the past."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def frames(rows: list[dict]) -> dict[str, pd.DataFrame]:
    """{plot key: DataFrame(step, value, series, kind)} from metric records."""
    out = {}
    for key, series in PLOTS.items():
        points = []
        for metric, name in series:
            train = [(r["step"], v) for r in rows if r.get("split") == "train" and (v := _value(r, metric)) is not None]
            points += [(s, v, name, "step") for s, v in train]
            points += [(s, v, name, "smoothed") for (s, _), v in zip(train, smooth([v for _, v in train]))]
            points += [(r["step"], v, name, "eval") for r in rows if r.get("split") == "eval" and (v := _value(r, metric)) is not None]
        df = pd.DataFrame(points, columns=COLUMNS)
        out[key] = df.astype({"step": "int64", "value": "float64", "series": "string", "kind": "string"})
    return out


def chart(df: pd.DataFrame):
    """Faint per-step points, a smoothed line per series, and validation markers on a dashed line."""
    import altair as alt

    names = sorted(df["series"].unique()) if len(df) else []
    color = alt.Color("series:N", title=None, scale=alt.Scale(domain=names), legend=alt.Legend(orient="bottom"))
    x, y = alt.X("step:Q", title="step"), alt.Y("value:Q", title=None, scale=alt.Scale(zero=False))
    base = alt.Chart(df).encode(x=x, y=y, color=color, tooltip=["series", "kind", "step", alt.Tooltip("value:Q", format=".4f")])
    steps = base.transform_filter(alt.datum.kind == "step").mark_circle(size=14, opacity=0.3)
    smoothed = base.transform_filter(alt.datum.kind == "smoothed").mark_line(strokeWidth=2)
    evals = base.transform_filter(alt.datum.kind == "eval")
    marks = evals.mark_line(strokeDash=[4, 3], strokeWidth=1) + evals.mark_point(size=70, filled=True, shape="diamond")
    return alt.layer(steps, smoothed, marks).properties(height=220, width=500)  # "container" collapses in gr.Plot


def run_charts(run_dir: str | None) -> dict:
    """{plot key: chart} of a run's metrics.jsonl (empty charts for None)."""
    return {key: chart(df) for key, df in frames(read_metrics(run_dir) if run_dir else []).items()}


def line_plots(engine, prefix: str, scale: int = 1) -> list:
    """The four metric plots (elem_id "<prefix>-plot-loss", ...), registered for translation, in PLOTS order."""
    import gradio as gr

    plots = []
    for key in PLOTS:
        plot = gr.Plot(None, label=engine.t(key), show_label=True, scale=scale, min_width=560,
                       elem_id=f"{prefix}-{key.replace('.', '-')}")
        plots.append(engine.tr(plot, key))
    return plots
