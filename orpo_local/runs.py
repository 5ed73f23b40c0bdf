"""Run folders: self-describing, resumable, written so a crash never leaves a half checkpoint.

    runs/<timestamp>-<model>/
        config.yaml            the resolved TrainConfig
        run.json               status, backend, base model, tokenizer/template hashes, steps, data counts
        metrics.jsonl          one record per step and per evaluation
        checkpoints/step-N/    adapter/ + optimiser/RNG state + trainer_state.json (written last)
        adapter/               the final adapter (a PEFT folder for torch, mlx-lm adapters for MLX)
        best/                  adapter/ + best.json: the evaluation with the best validation margin (never rotated away)

A checkpoint is built in checkpoints/.tmp-step-N and renamed into place, so a folder named
step-N is complete; one without trainer_state.json (or a leftover .tmp-*) is ignored. The final
adapter, best/ and every JSON file are written the same way (whole or not at all), so a process
killed anywhere (SIGKILL, power loss after the rename) leaves the last complete checkpoint usable.

A training process holds <run>/.lock (an flock, dropped by the kernel however the process dies):
a run whose run.json says "running" but whose lock nobody holds was interrupted (killed, crashed
machine), and `list_runs` reports it so; a locked run cannot be resumed, deleted or trained twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .fsutil import Locked, hold_lock, is_locked, replace_folder, swap_folder, write_atomic
from .verdict import margin

STATE_FILE = "trainer_state.json"
BEST_DIR = "best"
TEMPLATE_FILE = "chat_template.jinja"  # the template text a run trained with; chat, eval and exports use it
LOCK_FILE = ".lock"  # held by the process that trains the run
# statuses a run can be resumed from (when it has a complete checkpoint)
RESUMABLE = ("stopped", "failed", "interrupted")


class RunBusy(Locked):
    """The run is being trained right now (by this server or another process)."""


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name).strip("-")[:60] or "model"


def new_run_dir(runs_dir: str | Path, model_name: str, name: str = "") -> Path:
    root = Path(runs_dir)
    base = slug(name) if name else f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(model_name)}"
    path, n = root / base, 1
    while path.exists():
        n += 1
        path = root / f"{base}-{n}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file flushed to disk, then renamed): never half a file."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def update_run(run_dir: Path, **fields) -> dict:
    path = Path(run_dir) / "run.json"
    info = read_json(path) if path.exists() else {}
    info.update(fields, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(path, info)
    return info


def run_backend(run_dir: str | Path, default: str = "auto") -> str:
    """The backend a run trained with (run.json), or `default` for a run that never got that far."""
    path = Path(run_dir) / "run.json"
    return read_json(path).get("backend", default) if path.exists() else default


def run_template(run_dir: str | Path) -> str:
    """The chat template a run trained with: the text it recorded (chat_template.jinja), else its
    config's data.template (runs from before templates were recorded)."""
    run_dir = Path(run_dir)
    recorded = run_dir / TEMPLATE_FILE
    if recorded.exists():
        return recorded.read_text(encoding="utf-8")
    from .config import TrainConfig

    return TrainConfig.from_yaml(run_dir / "config.yaml").data.template if (run_dir / "config.yaml").exists() else "auto"


def save_template(run_dir: str | Path, text: str) -> None:
    write_atomic(Path(run_dir) / TEMPLATE_FILE, text)


def lock_run(run_dir: str | Path):
    """Hold the run for training (a context manager); RunBusy when another job holds it."""
    return hold_lock(Path(run_dir) / LOCK_FILE, _training_already)


def _training_already(message: str) -> RunBusy:
    return RunBusy(f"{message}: this run is training already; wait for it to end or stop it, then resume")


def is_active(run_dir: str | Path) -> bool:
    """True while some process trains this run."""
    return is_locked(Path(run_dir) / LOCK_FILE)


def refuse_if_active(run_dir: str | Path, action: str) -> None:
    """RunBusy naming `action` ("delete", "export", "resume") when the run is being trained."""
    if is_active(run_dir):
        raise RunBusy(f"{run_dir}: cannot {action} this run while it is training; stop it first "
                      "(the Train tab's Stop, or Ctrl-C in its terminal)")


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hashes that tell whether a tokenizer/template differs from the one a run was trained with."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    template = (tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, (str, type(None))) else json.dumps(tokenizer.chat_template).encode()
    return {"tokenizer_sha256": hashlib.sha256(vocab).hexdigest()[:16], "chat_template_sha256": hashlib.sha256(template).hexdigest()[:16]}


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    for p in folder.glob("step-*") if folder.exists() else []:
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, step: int, backend, state: dict) -> Path:
    """adapter + backend state + trainer_state.json into checkpoints/step-N, atomically."""
    folder = Path(run_dir) / "checkpoints"
    final, tmp = folder / f"step-{step}", folder / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        backend.save_adapter(tmp / "adapter")
        backend.save_state(tmp)
        write_json(tmp / STATE_FILE, {**state, "step": step})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint only takes space (a full disk needs it back)
        raise
    swap_folder(tmp, final)
    return final


