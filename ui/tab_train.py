"""Train tab: hyper-parameters, processes, Start / Stop / Resume, progress, live plots and the log.

The job lives in the server (engine.runner); a 1-second timer redraws from its snapshot when
something changed, so a reloaded page picks up a running job where it is. "Processes" shows only
where a job can train in more than one (runner.local_max_processes).
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from orpo_local.config import ConfigError
from orpo_local.runs import list_runs, run_backend
from orpo_local.runs import status_text as run_status

from .plots import line_plots, run_charts
from .runner import local_max_processes

TRAIN_FIELDS = ("orpo.lambda_", "optim.learning_rate", "optim.epochs", "optim.max_steps", "optim.batch_size",
                "optim.grad_accumulation", "data.max_length", "optim.warmup_steps", "optim.schedule", "run.seed",
                "orpo.nll_on_prompt", "run.eval_every", "run.save_every", "run.name")


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def resumable_runs(engine) -> list[tuple[str, str]]:
    """(name and status, run folder) of the runs a resume can continue: stopped, failed or interrupted (a
    process killed mid-run) with a complete checkpoint, and not training now."""
    return [(f"{Path(r['run_dir']).name} ({run_status(r)})", r["run_dir"]) for r in list_runs(engine.runs_dir)
            if r["resumable"] and not (engine.runner.busy and r["run_dir"] == engine.runner.run_dir)]


def status_text(engine, snap: dict) -> str:
    run = Path(snap["run_dir"]).name if snap["run_dir"] else ""
    status = snap["status"]
    if status in ("running", "stopping"):
        line = engine.t("train.running", run=run, step=snap["step"], total=snap["total"], elapsed=clock(snap["elapsed"]),
                        eta=clock(snap["eta"]))
        several = snap.get("processes", 1) > 1
        line += engine.t("train.on_processes", n=snap["processes"]) if several else ""
        stopping = engine.t("train.stopping_processes" if several else "train.stopping")
        return line + ("\n\n" + stopping if status == "stopping" else "")
    if status in ("finished", "stopped"):
        return engine.t(f"train.{status}", run=run, step=snap["step"]) + verdict_text(engine, snap.get("verdict"))
    if status == "failed":
        return "❌ " + engine.t("train.failed", error=snap["error"])
    return engine.t("train.started" if status == "starting" else "train.idle")


def verdict_text(engine, verdict: dict | None) -> str:
    """The end-of-run verdict in the page's language: base → tuned on the validation pairs, and advice."""
    if not verdict:
        return ""
    b, t, best = verdict["base"], verdict["tuned"], verdict.get("best")
    line = engine.t("train.verdict", acc0=f"{b['accuracy']:.2f}", acc1=f"{t['accuracy']:.2f}",
                    m0=f"{b['margin']:+.3f}", m1=f"{t['margin']:+.3f}")
    if best:
        line += engine.t("train.verdict_best", step=best["step"], acc=f"{best['accuracy']:.2f}", m=f"{best['margin']:+.3f}")
    if verdict["better"]:
        return "\n\n✅ " + line
    return "\n\n⚠️ " + engine.t("train.not_better") + " " + line + " " + engine.t("train.advice")


def progress_html(snap: dict) -> str:
    total, step = max(1, snap["total"]), snap["step"]
    label = f"{step}/{snap['total']}" if snap["total"] else "-"
    return (f'<div id="train-progress-bar" data-step="{step}" data-total="{snap["total"]}" data-status="{html.escape(snap["status"])}">'
            f'<progress value="{step}" max="{total}" style="width:100%;height:18px"></progress>'
            f'<div>step {label} · {html.escape(snap["status"])}</div></div>')


def refresh(engine, seen: int):
    """Redraw from the runner's snapshot, or skip everything when nothing changed since `seen`."""
    snap = engine.runner.snapshot()
    if snap["version"] == seen:
        return [gr.skip()] * 9
    charts = run_charts(snap["run_dir"])
    return [status_text(engine, snap), progress_html(snap), *charts.values(), "\n".join(snap["log"]),
            snap["version"], gr.update(choices=resumable_runs(engine))]


