"""Chat tab: talk to a run (final adapter or a checkpoint) or a base model, optionally side by side
with the base model; replies stream, history is multi-turn."""

from __future__ import annotations

import gradio as gr

from .chatter import base_target, chat_targets


def content_text(content) -> str:
    """A Chatbot message's content (a string, or Gradio's list of content blocks) as plain text."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") if isinstance(block, dict) else str(block) for block in content or [])


def plain(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": content_text(m["content"])} for m in history or []]


def target_choices(engine, model_name: str) -> list[tuple[str, str]]:
    choices = [(engine.t("chat.base_choice", name=model_name), f"model:{model_name}")]
    for run, target, kind, step in chat_targets(engine.runs_dir):
        choices.append((engine.t(f"chat.{kind}", run=run, step=step), target))
    return choices


def refresh_targets(engine, model_name: str, current: str | None):
    choices = target_choices(engine, model_name)
    values = [v for _, v in choices]
    # a tuned run is what people come here for: keep a chosen run, else select the newest one
    keep = current in values and not current.startswith("model:")
    value = current if keep else (values[1] if len(values) > 1 else values[0])
    return gr.update(choices=choices, value=value)


def respond(engine, message, history, history_base, target, compare, system, temperature, top_p, max_tokens, model_name):
    """Stream (chatbot, base chatbot, message box, send button) updates; Send is disabled while a reply streams."""
    busy, done = gr.update(interactive=False), gr.update(interactive=True)
    message = (message or "").strip()
    if not message or not target:
        yield history, history_base, message, done
        return
    options = dict(system=system or None, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens))
    turn = [{"role": "user", "content": message}]
    history, history_base = plain(history), plain(history_base)
    a = b = ""
    try:
        if compare:
            pair = (target, base_target(target, model_name))
            for a, b in engine.chatter.stream_pair(pair, (history, history_base), message, **options):
                yield (history + turn + [{"role": "assistant", "content": a}],
                       history_base + turn + [{"role": "assistant", "content": b}], "", busy)
        else:
            for a in engine.chatter.stream(target, history, message, **options):
                yield history + turn + [{"role": "assistant", "content": a}], history_base, "", busy
    except Exception as e:  # noqa: BLE001 - a failed load or generation is a message, not a dead page
        gr.Warning(engine.t("error", error=e))
        yield history, history_base, message, done
        return
    yield (history + turn + [{"role": "assistant", "content": a}],
           history_base + turn + [{"role": "assistant", "content": b}] if compare else history_base, "", done)


def build(engine) -> None:
    model_name = engine.fields["model.name"]
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            target = engine.tr(gr.Dropdown(choices=target_choices(engine, model_name.value), label=engine.t("chat.target"),
                                           elem_id="chat-target"), "chat.target")
            refresh = engine.tr(gr.Button(engine.t("chat.refresh"), size="sm", elem_id="chat-refresh"), "chat.refresh", "value")
            compare = engine.tr(gr.Checkbox(False, label=engine.t("chat.compare"), elem_id="chat-compare"), "chat.compare")
            system = engine.tr(gr.Textbox(label=engine.t("chat.system"), lines=2, elem_id="chat-system"), "chat.system")
            temperature = engine.tr(gr.Slider(0.0, 1.5, 0.7, step=0.05, label=engine.t("chat.temperature"), elem_id="chat-temperature"), "chat.temperature")
            top_p = engine.tr(gr.Slider(0.05, 1.0, 0.9, step=0.05, label=engine.t("chat.top_p"), elem_id="chat-top-p"), "chat.top_p")
            max_tokens = engine.tr(gr.Slider(8, 1024, 256, step=8, label=engine.t("chat.max_tokens"), elem_id="chat-max-tokens"), "chat.max_tokens")
        with gr.Column(scale=3):
            with gr.Row():
                bot = engine.tr(gr.Chatbot(label=engine.t("chat.tuned"), height=420, elem_id="chat-main"), "chat.tuned")
                bot_base = engine.tr(gr.Chatbot(label=engine.t("chat.base"), height=420, visible=False, elem_id="chat-base"), "chat.base")
            with gr.Row():
                message = engine.tr(gr.Textbox(label=engine.t("chat.message"), scale=5, elem_id="chat-message"), "chat.message")
                send = engine.tr(gr.Button(engine.t("chat.send"), variant="primary", scale=1, elem_id="chat-send"), "chat.send", "value")
                clear = engine.tr(gr.Button(engine.t("chat.clear"), scale=1, elem_id="chat-clear"), "chat.clear", "value")
    inputs = [message, bot, bot_base, target, compare, system, temperature, top_p, max_tokens, model_name]
    for trigger in (send.click, message.submit):
        trigger(lambda *a: (yield from respond(engine, *a)), inputs, [bot, bot_base, message, send])
    clear.click(lambda: ([], []), None, [bot, bot_base])
    compare.change(lambda on: gr.update(visible=on), compare, bot_base)
    refresh.click(lambda m, t: refresh_targets(engine, m, t), [model_name, target], target)
    engine.parts.update({"chat.target": target, "chat.refresh": (lambda m, t: refresh_targets(engine, m, t), [model_name, target])})