def save_final_adapter(run_dir: Path, backend) -> Path:
    """The run's adapter/ folder, written whole (a crash mid-write keeps the previous one, or none)."""
    with replace_folder(Path(run_dir) / "adapter") as tmp:
        backend.save_adapter(tmp)
    return Path(run_dir) / "adapter"


def save_best(run_dir: Path, step: int, backend, metrics: dict) -> dict:
    """The adapter at `step` as best/ (written whole); returns its summary for run.json."""
    summary = {"step": step, "margin": margin(metrics), "accuracy": metrics["rewards/accuracies"]}
    with replace_folder(Path(run_dir) / BEST_DIR) as tmp:
        backend.save_adapter(tmp / "adapter")
        write_json(tmp / "best.json", {**summary, "metrics": metrics})
    return summary


def drop_best(run_dir: Path) -> None:
    """Forget best/ (a resume retrains the steps it was chosen on)."""
    shutil.rmtree(Path(run_dir) / BEST_DIR, ignore_errors=True)


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | Path | None) -> Path | None:
    """A checkpoint given as 'best', 'step-N', 'N' or a folder -> its folder (None stays None)."""
    if checkpoint is None or checkpoint == "":
        return None
    run_dir, name = Path(run_dir), str(checkpoint)
    if name == BEST_DIR:
        path = run_dir / BEST_DIR
    elif re.fullmatch(r"(step-)?\d+", name):
        path = run_dir / "checkpoints" / f"step-{name.removeprefix('step-')}"
    else:
        path = Path(checkpoint)
    if not (path / "adapter").exists():
        have = ", ".join(([BEST_DIR] if (run_dir / BEST_DIR).exists() else []) + [p.name for _, p in checkpoints(run_dir)])
        raise FileNotFoundError(f"{run_dir}: no checkpoint {name!r} (have: {have or 'none'})")
    return path


def run_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint folder belongs to (RUN/best or RUN/checkpoints/step-N)."""
    path = Path(checkpoint)
    return path.parent if path.name == BEST_DIR else path.parent.parent


def final_adapter(run_dir: str | Path) -> Path | None:
    """The adapter to chat with: the final one, else the newest checkpoint's."""
    final = Path(run_dir) / "adapter"
    if final.exists():
        return final
    ckpt = latest_checkpoint(run_dir)
    return ckpt / "adapter" if ckpt else None


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of metrics.jsonl; a line that is not a whole record (the torn last line of a process
    killed while appending) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return [r for r in rows if split is None or r.get("split") == split]


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records past `after_step` (written after the checkpoint a resume starts from) and any torn line."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        keep = [json.dumps(r) for r in read_metrics(run_dir) if r["step"] <= after_step]
        write_atomic(path, "".join(line + "\n" for line in keep))


def run_status(run_dir: str | Path, info: dict) -> str:
    """The run's status as it is now: "running" while a process trains it (a resume that is still loading
    included), "interrupted" for one that says it is running but that no process trains (killed, or the
    machine went down), else run.json's."""
    status = info.get("status", "?")
    return "running" if is_active(run_dir) else "interrupted" if status == "running" else status


def status_text(run: dict) -> str:
    """A `list_runs` entry's status for people: "interrupted, resumable", "failed", "running"..."""
    return f"{run['status']}, resumable" if run.get("resumable") else run.get("status", "?")


def backend_text(run: dict) -> str:
    """A run's backend with the processes it trained in, for people: "torch" for one process,
    "torch × 2 (torchrun)", "mlx × 4 (mlx.launch)" for several (run.json's world_size and launcher)."""
    backend, size, launcher = run.get("backend", "?"), run.get("world_size") or 1, run.get("launcher")
    if size <= 1:
        return backend
    return f"{backend} × {size}" + (f" ({launcher})" if launcher and launcher != "none" else "")


def list_runs(runs_dir: str | Path) -> list[dict]:
    """Every run under runs_dir with run.json fields and its last training/eval metrics, newest first.

    `status` is `run_status` (an interrupted run says so) and `resumable` tells whether
    `train --resume` can continue it (not training now, and a complete checkpoint)."""
    root = Path(runs_dir)
    out = []
    for run_json in sorted(root.glob("*/run.json"), reverse=True):
        run_dir = run_json.parent
        try:
            info = read_json(run_json)
        except (OSError, ValueError) as e:  # written atomically by us; this is someone else's file
            info = {"status": "unreadable", "error": f"run.json: {e}"}
        rows = read_metrics(run_dir)
        last = {s: next((r for r in reversed(rows) if r.get("split") == s), {}) for s in ("train", "eval")}
        status = run_status(run_dir, info)
        resumable = status in RESUMABLE and latest_checkpoint(run_dir) is not None
        out.append({"run_dir": str(run_dir), **info, "status": status, "resumable": resumable,
                    "last_train": last["train"], "last_eval": last["eval"]})
    return out


def delete_run(run_dir: str | Path) -> None:
    """Remove a run folder; refuses anything that is not one (no run.json or config.yaml) and a run
    that is training."""
    path = Path(run_dir)
    if not ((path / "run.json").exists() or (path / "config.yaml").exists()):
        raise FileNotFoundError(f"{path}: not a run folder (no run.json or config.yaml); nothing deleted")
    refuse_if_active(path, "delete")
    shutil.rmtree(path)
