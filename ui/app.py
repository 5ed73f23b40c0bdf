"""The Gradio app: five tabs over one Engine, wired together here.

    orpo-local ui [--host 127.0.0.1] [--port 7860] [--lang zh|en] [--auth USER:PASSWORD | --auth-file FILE]

    from orpo_local.ui.app import Engine, build_app
    build_app(Engine(runs_dir=Path("runs"), data_dir=Path("data"))).launch()

Safe by default: `launch` listens on 127.0.0.1 only; an address other machines can reach (or a
share link) needs a login (`auth`), or `insecure=True` said out loud, and prints a warning; uploads
are capped at `max_upload_mb` and copied into the app's uploads/ folder under sanitised names.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import gradio as gr

from orpo_local.config import TrainConfig

from . import tab_chat, tab_data, tab_model, tab_runs, tab_train
from .engine import Engine
from .locales import LANGS

DEFAULT_MAX_UPLOAD_MB = 1024
TABS = (("tab.model", tab_model), ("tab.data", tab_data), ("tab.train", tab_train), ("tab.chat", tab_chat), ("tab.runs", tab_runs))
CSS = "#train-progress-bar progress { accent-color: #2e7d32; } .pair pre { font-size: 0.9em; }"


def build_app(engine: Engine) -> gr.Blocks:
    with gr.Blocks(title="orpo_local") as app:
        with gr.Row():
            with gr.Column(scale=5):
                engine.tr(gr.Markdown(f"## {engine.t('title')}"), "title", "value")
                engine.tr(gr.Markdown(engine.t("subtitle")), "subtitle", "value")
            lang = gr.Dropdown(choices=[("中文", "zh"), ("English", "en")], value=engine.lang, label=engine.t("language"),
                               scale=1, min_width=140, elem_id="lang")
        tabs = {}
        with gr.Tabs():
            for key, module in TABS:
                with gr.Tab(engine.t(key), id=key, elem_id=key.replace(".", "-")) as tab:
                    module.build(engine)
                tabs[key] = engine.tr(tab, key)
        _wire(engine, app, lang, tabs)
    return app


def _wire(engine: Engine, app: gr.Blocks, lang, tabs: dict) -> None:
    """Events that need components of several tabs."""
    fields = set(engine.fields.values())
    parts = engine.parts
    texts = [component for component, _, _ in engine.texts]

    def relabel(code):
        updates = engine.relabel(code)
        # headings and titles carry markdown that `relabel` sets as plain text
        return [gr.update(value=f"## {engine.t('title')}") if key == "title" else u
                for u, (_, key, _) in zip(updates, engine.texts)]

    lang.change(relabel, lang, texts)

    summary = parts["model.summary"]
    describe = lambda values: tab_model.describe(engine, values)  # noqa: E731
    for key in ("model.name", "model.load_in_4bit", "model.dtype", "model.gradient_checkpointing", "lora.rank",
                "lora.target_modules", "lora.num_layers", "optim.batch_size", "data.max_length"):
        engine.fields[key].change(describe, fields, summary, show_progress="hidden")
    app.load(describe, fields, summary)

    parts["data.check"].click(lambda values: tab_data.check(engine, values), fields,
                              [parts["data.summary"], parts["data.invalid"], parts["data.preview"]])
    parts["train.start"].click(lambda values: tab_train.start(engine, values), fields, parts["train.notice"])

    seen, outputs = parts["train.refresh"]
    # a reloaded page re-attaches to the running job: its progress, plots, log and settings
    app.load(lambda: tab_train.refresh(engine, -1), None, outputs)
    keys = list(engine.fields)
    app.load(lambda: job_settings(engine, keys), None, [engine.fields[k] for k in keys])
    chat_refresh, chat_inputs = parts["chat.refresh"]
    tabs["tab.chat"].select(chat_refresh, chat_inputs, parts["chat.target"])
    runs_refresh, runs_pick, runs_outputs = parts["runs.refresh"]
    tabs["tab.runs"].select(runs_refresh, runs_pick, runs_outputs)


def job_settings(engine: Engine, keys: list[str]) -> list:
    """The running job's config values for the fields `keys` (nothing changes when no job runs)."""
    snap = engine.runner.snapshot()
    config_file = Path(snap["run_dir"] or "") / "config.yaml"
    if snap["status"] not in ("running", "stopping") or not snap["run_dir"] or not config_file.exists():
        return [gr.skip()] * len(keys)
    config = TrainConfig.from_yaml(config_file).to_dict()
    return [config[k.split(".", 1)[0]][k.split(".", 1)[1]] for k in keys]


class UnsafeServer(ValueError):
    """The server would be reachable by others without a login."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost); a host name is not."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_server(host: str, auth=None, insecure: bool = False, share: bool = False) -> str:
    """The warning to print for a server others can reach ("" on loopback); UnsafeServer when it has no login."""
    if is_loopback(host) and not share:
        return ""
    where = "a public gradio.live link" if share else f"{host} (reachable from other machines)"
    if not auth and not insecure:
        raise UnsafeServer(f"refusing to serve on {where} without a login: anyone who reaches it could start training "
                           "jobs, read your data and runs, and upload files. Add --auth USER:PASSWORD (or --auth-file FILE "
                           "with one user:password a line), or pass --insecure if this network is yours alone. "
                           "Without --host the UI listens on 127.0.0.1, this machine only.")
    login = "login required" if auth else "NO LOGIN (--insecure): anyone who reaches it can use it"
    return (f"warning: serving on {where}; {login}. Traffic is plain HTTP: put it behind an HTTPS proxy or an SSH tunnel "
            "on networks you do not trust.")


def read_auth(pairs: list[str] | None = None, file: str | Path | None = None) -> list[tuple[str, str]]:
    """Logins from "user:password" strings and/or a file of such lines (# comments and blank lines skipped)."""
    lines = [(f"--auth {i + 1}", v) for i, v in enumerate(pairs or [])]
    if file:
        text = Path(file).read_text(encoding="utf-8")
        lines += [(f"{file}: line {n}", v.strip()) for n, v in enumerate(text.splitlines(), 1)
                  if v.strip() and not v.lstrip().startswith("#")]
    logins, bad = [], []
    for where, value in lines:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            bad.append(where)
        else:
            logins.append((user.strip(), password))
    if bad:
        raise ValueError(f"{', '.join(bad)}: a login is USER:PASSWORD, with neither part empty")
    if file and not logins:
        raise ValueError(f"{file}: holds no user:password line")
    return logins


def launch(host: str = "127.0.0.1", port: int = 7860, lang: str = "zh", runs_dir: str | Path = "runs",
           data_dir: str | Path | None = None, share: bool = False, auth: list[tuple[str, str]] | None = None,
           insecure: bool = False, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, **options):
    """Build and serve the app (blocks until the server stops, unless prevent_thread_lock=True).

    Raises UnsafeServer before anything is built for an address others can reach (or a share link)
    without `auth` ([(user, password)]) or `insecure`."""
    if lang not in LANGS:
        raise ValueError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
    warning = check_server(host, auth, insecure, share)
    if warning:
        print(warning, file=sys.stderr)
    runs_dir = Path(runs_dir).expanduser().resolve()
    data_dir = Path(data_dir).expanduser().resolve() if data_dir else runs_dir.parent / "uploads"
    engine = Engine(runs_dir=runs_dir, data_dir=data_dir, lang=lang, max_upload_bytes=int(max_upload_mb * 2**20))
    app = build_app(engine)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, share=share, css=CSS, show_error=True, auth=auth or None,
               max_file_size=engine.max_upload_bytes, allowed_paths=[str(runs_dir)], **options)
    return app, engine
