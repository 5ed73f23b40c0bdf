"""Model tab: which model, which backend, 4-bit, LoRA; its size and a training-memory estimate."""

from __future__ import annotations

import gradio as gr

from orpo_local.backends import available_backends
from orpo_local.config import BUNDLED_MODEL, ConfigError

MODEL_FIELDS = ("model.backend", "model.load_in_4bit", "model.dtype", "model.gradient_checkpointing",
                "lora.rank", "lora.alpha", "lora.dropout", "lora.num_layers", "lora.target_modules")


def backends_text(engine) -> str:
    rows = [f"- **{name}**: {engine.t('model.available') if not why else why}" for name, why in available_backends().items()]
    return "\n".join(rows)


def describe(engine, values: dict) -> str:
    """Markdown: parameter count and the memory estimate for the current form values."""
    from orpo_local.estimate import model_size, training_memory

    try:
        config = engine.config_from(values)
        size = model_size(config.model.name)
    except (ConfigError, OSError, ValueError) as e:
        return engine.t("model.unsized", error=e)
    est = training_memory(size, config)
    return (engine.t("model.size", params=f"{size.n_params:,}", layers=size.n_layers, hidden=size.hidden, vocab=f"{size.vocab:,}")
            + "\n\n" + engine.t("model.memory", max_length=config.data.max_length, batch=config.optim.batch_size,
                                total=est["total_gb"], weights=est["weights_gb"], lora=est["lora_optimizer_gb"],
                                act=est["activations_gb"], lora_params=f"{est['lora_params']:,}"))


def build(engine) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            engine.field("model.name", gr.Dropdown, choices=[BUNDLED_MODEL], allow_custom_value=True)
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
