"""Model tab: which model (a preset or any other), which backend, 4-bit, LoRA; what the model is,
whether it is on disk, its size and a training-memory estimate."""

from __future__ import annotations

import gradio as gr

from orpo_local.backends import available_backends
from orpo_local.config import ConfigError
from orpo_local.models import PRESETS, availability, preset

from .locales import preset_note

MODEL_FIELDS = ("model.backend", "model.load_in_4bit", "model.dtype", "model.gradient_checkpointing",
                "lora.rank", "lora.alpha", "lora.dropout", "lora.num_layers", "lora.target_modules")


def backends_text(engine) -> str:
    rows = [f"- **{name}**: {engine.t('model.available') if not why else why}" for name, why in available_backends().items()]
    return "\n".join(rows)


def describe(engine, values: dict) -> str:
    """Markdown: what the model is (for a preset), where it is, its parameter count and the memory
    estimate for the current form values. Nothing is downloaded: a preset is sized from its numbers."""
    from orpo_local.estimate import model_size, training_memory

    try:
        config = engine.config_from(values)
    except ConfigError as e:
        return engine.t("model.unsized", error=e)
    known = preset(config.model.name)
    parts = preset_text(engine, known) if known else []
    try:
        size = model_size(config.model.name)
        where = availability(config.model.name)
    except (OSError, ValueError) as e:
        return "\n\n".join(parts + [engine.t("model.unsized", error=e)])
    est = training_memory(size, config)
    return "\n\n".join(parts + [
        engine.t(f"model.where.{where}", gb=f"{size.checkpoint_bytes / 1e9:.1f}"),
        engine.t("model.size", params=f"{size.n_params:,}", layers=size.n_layers, hidden=size.hidden, vocab=f"{size.vocab:,}"),
        engine.t("model.memory", max_length=config.data.max_length, batch=config.optim.batch_size,
                 total=est["total_gb"], weights=est["weights_gb"], lora=est["lora_optimizer_gb"],
                 act=est["activations_gb"], lora_params=f"{est['lora_params']:,}")])


def preset_text(engine, known) -> list[str]:
    """Markdown paragraphs on a preset: language, kind, template and note; how to train a base model."""
    parts = [engine.t("model.preset", language=engine.t(f"lang.{known.language}"), kind=engine.t(f"kind.{known.kind}"),
                      template=known.template, note=preset_note(engine.lang, known))]
    if known.kind == "base" and known.template != "auto":
        parts.append(engine.t("model.base", template=known.template))
    return parts


def build(engine) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            engine.field("model.name", gr.Dropdown, choices=[p.name for p in PRESETS], allow_custom_value=True)
            with gr.Row():
                for key in MODEL_FIELDS[:4]:
                    engine.field(key)
            with gr.Row():
                for key in MODEL_FIELDS[4:8]:
                    engine.field(key)
            engine.field(MODEL_FIELDS[8])
        with gr.Column(scale=2):
            engine.heading("model.backends")
            gr.Markdown(backends_text(engine), elem_id="backends")
            engine.heading("model.inspect")
            engine.parts["model.summary"] = gr.Markdown(elem_id="model-summary")
