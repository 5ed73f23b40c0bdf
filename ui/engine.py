"""The app's state: folders, the training runner, the chatter, and every translatable component.

One server has one training job (the Runner) and one chatter shared by every browser session; the
chatter refuses to start a reply while the job trains, so a chat never takes memory or compute from
the job (on a GPU a second model could end the run with out-of-memory).

Config fields become components through `field()`, which takes the label, the help text, the
default and the allowed values from orpo_local.config (one source of truth). `config_from()`
turns the values of those components back into a validated TrainConfig.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import gradio as gr

from orpo_local.config import TrainConfig, field_default, field_info, format_columns

from .chatter import Chatter
from .locales import field_help, field_label, text
from .runner import Runner

UPLOAD_TYPES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Engine:
    runs_dir: Path
    data_dir: Path  # uploaded datasets live here, under sanitised names
    lang: str = "zh"
    runner: Runner = None  # made in __post_init__, showing paths relative to the app's folder
    chatter: Chatter = dc_field(default_factory=Chatter)  # wrapped in __post_init__: idle only while no job trains
    max_upload_bytes: int | None = None  # None: no limit
    processes: int = 1  # the Train tab's "processes": how many the next job trains in (one job per server)
    fields: dict = dc_field(default_factory=dict)  # "section.name" -> component
    texts: list = dc_field(default_factory=list)  # (component, key, attribute) to re-render on a language switch
    parts: dict = dc_field(default_factory=dict)  # components one tab's events need from another

    def __post_init__(self):
        self.runs_dir = Path(self.runs_dir).resolve()
        self.runner = self.runner or Runner(root=self.runs_dir.parent)
        self.chatter = WhileIdle(self.chatter, self)

    def t(self, key: str, **values) -> str:
        return text(self.lang, key, **values)

    def tr(self, component, key: str, attribute: str = "label"):
        """Register `component` so a language switch sets its `attribute` to the text of `key`
        ("heading": a Markdown component's value as a heading; "labelled": its label to `key`'s text
        and its info to `key`.help's)."""
        self.texts.append((component, key, attribute))
        return component

    def field(self, key: str, factory=None, **options):
        """A component for config field `key` ("section.name"), labelled and explained in the page's language
        (`factory`: a component class to use instead of the one the field's type implies)."""
        section, name = key.split(".", 1)
        f = field_info(section, name)
        default, choices = field_default(f), f.metadata.get("choices")
        common = dict(label=field_label(self.lang, key), info=field_help(self.lang, key), elem_id=key.replace(".", "-"))
        if factory is not None:
            comp = factory(value=default, **common, **options)
        elif isinstance(default, bool):
            comp = gr.Checkbox(value=default, **common, **options)
        elif choices:
            comp = gr.Dropdown(choices=list(choices), value=default, **common, **options)
        elif isinstance(default, dict):  # data.columns: typed as 'prompt=question,system=sys'
            comp = gr.Textbox(value=format_columns(default), placeholder="prompt=question,system=system", **common, **options)
        elif isinstance(default, list):
            comp = gr.Dropdown(choices=list(default), value=list(default), multiselect=True, allow_custom_value=True, **common, **options)
        elif isinstance(default, (int, float)):
            comp = gr.Number(value=default, precision=0 if isinstance(default, int) else None, **common, **options)
        else:
            comp = gr.Textbox(value=default, **common, **options)
        self.fields[key] = comp
        self.texts.append((comp, key, "field"))
        return comp

    def config_from(self, values: dict) -> TrainConfig:
        """A TrainConfig from {component: value} of registered fields (raises ConfigError listing every problem)."""
        key_of = {comp: key for key, comp in self.fields.items()}
        over = {key_of[c]: v for c, v in values.items() if c in key_of}
        return TrainConfig().with_overrides({**over, "run.runs_dir": str(self.runs_dir)})

    def relabel(self, lang: str) -> list:
        """Updates for every registered component after switching to `lang` (same order as `texts`)."""
        self.lang = lang
        updates = []
        for _, key, attribute in self.texts:
            if attribute == "field":
                updates.append(gr.update(label=field_label(lang, key), info=field_help(lang, key)))
            elif attribute == "heading":
                updates.append(gr.update(value=heading(text(lang, key))))
            elif attribute == "labelled":
                updates.append(gr.update(label=text(lang, key), info=text(lang, f"{key}.help")))
            else:
                updates.append(gr.update(**{attribute: text(lang, key)}))
        return updates

    def show(self, path) -> str:
        """A path as the page shows it: relative to the folder that holds runs/ and uploads/ when inside it."""
        try:
            return str(Path(path).resolve().relative_to(self.runs_dir.parent))
        except ValueError:
            return str(path)

    def heading(self, key: str):
        return self.tr(gr.Markdown(heading(self.t(key))), key, "heading")

    def save_upload(self, uploaded: str) -> Path:
        """Copy an uploaded file into data_dir under a safe, unique name (ASCII letters, digits, . _ -; never
        hidden, never outside data_dir); refuse unknown types and files over max_upload_bytes."""
        src = Path(uploaded)
        suffix = src.suffix.lower()
        if suffix not in UPLOAD_TYPES:
            raise ValueError(f"{src.name}: unsupported file type {suffix or '(none)'}; upload one of {', '.join(UPLOAD_TYPES)}")
        size = src.stat().st_size
        if self.max_upload_bytes is not None and size > self.max_upload_bytes:
            raise ValueError(f"{src.name}: {_size(size)} is over the upload limit of {_size(self.max_upload_bytes)}; "
                             "give its path instead, or restart the UI with --max-upload-mb N")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", src.stem).strip("._") or "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        target, n = self.data_dir / f"{stem[:60]}{suffix}", 1
        while target.exists():
            n += 1
            target = self.data_dir / f"{stem[:60]}-{n}{suffix}"
        shutil.copyfile(src, target)
        return target


def heading(title: str) -> str:
    return f"### {title}"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


class WhileIdle:
    """The chatter, refusing to start a reply while the engine's training job runs (the page shows the
    refusal as a warning); everything else passes through."""

    def __init__(self, chatter: Chatter, engine: Engine):
        self.chatter, self.engine = chatter, engine

    def _check(self) -> None:
        runner = self.engine.runner
        if runner.busy:
            raise RuntimeError(self.engine.t("train.busy", run=self.engine.show(runner.run_dir or "…")))

    def session(self, *args, **kw):
        self._check()
        return self.chatter.session(*args, **kw)

    def stream(self, *args, **kw):
        self._check()
        return self.chatter.stream(*args, **kw)

    def stream_pair(self, *args, **kw):
        self._check()
        return self.chatter.stream_pair(*args, **kw)
