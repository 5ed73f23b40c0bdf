"""The training loop: one plain function, backend-agnostic (mlx-lm's shape).

    from orpo_local import TrainConfig, train
    run = train(TrainConfig().with_overrides(["max_steps=30"]))
    run = train(resume="runs/20261123-101500-smollm2-135m-instruct")   # continue a stopped run

Everything it does is reported through `on_event` (orpo_local.events); the terminal bar and
metrics.jsonl are two such listeners. `stop` is anything with `is_set()` (a threading.Event):
it is checked between steps, and a stop saves a checkpoint and the adapter. Across processes a stop
asked of any of them ends all after the same step.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .backend import window_sizes
from .batching import collate, iterate_batches
from .config import TrainConfig
from .data import DataReport, fingerprint_source, inspect_data, split_pairs
from .distributed import any_process, barrier, broadcast, init_mlx, init_torch, world
from .events import Evaluated, Event, Failed, Finished, Message, MetricsWriter, Saved, Started, Step, TerminalReporter
from .fsutil import folder_bytes, is_disk_full, write_atomic
from .runs import (BEST_DIR, TEMPLATE_FILE, drop_best, latest_checkpoint, lock_run, new_run_dir, read_json, read_metrics,
                   run_template, save_best, save_checkpoint, save_final_adapter, save_template, tokenizer_fingerprint,
                   truncate_metrics, update_run)
from .templates import TemplateNotUsable, resolve_template
from .tokenization import ChatEncoder, tokenize_pairs
from .verdict import is_better, verdict

# What a resumed run may change: everything else would alter the data, its order or the model.
RESUMABLE_CHANGES = {("optim", "max_steps"), ("optim", "learning_rate"), ("optim", "warmup_steps"), ("optim", "schedule"),
                     ("optim", "max_grad_norm"), ("optim", "epochs"), ("orpo", "lambda_"), ("run", "eval_every"),
                     ("run", "save_every"), ("run", "eval_max_pairs"), ("run", "runs_dir"), ("run", "name"),
                     ("model", "fsdp")}  # sharded or not, a checkpoint is one process's


# Words of out-of-memory errors: torch (CUDA, MPS, CPU allocator), MLX (Metal), the OS (ENOMEM).
OOM_SIGNS = ("out of memory", "failed to allocate", "attempting to allocate", "cannot allocate memory")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class RunResult:
    run_dir: Path
    status: str  # finished | stopped | failed
    step: int
    metrics: dict


def learning_rate(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    """LR for 0-based `step`: linear warm-up over `warmup` steps, then cosine / linear decay or constant."""
    warmup = min(warmup, total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(config: TrainConfig | None = None, *, resume: str | Path | None = None, on_event: Callable[[Event], None] | None = None,
          stop=None, backend=None, progress: bool = True, accept_data_change: bool = False, download_bar=None) -> RunResult:
    """Train with ORPO; blocks until finished, stopped or failed, and returns the run.

    A Hub model that is not on disk is downloaded first, before a run folder exists, its progress as
    Message events (and `download_bar`, a tqdm class, for the files; the terminal's bar by default).

    A resume refuses data whose content changed since the run started (the files' hashes are in
    run.json), unless `accept_data_change`."""
    if resume is not None:
        run_dir = Path(resume)
        config = _resume_config(run_dir, config)
        check_writable(run_dir)
    else:
        config = with_absolute_paths(config or TrainConfig())
        check_writable(Path(config.run.runs_dir))
    data_sha256 = fingerprint_source(config.data.path)
    if resume is not None:
        _check_data_unchanged(run_dir, data_sha256, accept_data_change)
    report = inspect_data(config.data.path, config.data.format, config.data.max_pairs, columns=config.data.columns or None,
                          progress=_say(on_event, progress))
    if not report.pairs:  # fail before loading a model
        first = f" (first: {report.invalid[0]})" if report.invalid else ""
        raise TrainingError(f"{report.source}: no valid preference pairs in {report.n_rows} rows{first}; "
                            f"run `orpo-local data check {config.data.path}` for every problem")
    if resume is None:
        _fetch_model(config, on_event, progress, download_bar)
    if resume is None and config.data.template != "auto":
        _check_template(config)
    if backend is None:
        from .backends import get_backend

        backend = get_backend(config.model.backend)
    w = world()
    if config.model.fsdp and w.size <= 1:
        raise TrainingError("model.fsdp shards the model over processes, and this is one: start several with "
                            "`orpo-local train --nproc N` (N >= 2) or torchrun, or turn model.fsdp off")
    if w.size > 1:
        if backend.name != w.framework:
            raise TrainingError(f"{w.size} processes started by {w.launcher}, a launcher for the {w.framework} backend, cannot "
                                f"train with {backend.name}: start them with `orpo-local train --nproc {w.size} --backend "
                                f"{backend.name}`, which picks the launcher (torchrun for torch, mlx.launch for MLX)")
        (init_mlx if w.framework == "mlx" else init_torch)(w)
        if not w.writer:  # process 0 alone writes the run; the others keep what they would write in a scratch copy
            return _follower(config, run_dir if resume is not None else None, backend, stop, report, data_sha256)
    if resume is None:
        run_dir = new_run_dir(config.run.runs_dir, config.model.name, config.run.name)
    broadcast(str(run_dir), w)  # the followers' name for it
    with lock_run(run_dir):  # RunBusy when another job trains it; released however this process ends
        return _supervised(config, run_dir, backend, resume is not None, on_event, progress, stop, report, data_sha256)


def _follower(config, resume_dir: Path | None, backend, stop, report, data_sha256) -> RunResult:
    """A process other than 0: the same training, its writes in a scratch copy of the run (a resume reads the
    real run's checkpoints from it), removed at the end. Process 0 copies nothing before this copy is taken."""
    real = Path(broadcast(None, world()))
    with tempfile.TemporaryDirectory(prefix="orpo-rank-") as scratch:
        run_dir = Path(scratch) / real.name
        if resume_dir is not None:
            shutil.copytree(real, run_dir, ignore=shutil.ignore_patterns("exports", ".lock"))
        else:
            run_dir.mkdir()
        barrier(world())
        return _run(config, run_dir, backend, resume_dir is not None, lambda event: None, stop, report, data_sha256)


def _supervised(config, run_dir: Path, backend, resuming: bool, on_event, progress: bool, stop, report, data_sha256) -> RunResult:
    """`_run` with the run recorded as running, and any failure recorded in run.json with advice."""
    barrier(world())  # the other processes have copied what they resume from: only now may this one write
    write_atomic(run_dir / "config.yaml", config.to_yaml())  # rewritten on every resume: never half a file
    if not resuming:  # listed (and, if killed while loading, shown as interrupted) from the start
        update_run(run_dir, status="running", base_model=config.model.name, step=0, created_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    listeners = [MetricsWriter(run_dir / "metrics.jsonl")] + ([TerminalReporter()] if progress else []) + ([on_event] if on_event else [])
    last_step = [0]

    def emit(event: Event) -> None:
        if isinstance(event, Step):
            last_step[0] = event.step
        for listener in listeners:
            listener(event)

    try:
        return _run(config, run_dir, backend, resuming, emit, stop, report, data_sha256)
    except KeyboardInterrupt:
        info = _record_failure(run_dir, status="stopped", error="interrupted (Ctrl-C)")
        hint = f"resume with `orpo-local train --resume {run_dir}`" if latest_checkpoint(run_dir) else "no checkpoint was written yet"
        emit(Failed(str(run_dir), info.get("step", 0), f"interrupted (Ctrl-C); {hint}"))
        raise
    except Exception as e:
        advice = out_of_memory_advice(e, config, run_dir, last_step[0]) or disk_full_advice(e, run_dir) or peer_lost_advice(e, run_dir)
        message = advice or f"{type(e).__name__}: {e}"
        info = _record_failure(run_dir, status="failed", error=message)
        emit(Failed(str(run_dir), info.get("step", 0), message))
        if advice:
            raise TrainingError(message) from e
        raise


def _record_failure(run_dir: Path, **fields) -> dict:
    """update_run, unless the disk that just failed refuses even that (run.json then keeps its last
    whole version, and the run lists as interrupted)."""
    try:
        return update_run(run_dir, **fields)
    except OSError:
        return {}


def _say(on_event, progress: bool):
    """Messages before a run folder exists: as Message events, else on the terminal."""
    def say(text: str) -> None:
        if on_event is not None:
            on_event(Message(text))
        elif progress:
            print(text, file=sys.stderr)

    return say


def check_writable(folder: Path) -> None:
    """Refuse a runs folder (or a run to resume) that cannot be written, before any download or model load:
    the folder, or the nearest existing folder above it that would hold it, takes a test file."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise TrainingError(f"{folder}: cannot write there ({e.strerror or e}); a run writes its folder, checkpoints and "
                            "adapter under run.runs_dir. Pick a writable folder with --runs-dir DIR, or fix its "
                            "permissions") from None


def out_of_memory_advice(error: BaseException, config: TrainConfig, run_dir: Path, last_step: int) -> str:
    """What to do after an out-of-memory error (host or accelerator), or "" for any other error."""
    text = str(error).lower()
    if not (isinstance(error, MemoryError) or any(s in text for s in OOM_SIGNS)):
        return ""
    opt, first = config.optim, (str(error).strip().splitlines() or [""])[0][:300]
    ckpt = latest_checkpoint(run_dir)
    kept = f"the last complete checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
    return (f"out of memory at step {last_step + 1} ({type(error).__name__}: {first}). The model, batch and sequence length "
            f"did not fit: lower the batch size (optim.batch_size, now {opt.batch_size}; raise optim.grad_accumulation to keep "
            f"the effective batch) or the max length (data.max_length, now {config.data.max_length}), turn on 4-bit "
            f"(--4bit{', on already' if config.model.load_in_4bit else ''}) or gradient checkpointing "
            f"(model.gradient_checkpointing{', on already' if config.model.gradient_checkpointing else ''}), or pick a "
            f"smaller model. These settings cannot change on a resume, so start a new run; {kept}.")


# What gloo, NCCL and MLX's ring say when a peer process is gone.
PEER_LOST = ("connection closed by peer", "connection to a peer was lost", "connection reset by peer", "nccl error", "broken pipe")


def peer_lost_advice(error: BaseException, run_dir: Path) -> str:
    """What to do after another training process ended (its failure is in its own output), or ""."""
    if world().size <= 1 or not any(sign in str(error).lower() for sign in PEER_LOST):
        return ""
    ckpt = latest_checkpoint(run_dir)
    then = f"resume with `orpo-local train --resume {run_dir}` (from {ckpt.name})" if ckpt else "start again (no checkpoint was written yet)"
    return (f"another training process ended, so this one stopped too ({type(error).__name__}: {str(error)[:200]}); the "
            f"launcher's output above shows why it ended. Fix that, then {then}.")


def disk_full_advice(error: BaseException, run_dir: Path) -> str:
    """How much space a run needs after a write failed for lack of it, or "" for any other error."""
    if not is_disk_full(error):
        return ""
    ckpt = latest_checkpoint(run_dir)
    info = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    # a checkpoint: the adapter plus two Adam moments per trainable parameter (float32), or the last one's size
    need = max(folder_bytes(ckpt) if ckpt else 0, info.get("n_trainable", 0) * 12)
    free = shutil.disk_usage(run_dir).free
    kept = f"the last complete checkpoint, {ckpt}, is intact" if ckpt else "no checkpoint was written yet"
    return (f"the disk is full: {error.strerror or error} while writing {error.filename or run_dir}. Each checkpoint of this "
            f"run needs about {_mb(need)} and {_mb(free)} are free there: free at least {_mb(2 * need)} (the next checkpoint "
            f"and the final adapter), or set run.runs_dir on a bigger disk for a new run, then resume with "
            f"`orpo-local train --resume {run_dir}`; {kept}.")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _fetch_model(config: TrainConfig, on_event, progress: bool, bar) -> None:
    from .models import resolve_model

    resolve_model(config.model.name, progress=_say(on_event, progress), tqdm_class=bar)


def _check_template(config: TrainConfig) -> None:
    """Refuse a template the tokenizer cannot use before any weights load (the tokenizer alone is quick)."""
    from .models import load_tokenizer

    try:
        resolve_template(load_tokenizer(config.model.name, progress=lambda m: None), config.data.template)
    except TemplateNotUsable as e:
        raise TrainingError(f"{config.model.name}: {e}") from None


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local data/model paths and runs_dir as absolute paths, so a run folder works from anywhere."""
    over = {"run.runs_dir": str(Path(config.run.runs_dir).expanduser().resolve())}
    if Path(config.data.path).expanduser().exists():  # bundled names ('zh-sample') stay names
        over["data.path"] = str(Path(config.data.path).expanduser().resolve())
    if Path(config.model.name).expanduser().exists():
        over["model.name"] = str(Path(config.model.name).expanduser().resolve())
    return config.with_overrides(over)


def _resume_config(run_dir: Path, config: TrainConfig | None) -> TrainConfig:
    """The run's saved config, with only the changes a resume allows; checked before anything is written."""
    if not (run_dir / "config.yaml").exists():
        raise TrainingError(f"{run_dir}: not a run folder (no config.yaml)")
    if latest_checkpoint(run_dir) is None:
        raise TrainingError(f"{run_dir}: no complete checkpoint to resume from; start a new run instead")
    saved = TrainConfig.from_yaml(run_dir / "config.yaml")
    if config is None:
        return saved
    old, new = saved.to_dict(), config.to_dict()
    changed = [f"{sec}.{key}" for sec in old for key in old[sec] if old[sec][key] != new[sec][key] and (sec, key) not in RESUMABLE_CHANGES]
    if changed:
        raise TrainingError(f"{run_dir}: a resumed run cannot change {', '.join(changed)} (that would change its data, "
                            "their order or the model); start a new run for that")
    return config


def _check_data_unchanged(run_dir: Path, now: dict, accept: bool) -> None:
    before = read_json(run_dir / "run.json").get("data_sha256") if (run_dir / "run.json").exists() else None
    if before is None or before == now:
        return
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not accept:
        raise TrainingError(f"{run_dir}: the training data changed since this run started ({', '.join(changed)}): resuming "
                            "would train on other pairs in another order. Restore the data, start a new run, or resume "
                            "knowingly with `--accept-data-change`")


def prepare_data(config: TrainConfig, encoder: ChatEncoder, emit=lambda event: None, report: DataReport | None = None):
    """(train pairs, validation pairs, counts) exactly as `train` builds them from `config`."""
    report = report or inspect_data(config.data.path, config.data.format, config.data.max_pairs, columns=config.data.columns or None)
    if report.invalid:
        emit(Message(f"{len(report.invalid)} invalid rows skipped (first: {report.invalid[0]}); "
                     f"run `orpo-local data check {config.data.path}` for the list", "warning"))
    if not report.pairs:
        raise TrainingError(f"{report.source}: no valid preference pairs")
    train_pairs, held_out = split_pairs(report.pairs, config.data.val_fraction, config.run.seed, config.data.val_min_pairs)
    val_pairs = held_out[: config.run.eval_max_pairs] if config.run.eval_max_pairs > 0 else held_out
    train_tok, stats = tokenize_pairs(train_pairs, encoder, config.data.max_length, config.data.max_prompt_length)
    val_tok, val_stats = tokenize_pairs(val_pairs, encoder, config.data.max_length, config.data.max_prompt_length)
    if stats.truncated or stats.dropped:
        emit(Message(f"{stats.truncated} training pairs truncated and {stats.dropped} dropped at max_length {config.data.max_length}", "warning"))
    if not train_pairs:
        raise TrainingError(f"{report.source}: {len(report.pairs)} pairs leave none for training at val_fraction {config.data.val_fraction}")
    if not train_tok:
        raise TrainingError(f"no training pairs left after tokenisation at max_length {config.data.max_length}: raise max_length")
    data_info = {"source": report.source, "format": report.format, "columns": report.columns, "invalid_rows": len(report.invalid),
                 "train_pairs": len(train_tok), "val_pairs": len(val_tok), "truncated": stats.truncated + val_stats.truncated,
                 "dropped": stats.dropped + val_stats.dropped, "val_rows": [p.row for p in held_out]}
    return train_tok, val_tok, data_info


def _run(config: TrainConfig, run_dir: Path, backend, resuming: bool, emit, stop, report: DataReport, data_sha256: dict) -> RunResult:
    seed = config.run.seed
    ckpt = latest_checkpoint(run_dir) if resuming else None
    info = backend.load(config.model, config.lora, seed, adapter=ckpt / "adapter" if ckpt else None, trainable=True)
    encoder = ChatEncoder(backend.tokenizer, run_template(run_dir) if resuming else config.data.template)
    if not (run_dir / TEMPLATE_FILE).exists():
        save_template(run_dir, encoder.template)
    fingerprint = tokenizer_fingerprint(backend.tokenizer)
    if resuming and any(read_json(run_dir / "run.json").get(k) not in (None, v) for k, v in fingerprint.items()):
        emit(Message("the tokenizer or chat template differs from the one this run started with", "warning"))
    if resuming and read_json(run_dir / "run.json").get("data_sha256") not in (None, data_sha256):
        emit(Message("the training data changed since this run started; resuming on the new data as asked", "warning"))
    train_pairs, val_pairs, data_info = prepare_data(config, encoder, emit, report)
    backend.init_optimizer(config.optim)

    opt, w = config.optim, world()
    accum = opt.grad_accumulation * w.size  # micro-batches per optimiser step, over every process
    batches_per_epoch = math.ceil(len(train_pairs) / opt.batch_size)
    # An epoch is every micro-batch once: the last optimiser step may get a shorter window.
    total_micro = opt.max_steps * accum if opt.max_steps > 0 else max(1, math.ceil(opt.epochs * batches_per_epoch))
    total = math.ceil(total_micro / accum)
    start, first_micro = 0, 0
    best = None
    if ckpt is not None:
        backend.load_state(ckpt)
        state = read_json(ckpt / "trainer_state.json")
        start, first_micro = state["step"], state["micro_batch"]
        total_micro = max(total_micro, first_micro)
        truncate_metrics(run_dir, start)
        best = read_json(run_dir / "run.json").get("best")
        if best and best["step"] > start:  # chosen on steps that will be trained again
            drop_best(run_dir)
            best = None

    model_info = asdict(info)
    update_run(run_dir, status="running", orpo_local_version=__version__, base_model=config.model.name, **model_info,
               **fingerprint, template=encoder.template_name, stop_ids=sorted(encoder.stop_ids), pad_id=encoder.pad_id,
               step=start, total_steps=total, data=data_info, data_sha256=data_sha256, best=best, error=None,
               world_size=w.size, launcher=w.launcher)
    emit(Started(str(run_dir), total, start, len(train_pairs), len(val_pairs), model_info, data_info))

    pad_to, layout = getattr(backend, "pad_to", 32), getattr(backend, "layout", "plain")
    val_batches = [collate(val_pairs[i: i + opt.batch_size], encoder.pad_id, pad_to, layout) for i in range(0, len(val_pairs), opt.batch_size)]
    batches = iterate_batches(train_pairs, opt.batch_size, encoder.pad_id, seed, start=first_micro, pad_to=pad_to, layout=layout)

    evaluated = {r["step"] for r in read_metrics(run_dir, "eval")} if resuming else set()  # kept by truncate_metrics

    def evaluate(at: int) -> None:
        nonlocal best
        if at in evaluated:  # a stop right after a periodic evaluation needs no second one
            return
        evaluated.add(at)
        metrics = backend.evaluate(val_batches, config.orpo)
        emit(Evaluated(at, metrics))
        if at > 0 and is_better(metrics, best):
            best = save_best(run_dir, at, backend, metrics)
            update_run(run_dir, best=best)
            emit(Saved(at, str(run_dir / BEST_DIR)))

    def checkpoint(at: int, micro_done: int) -> None:
        path = save_checkpoint(run_dir, at, backend, {"micro_batch": micro_done, "epoch": micro_done / batches_per_epoch})
        update_run(run_dir, step=at)
        emit(Saved(at, str(path)))

    if val_batches and start == 0:
        evaluate(0)  # the base model: what the verdict compares with
    t0, metrics, status, done, micro_done = time.perf_counter(), {}, "finished", start, first_micro
    for step in range(start, total):
        tic = time.perf_counter()
        n_micro = min(accum, total_micro - micro_done)
        window = [next(batches)[1] for _ in range(n_micro)]  # every process walks the same sequence
        micro = w.share(window)
        lr = learning_rate(step, total, opt.learning_rate, opt.warmup_steps, opt.schedule)
        metrics = backend.train_step(micro, lr, config.orpo, opt.max_grad_norm)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            return _fail_non_finite(run_dir, step, metrics, lr, backend, micro_done, batches_per_epoch, emit)
        micro_done += n_micro
        dt = time.perf_counter() - tic
        n_pairs = window_sizes(window, False)[1]
        metrics.update(learning_rate=lr, pairs_per_s=n_pairs / dt, tokens_per_s=metrics.pop("tokens") / dt,
                       peak_mem_mb=backend.peak_memory_mb(), epoch=micro_done / batches_per_epoch)
        elapsed = time.perf_counter() - t0
        emit(Step(step + 1, total, metrics, elapsed, elapsed / (step + 1 - start) * (total - step - 1)))
        done = step + 1
        if val_batches and config.run.eval_every > 0 and done % config.run.eval_every == 0 and done < total:
            evaluate(done)
        if config.run.save_every > 0 and done % config.run.save_every == 0 and done < total:
            checkpoint(done, micro_done)
        if any_process(stop is not None and stop.is_set(), w) and done < total:
            status = "stopped"
            break
    if val_batches:
        evaluate(done)
    checkpoint(done, micro_done)
    save_final_adapter(run_dir, backend)
    judged = verdict(read_metrics(run_dir, "eval"), best, config)
    update_run(run_dir, status=status, step=done, **({"verdict": judged.to_dict()} if judged else {}))
    if judged:
        emit(judged)
    emit(Finished(str(run_dir), done, status, metrics))
    return RunResult(run_dir, status, done, metrics)


def _fail_non_finite(run_dir, step, metrics, lr, backend, micro_done, batches_per_epoch, emit) -> RunResult:
    """The update was skipped, so the weights are still those after `step`: keep them as a checkpoint."""
    path = save_checkpoint(run_dir, step, backend, {"micro_batch": micro_done, "epoch": micro_done / batches_per_epoch})
    message = (f"loss or gradient became {metrics['loss']}/{metrics['grad_norm']} at step {step + 1}; the update was skipped "
               f"and the last good weights are in {path}. Lower the learning rate (now {lr:.2e}) or λ, then resume or restart.")
    update_run(run_dir, status="failed", step=step, error=message)
    emit(Failed(str(run_dir), step, message))
    return RunResult(Path(run_dir), "failed", step, metrics)
