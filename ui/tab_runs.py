"""Runs tab: every run with status and key metrics; one run's config and plots; delete, export,
and evaluate base vs tuned on a dataset."""

from __future__ import annotations

import json
import queue
import threading
import time
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from orpo_local.export import QUANTS, TARGETS, export, export_adapter, gguf_commands
from orpo_local.runs import BEST_DIR, backend_text, checkpoints, delete_run, list_runs, read_json, status_text, write_json
from orpo_local.verdict import margin as logp_margin

from .plots import line_plots, run_charts
from .tab_data import dataset_choices

COLUMNS = ("col.run", "col.status", "col.backend", "col.model", "col.step", "col.loss", "col.accuracy", "col.margin", "col.created")


def runs_table(engine) -> pd.DataFrame:
    rows = []
    for r in list_runs(engine.runs_dir):
        last = r["last_eval"] or r["last_train"]
        metric = lambda k: round(last[k], 4) if k in last else None  # noqa: E731
        margin = round(logp_margin(last), 4) if "logps/chosen" in last else None
        rows.append((Path(r["run_dir"]).name, status_text(r), backend_text(r), Path(str(r.get("base_model", "?"))).name,
                     f"{r.get('step', 0)}/{r.get('total_steps', 0)}", metric("loss"), metric("rewards/accuracies"),
                     margin, r.get("created_at", "")))
    return pd.DataFrame(rows, columns=[engine.t(c) for c in COLUMNS])


def run_choices(engine) -> list[tuple[str, str]]:
    return [(Path(r["run_dir"]).name, r["run_dir"]) for r in list_runs(engine.runs_dir)]


def refresh(engine, current: str | None):
    choices = run_choices(engine)
    values = [v for _, v in choices]
    value = current if current in values else (values[0] if values else None)
    return runs_table(engine), gr.update(choices=choices, value=value)


