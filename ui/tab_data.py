"""Data tab: a bundled sample, an upload or a path/Hub id; a validation report and a rendered preview."""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from orpo_local.data import BUNDLED, DataFileError

from .engine import UPLOAD_TYPES

DATA_FIELDS = ("data.format", "data.template", "data.val_fraction", "data.max_pairs", "data.max_prompt_length")
PREVIEW_EXAMPLES = 3


def dataset_choices(engine) -> list[str]:
    uploaded = sorted(str(p) for p in engine.data_dir.glob("*") if p.suffix.lower() in UPLOAD_TYPES) if engine.data_dir.exists() else []
    return list(BUNDLED) + uploaded


def preview_html(engine, examples) -> str:
    """Each pair as three blocks: the prompt as the template renders it, then chosen and rejected."""
    def block(kind: str, body: str, tokens: int, color: str) -> str:
        return (f'<div class="pair-{kind}" style="border-left:4px solid {color};padding:4px 8px;margin:4px 0">'
                f'<b>{engine.t("data." + kind)}</b> · {tokens} {engine.t("data.tokens_short")}'
                f'<pre style="white-space:pre-wrap;margin:4px 0">{html.escape(body)}</pre></div>')

    parts = []
    for ex in examples:
        head = f"row {ex.row}" + (" (truncated)" if ex.truncated else "")
        parts.append(f'<div class="pair" style="margin-bottom:12px"><div><b>{html.escape(head)}</b></div>'
                     + block("prompt", ex.prompt, ex.prompt_tokens, "#888")
                     + block("chosen", ex.chosen, ex.chosen_tokens, "#2e7d32")
                     + block("rejected", ex.rejected, ex.rejected_tokens, "#c62828") + "</div>")
    return "".join(parts)


def check(engine, values: dict):
    """(summary markdown, invalid rows table, preview html) for the data fields in `values`."""
    from orpo_local.config import ConfigError, format_columns
    from orpo_local.datacheck import check_data

    empty = pd.DataFrame([], columns=["row", "reason"])
    try:
        config = engine.config_from(values)
        d = config.data
        result = check_data(d.path, d.format, model=config.model.name, max_length=d.max_length,
                            max_prompt_length=d.max_prompt_length, examples=PREVIEW_EXAMPLES, columns=d.columns,
                            template=d.template)
    except (ConfigError, DataFileError, OSError, ValueError) as e:
        return engine.t("error", error=e), empty, ""
    report = result.report
    summary = engine.t("data.report", rows=report.n_rows, valid=len(report.pairs), invalid=len(report.invalid),
                       format=report.format, how=engine.t("data.auto" if d.format == "auto" else "data.given"))
    if report.columns:
        summary += "\n\n" + engine.t("data.columns_used", columns=html.escape(format_columns(report.columns)))
    source = f"{d.path} (bundled)" if d.path in BUNDLED else engine.show(report.source)
    summary = f"**{html.escape(source)}**\n\n{summary}"
    if result.tokenize_error:
        summary += "\n\n" + engine.t("error", error=result.tokenize_error)
    elif result.stats is not None and result.lengths:
        s, n = result.stats, result.lengths
        summary += "\n\n" + engine.t("data.tokens", model=config.model.name, template=result.template, max_length=d.max_length, kept=s.pairs_out,
                                     truncated=s.truncated, dropped=s.dropped, pm=n["prompt_mean"], px=n["prompt_max"],
                                     rm=n["response_mean"], rx=n["response_max"])
    invalid = pd.DataFrame([(bad.row, (f"{engine.show(bad.source)}: " if bad.source else "") + bad.reason) for bad in report.invalid],
                           columns=["row", "reason"])
    if result.stats is not None and result.stats.dropped_rows:
        dropped = pd.DataFrame([(where, reason) for where, reason in result.stats.dropped_rows], columns=["row", "reason"])
        invalid = pd.concat([invalid, dropped], ignore_index=True)
    return summary, invalid, preview_html(engine, result.examples)


def upload(engine, file):
    """Keep an uploaded file in the app's data folder and select it."""
    if not file:
        return gr.skip(), gr.skip()
    try:
        saved = engine.save_upload(file)
    except (ValueError, OSError) as e:
        return gr.skip(), engine.t("error", error=e)
    return gr.update(choices=dataset_choices(engine), value=str(saved)), engine.t("data.uploaded", name=saved.name)


def build(engine) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            path = engine.field("data.path", gr.Dropdown, choices=dataset_choices(engine), allow_custom_value=True)
            uploader = engine.tr(gr.File(label=engine.t("data.upload"), file_types=list(UPLOAD_TYPES), elem_id="data-upload"), "data.upload")
            engine.field("data.columns")
            with gr.Row():
                for key in DATA_FIELDS:
                    engine.field(key)
            engine.parts["data.check"] = engine.tr(gr.Button(engine.t("data.check"), variant="primary", elem_id="data-check"),
                                                   "data.check", "value")
        with gr.Column(scale=3):
            engine.parts["data.summary"] = gr.Markdown(elem_id="data-summary")
            engine.parts["data.invalid"] = engine.tr(gr.Dataframe(label=engine.t("data.invalid"), elem_id="data-invalid",
                                                                  max_height=240, wrap=True), "data.invalid")
    engine.heading("data.preview")
    engine.parts["data.preview"] = gr.HTML(elem_id="data-preview")
    uploader.upload(lambda f: upload(engine, f), uploader, [path, engine.parts["data.summary"]])