def start(engine, values: dict) -> str:
    try:
        config = engine.config_from(values)
    except ConfigError as e:
        return "❌ " + engine.t("error", error=e)
    # "processes" is not a config field, so Start's inputs (the fields) lack it: its slider keeps engine.processes
    return launch(engine, config.model.backend, engine.processes, config=config)


def resume(engine, run_dir: str | None, nproc=1) -> str:
    if not run_dir:
        return engine.t("train.pick_resume")
    return launch(engine, run_backend(run_dir), nproc, resume=run_dir)


def launch(engine, backend: str, nproc, **job) -> str:
    """Start the job in `nproc` processes, or say why not (more than `backend` can train in here, a job running)."""
    nproc = int(nproc or 1)
    most = local_max_processes(backend) if nproc > 1 else 1
    if nproc > most:
        return "⚠️ " + engine.t("train.processes_unavailable", n=nproc, backend=backend, most=most)
    if not engine.runner.start(nproc=nproc, **job):
        return "⚠️ " + engine.t("train.busy", run=engine.show(engine.runner.run_dir or "…"))
    return engine.t("train.started")


def set_processes(engine, n) -> None:
    engine.processes = max(1, int(n or 1))


def stop(engine) -> str:
    if not engine.runner.stop():
        return engine.t("train.no_job")
    return engine.t("train.stopping_processes" if engine.runner.snapshot()["processes"] > 1 else "train.stopping")


def build(engine) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                for key in TRAIN_FIELDS[:6]:
                    engine.field(key, min_width=140)
            with gr.Row():
                for key in TRAIN_FIELDS[6:]:
                    engine.field(key, min_width=140)
        with gr.Column(scale=1):
            most = local_max_processes()
            # the value is read on every page load: one job per server, so its processes are the server's
            processes = engine.tr(gr.Slider(1, max(2, most), value=lambda: engine.processes, step=1, label=engine.t("train.processes"),
                                            info=engine.t("train.processes.help"), visible=most > 1, elem_id="train-processes"),
                                  "train.processes", "labelled")
            with gr.Row():
                start_btn = engine.tr(gr.Button(engine.t("train.start"), variant="primary", elem_id="train-start"), "train.start", "value")
                stop_btn = engine.tr(gr.Button(engine.t("train.stop"), variant="stop", elem_id="train-stop"), "train.stop", "value")
            resume_pick = engine.tr(gr.Dropdown(choices=resumable_runs(engine), label=engine.t("train.resume_from"),
                                                elem_id="train-resume-pick"), "train.resume_from")
            resume_btn = engine.tr(gr.Button(engine.t("train.resume"), elem_id="train-resume"), "train.resume", "value")
            notice = gr.Markdown(elem_id="train-notice")
            status = gr.Markdown(engine.t("train.idle"), elem_id="train-status")
            progress = gr.HTML(progress_html(engine.runner.snapshot()), elem_id="train-progress")
    with gr.Row():
        plots = line_plots(engine, "train")
    log = engine.tr(gr.Textbox(label=engine.t("train.log"), lines=8, max_lines=16, autoscroll=True, elem_id="train-log"), "train.log")
    seen = gr.State(-1)
    timer = gr.Timer(1.0)
    outputs = [status, progress, *plots, log, seen, resume_pick]
    # named, so every page (and a script) reads one job's progress through one endpoint
    timer.tick(lambda s: refresh(engine, s), seen, outputs, show_progress="hidden", api_name="train_status")
    engine.parts.update({"train.start": start_btn, "train.notice": notice, "train.refresh": (seen, outputs)})
    stop_btn.click(lambda: stop(engine), None, notice)
    resume_btn.click(lambda r, n: resume(engine, r, n), [resume_pick, processes], notice)
    processes.change(lambda n: set_processes(engine, n), processes, None, show_progress="hidden")