def show(engine, run_dir: str | None):
    """(config yaml, last evaluation table, four plots) of one run."""
    if not run_dir or not (Path(run_dir) / "config.yaml").exists():
        return ("", None, *run_charts(None).values())
    saved = Path(run_dir) / "eval.json"
    table = eval_table(json.loads(saved.read_text(encoding="utf-8"))) if saved.exists() else None
    return ((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"), table, *run_charts(run_dir).values())


def eval_table(result: dict) -> pd.DataFrame:
    names = [k for k in result["base"] if k != "pairs"]
    return pd.DataFrame({"metric": names, **{m: [round(result[m][k], 4) for k in names] for m in ("base", "tuned") if m in result}})


def delete(engine, run_dir: str | None, confirmed: bool):
    if not run_dir:
        return engine.t("runs.none"), gr.skip(), gr.skip(), False
    if not confirmed:
        return engine.t("runs.need_confirm"), gr.skip(), gr.skip(), False
    if engine.runner.busy and engine.runner.run_dir == run_dir:
        return engine.t("runs.active"), gr.skip(), gr.skip(), False
    try:
        delete_run(run_dir)
    except OSError as e:
        return engine.t("error", error=e), gr.skip(), gr.skip(), False
    table, pick = refresh(engine, None)
    return engine.t("runs.deleted", run=Path(run_dir).name), table, pick, False


def adapter_choices(engine, run_dir: str | None):
    """The adapters of a run to evaluate or export: the final one, best/ and every checkpoint."""
    choices = [(engine.t("runs.adapter_final"), "")]
    if run_dir and (Path(run_dir) / BEST_DIR / "best.json").exists():
        step = read_json(Path(run_dir) / BEST_DIR / "best.json")["step"]
        choices.append((engine.t("runs.adapter_best", step=step), BEST_DIR))
    choices += [(p.name, p.name) for _, p in reversed(checkpoints(run_dir))] if run_dir else []
    return gr.update(choices=choices, value="")


def export_zip(engine, run_dir: str | None, adapter: str | None):
    """The run's own adapter as a zip, offered for download."""
    if not run_dir:
        return engine.t("runs.none"), None
    try:
        out = export_adapter(run_dir, checkpoint=adapter or None)
    except Exception as e:  # noqa: BLE001 - shown in the page
        return engine.t("error", error=e), None
    return engine.show(out), str(out)


def export_to(engine, run_dir: str | None, adapter: str | None, to: str, quant: str):
    """Write one export target (orpo_local.export) in a worker thread; yields its progress lines, then where it went."""
    if not run_dir:
        yield engine.t("runs.none")
        return
    lines: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["out"] = export(run_dir, to, checkpoint=adapter or None, quant=quant, progress=lines.put)
        except Exception as e:  # noqa: BLE001 - shown in the page
            result["error"] = e
        finally:
            lines.put(None)

    threading.Thread(target=work, daemon=True).start()
    shown: list[str] = []
    while (line := lines.get()) is not None:
        shown = [*shown[-4:], line]
        yield "\n\n".join(shown)
    if "error" in result:
        yield engine.t("error", error=result["error"])
        return
    note = engine.t("runs.exported_to", path=engine.show(result["out"]))
    if to == "gguf":
        note += "\n\n" + "\n\n".join(f"`{command}`" for command in gguf_commands(result["out"]))
    yield note


def evaluate(engine, run_dir: str | None, adapter: str | None, data: str | None, max_pairs):
    from orpo_local.evaluate import evaluate_run

    if not run_dir:
        return engine.t("runs.none"), None
    try:
        result = evaluate_run(run_dir, data=data or None, max_pairs=int(max_pairs or -1), checkpoint=adapter or None)
    except Exception as e:  # noqa: BLE001 - a bad dataset or a missing backend is a message
        return engine.t("error", error=e), None
    out = Path(run_dir) / "eval.json"
    write_json(out, {**result, "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    table = eval_table(result)
    note = f"{engine.show(result['data'])}: {result['base']['pairs']} pairs · " + engine.t("runs.eval_done", path=engine.show(out))
    return note, table


def build(engine) -> None:
    table = engine.tr(gr.Dataframe(runs_table(engine), label=engine.t("runs.list"), interactive=False, elem_id="runs-table",
                                   max_height=260), "runs.list")
    with gr.Row():
        pick = engine.tr(gr.Dropdown(choices=run_choices(engine), label=engine.t("runs.pick"), elem_id="runs-pick", scale=3), "runs.pick")
        adapter = engine.tr(gr.Dropdown(choices=[(engine.t("runs.adapter_final"), "")], value="", label=engine.t("runs.adapter"),
                                        elem_id="runs-adapter", scale=2), "runs.adapter")
        refresh_btn = engine.tr(gr.Button(engine.t("runs.refresh"), scale=1, elem_id="runs-refresh"), "runs.refresh", "value")
    with gr.Row():
        confirm = engine.tr(gr.Checkbox(False, label=engine.t("runs.confirm"), elem_id="runs-confirm"), "runs.confirm")
        delete_btn = engine.tr(gr.Button(engine.t("runs.delete"), variant="stop", elem_id="runs-delete"), "runs.delete", "value")
        adapter_btn = engine.tr(gr.Button(engine.t("runs.export_adapter"), elem_id="runs-export-adapter"), "runs.export_adapter", "value")
    with gr.Row():
        targets = [(f"{name}: {what}", name) for name, what in TARGETS.items()]
        export_target = engine.tr(gr.Dropdown(choices=targets, value="gguf", label=engine.t("runs.export_to"), elem_id="runs-export-to",
                                              scale=3), "runs.export_to")
        export_quant = engine.tr(gr.Dropdown(choices=list(QUANTS), value=QUANTS[0], label=engine.t("runs.export_quant"),
                                             elem_id="runs-export-quant", scale=1), "runs.export_quant")
        export_btn = engine.tr(gr.Button(engine.t("runs.export"), elem_id="runs-export", scale=1), "runs.export", "value")
    notice = gr.Markdown(elem_id="runs-notice")
    download = engine.tr(gr.File(label=engine.t("runs.files"), interactive=False, elem_id="runs-download"), "runs.files")
    with gr.Accordion(engine.t("runs.evaluate"), open=True) as eval_box:
        with gr.Row():
            eval_data = engine.tr(gr.Dropdown(choices=[""] + dataset_choices(engine), value="", allow_custom_value=True,
                                              label=engine.t("runs.eval_data"), elem_id="runs-eval-data", scale=3), "runs.eval_data")
            eval_pairs = engine.tr(gr.Number(64, precision=0, label=engine.t("runs.eval_pairs"), elem_id="runs-eval-pairs"), "runs.eval_pairs")
            eval_btn = engine.tr(gr.Button(engine.t("runs.evaluate"), variant="primary", elem_id="runs-evaluate"), "runs.evaluate", "value")
        eval_note = gr.Markdown(elem_id="runs-eval-note")
        eval_table_view = gr.Dataframe(interactive=False, elem_id="runs-eval-table")
    engine.tr(eval_box, "runs.evaluate")
    config = engine.tr(gr.Code(language="yaml", label=engine.t("runs.config"), elem_id="runs-config"), "runs.config")
    with gr.Row():
        plots = line_plots(engine, "runs")

    refresh_btn.click(lambda p: refresh(engine, p), pick, [table, pick])
    pick.change(lambda r: show(engine, r), pick, [config, eval_table_view, *plots])
    pick.change(lambda r: adapter_choices(engine, r), pick, adapter)
    delete_btn.click(lambda r, c: delete(engine, r, c), [pick, confirm], [notice, table, pick, confirm])
    adapter_btn.click(lambda r, a: export_zip(engine, r, a), [pick, adapter], [notice, download])
    export_btn.click(partial(export_to, engine), [pick, adapter, export_target, export_quant], notice)
    eval_btn.click(lambda r, a, d, n: evaluate(engine, r, a, d, n), [pick, adapter, eval_data, eval_pairs], [eval_note, eval_table_view])
    engine.parts.update({"runs.refresh": (lambda p: refresh(engine, p), pick, [table, pick]),
                         "runs.show": (lambda r: show(engine, r), pick, [config, eval_table_view, *plots])})
