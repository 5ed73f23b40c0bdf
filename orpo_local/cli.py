"""orpo-local: command-line interface.

    orpo-local train [CONFIG.yaml] [--model M] [--data PATH] [--backend auto|torch|mlx] [--max-steps N]
                     [--runs-dir DIR] [--set key=value ...] [--resume RUN_DIR]
    orpo-local chat RUN_DIR|MODEL [--prompt TEXT]
    orpo-local eval RUN_DIR|MODEL [--data PATH] [--max-pairs N]
    orpo-local export RUN_DIR --to peft|mlx|merged|merged-mlx|gguf [--out DIR] [--quant f16|q8_0|q4_0] [--checkpoint C]
    orpo-local ui [--host 127.0.0.1] [--port 7860] [--lang zh|en] [--auth USER:PASSWORD | --auth-file FILE]
    orpo-local runs [--runs-dir DIR]
    orpo-local data check PATH [--format F] [--model M] [--max-length N]
    orpo-local data synth OUT.jsonl [--n 200] [--seed 0]
    orpo-local model prepare

Defaults and help texts come from orpo_local.config; there is no second copy here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import __version__
from .config import field_default, field_info
from .runs import run_backend
from .templates import TEMPLATES

EXIT_OK, EXIT_INVALID_ROWS, EXIT_UNREADABLE = 0, 1, 2
EXIT_FAILED = 1  # training stopped by an error
EXIT_INTERRUPTED = 130


def config_argument(parser: argparse.ArgumentParser, section: str, name: str, *flags: str, **kw) -> None:
    """Add an option whose default, help and choices come from the config field `section.name`."""
    f = field_info(section, name)
    default = field_default(f)
    kw.setdefault("default", default)
    kw.setdefault("help", f"{f.metadata['help']} (default: {default})")
    if "choices" in f.metadata:
        kw.setdefault("choices", f.metadata["choices"])
    if isinstance(default, bool):
        kw.setdefault("action", argparse.BooleanOptionalAction)
    else:
        kw.setdefault("type", str if isinstance(default, dict) else type(default))
    parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orpo-local", description="ORPO preference tuning on your own machine.")
    parser.add_argument("--version", action="version", version=f"orpo-local {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train with ORPO (defaults: bundled model, bundled Chinese sample, runs/)")
    train.add_argument("config", nargs="?", help="a YAML config (see TrainConfig); flags below override it")
    for section, name, flag in TRAIN_FLAGS:
        config_argument(train, section, name, flag, default=None)
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field, e.g. --set optim.learning_rate=1e-4 --set lambda_=0.2")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete checkpoint")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train in N local processes, through torchrun for the torch backend (gloo on CPU, NCCL on CUDA) "
                       "or mlx.launch for MLX (a ring over localhost); each takes a share of every optimiser window, so the "
                       "global batch is N x batch_size x grad_accumulation")
    train.add_argument("--accept-data-change", action="store_true",
                       help="with --resume: continue even though the data files changed since the run started")
    train.set_defaults(func=cmd_train)

    chat = commands.add_parser("chat", help="chat with a run (its adapter) or a base model")
    chat.add_argument("target", help="a run folder, or a model name/path/Hub id")
    chat.add_argument("--prompt", help="one message; without it, an interactive chat (/reset, /exit)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--checkpoint", default=None, help="chat with this adapter of the run instead of its final one: best "
                      "(the best validation margin), step-N, or a checkpoint folder")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default: 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    config_argument(chat, "model", "backend")
    chat.add_argument("--template", default="auto", choices=TEMPLATES,
                      help="chat template of a model that is not a run (a run always uses the one it trained with; default: auto)")
    chat.set_defaults(func=cmd_chat)

    ev = commands.add_parser("eval", help="score held-out pairs with the base model and the tuned one (table + JSON)")
    ev.add_argument("target", help="a run folder (base vs tuned), or a model name/path (base only)")
    ev.add_argument("--data", default=None, help="pairs to score (any supported format); default for a run: its validation split")
    ev.add_argument("--split", choices=("val", "train"), default="val", help="without --data: the run's validation or training pairs (default: val)")
    config_argument(ev, "data", "format")
    ev.add_argument("--max-pairs", type=int, default=-1, help="score at most this many pairs (default: all)")
    ev.add_argument("--checkpoint", default=None, help="score this adapter of the run: best (the best validation margin), "
                    "step-N, or a checkpoint folder (default: the final adapter)")
    ev.add_argument("--backend", default=None, choices=("auto", "torch", "mlx"), help="backend (default: the run's)")
    ev.add_argument("--out", default=None, help="write the JSON report here (default: RUN_DIR/eval.json for a run)")
    ev.set_defaults(func=cmd_eval)

    from .export import QUANTS, TARGETS

    ex = commands.add_parser("export", help="write a run's adapter for the other backend, as a merged model, or as GGUF "
                             "for llama.cpp / Ollama / LM Studio")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    ex.add_argument("--to", required=True, choices=tuple(TARGETS), help="; ".join(f"{k}: {v}" for k, v in TARGETS.items()))
    ex.add_argument("--out", default=None, help="the folder to write (replaced whole; default: RUN_DIR/exports/RUN-TARGET[-QUANT])")
    ex.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF weight type: f16, q8_0 (8-bit) or q4_0 (4-bit) (default: f16)")
    ex.add_argument("--checkpoint", default=None, help="export this adapter of the run instead of its final one: best "
                    "(the best validation margin), step-N, or a checkpoint folder")
    ex.set_defaults(func=cmd_export)

    ui = commands.add_parser("ui", help="open the web UI (Gradio): model, data, train, chat, runs")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    ui.add_argument("--lang", choices=("zh", "en"), default="zh", help="interface language, switchable in the page (default: zh)")
    config_argument(ui, "run", "runs_dir")
    ui.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link (off by default; "
                    "needs --auth or --insecure)")
    ui.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                    help="require this login (repeatable); needed to listen on an address other machines reach. "
                    "A password here shows in the process list: prefer --auth-file")
    ui.add_argument("--auth-file", metavar="FILE", help="require a login from FILE: one user:password a line, # comments")
    ui.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --host (or --share) WITHOUT a login: anyone who reaches it can train and read your data")
    ui.add_argument("--max-upload-mb", type=float, default=1024, help="largest file the page accepts as an upload, in MB (default: 1024)")
    ui.set_defaults(func=cmd_ui)

    runs = commands.add_parser("runs", help="list runs with status, steps and final metrics")
    config_argument(runs, "run", "runs_dir")
    runs.set_defaults(func=cmd_runs)

    data = commands.add_parser("data", help="inspect and generate preference data").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="validate a dataset: format, counts, every invalid row, examples through the chat template")
    check.add_argument("path", help="file, folder, saved dataset, Hub id, or a bundled sample (zh-sample, en-sample)")
    config_argument(check, "data", "format")
    config_argument(check, "data", "columns")
    config_argument(check, "model", "name", "--model")
    config_argument(check, "data", "template")
    config_argument(check, "data", "max_length")
    config_argument(check, "data", "max_prompt_length")
    check.add_argument("--examples", type=int, default=2, help="how many valid pairs to show through the chat template (default: 2)")
    check.add_argument("--no-tokenize", action="store_true", help="only validate rows; skip loading the model's tokenizer")
    check.set_defaults(func=cmd_data_check)

    synth = data.add_parser("synth", help="write synthetic, objectively checkable pairs (Chinese arithmetic) as .jsonl")
    synth.add_argument("out", help="output .jsonl file")
    synth.add_argument("--n", type=int, default=200, help="number of pairs (default: 200)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.set_defaults(func=cmd_data_synth)

    model = commands.add_parser("model", help="manage models").add_subparsers(dest="model_command", required=True)
    prepare = model.add_parser("prepare", help="convert the bundled model once into the cache and print its folder")
    prepare.set_defaults(func=cmd_model_prepare)
    listing = model.add_parser("list", help="models known to work: language, template, size, training-memory estimate, on disk or not")
    listing.add_argument("config", nargs="?", help="a YAML config whose batch, length and LoRA the estimate uses (default: the defaults)")
    listing.set_defaults(func=cmd_model_list)
    return parser


TRAIN_FLAGS = [("model", "name", "--model"), ("data", "path", "--data"), ("model", "backend", "--backend"),
               ("data", "format", "--format"), ("data", "columns", "--columns"), ("data", "template", "--template"),
               ("optim", "max_steps", "--max-steps"), ("run", "runs_dir", "--runs-dir"), ("model", "load_in_4bit", "--4bit"),
               ("model", "fsdp", "--fsdp")]


def main(argv: list[str] | None = None) -> int:
    """Entry point. argv=None means a real process (the console script), which may re-execute
    itself with OpenBLAS preloaded for MLX; in-process calls (tests) never do."""
    args = build_parser().parse_args(argv)
    args.own_process = argv is None
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


def _prefer_openblas(args, backend: str) -> None:
    from .backends import resolve_backend

    if args.own_process and resolve_backend(backend) == "mlx":
        from .openblas import reexec_with_openblas

        reexec_with_openblas(sys.argv[1:])


# ------------------------------------------------------------------ train, chat, runs

def cmd_train(args) -> int:
    from .distributed import record_exit

    code = _train(args)
    record_exit(code)  # for the process that started this one through mlx.launch, which loses exit codes
    return code


def _train(args) -> int:
    from .config import ConfigError, TrainConfig
    from .distributed import world
    from .train import TrainingError, train

    try:
        if args.resume:
            config = TrainConfig.from_yaml(Path(args.resume) / "config.yaml")
        else:
            config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
        flags = {f"{s}.{n}": getattr(args, n) for s, n, _ in TRAIN_FLAGS if getattr(args, n) is not None}
        config = config.with_overrides(flags).with_overrides(args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.nproc > 1 and world().size == 1:
        return _launch(args, config.model.backend)
    try:
        _prefer_openblas(args, config.model.backend)
        with stop_on_signals() as stop:
            run = train(config, resume=args.resume, accept_data_change=args.accept_data_change, stop=stop)
    except (TrainingError, RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if run.status in ("finished", "stopped") else EXIT_FAILED


@contextlib.contextmanager
def stop_on_signals():
    """A stop event set by the first Ctrl-C (SIGINT) or SIGTERM: training ends after the step it is on, saving a
    checkpoint and the adapter (torchrun passes a Ctrl-C on to its processes as SIGTERM). A second signal
    interrupts at once (KeyboardInterrupt: the run lists as stopped, resumable from its last checkpoint)."""
    import signal
    import threading

    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def ask(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if world().writer:
            print(f"\n{signal.Signals(signum).name}: stopping after this step, saving a checkpoint "
                  "(again to stop at once)", file=sys.stderr)

    from .distributed import world

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch(args, backend: str) -> int:
    """The same command in args.nproc processes under the backend's launcher (torchrun, mlx.launch); their exit code."""
    import os
    import subprocess
    import tempfile

    from .backends import resolve_backend
    from .distributed import EXIT_DIR_ENV, exit_code, launcher_command

    argv, skip = [], False
    for item in args.argv:  # every flag as given, less --nproc
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            argv.append(item)
    try:
        command = launcher_command(resolve_backend(backend), args.nproc, argv)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"starting {args.nproc} processes: {' '.join(command)}", file=sys.stderr)
    # mlx.launch turns its stdin non-blocking and forwards it: a pipe of its own keeps the terminal as it is
    quiet, feed = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="orpo-exit-") as codes:
            launcher = subprocess.Popen(command, stdin=quiet, env={**os.environ, EXIT_DIR_ENV: codes})
            return _wait_for(launcher, Path(codes), args.nproc)
    finally:
        os.close(quiet)
        os.close(feed)


def _wait_for(launcher, codes: Path, nproc: int) -> int:
    """The processes' exit code. A Ctrl-C reaches the launcher too (one terminal process group) and its processes
    stop after their step with a checkpoint: wait for that, and for every process's exit code (mlx.launch can end
    before its processes do); a second Ctrl-C kills the launcher."""
    import time

    from .distributed import SHUTDOWN_TIMEOUT_S, exit_code

    interrupted = False
    while True:
        try:
            code = launcher.wait()
            break
        except KeyboardInterrupt:
            if interrupted:
                launcher.kill()
                launcher.wait()
                return EXIT_INTERRUPTED
            interrupted = True
    deadline = time.monotonic() + (SHUTDOWN_TIMEOUT_S if interrupted else 0)
    while len(list(codes.glob("rank-*"))) < nproc and time.monotonic() < deadline:
        time.sleep(0.5)
    # after a Ctrl-C torchrun exits non-zero (it re-raises the signal) however cleanly its processes stopped
    return exit_code(codes, nproc) if interrupted else code or exit_code(codes, nproc)


def cmd_chat(args) -> int:
    from .chat import ChatSession

    options = dict(system=args.system, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    try:
        _prefer_openblas(args, run_backend(args.target, args.backend))
        if (Path(args.target) / "config.yaml").exists():
            from .runs import resolve_checkpoint

            session = ChatSession.from_run(args.target, checkpoint=resolve_checkpoint(args.target, args.checkpoint),
                                           backend=args.backend, **options)
        else:
            session = ChatSession.from_model(args.target, backend=args.backend, template=args.template, **options)
    except (FileNotFoundError, RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.prompt is not None:
        _stream(session, args.prompt)
        return EXIT_OK
    print("Chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return EXIT_OK
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        if line == "/exit":
            return EXIT_OK
        if line == "/reset":
            session.reset()
            continue
        if line:
            _stream(session, line)


def _stream(session, message: str) -> None:
    for piece in session.stream(message):
        print(piece, end="", flush=True)
    print()


def cmd_ui(args) -> int:
    try:
        from .ui.app import check_server, launch, read_auth
    except ImportError as e:
        print(f"error: the web UI needs gradio ({e}): pip install 'orpo-local[ui]'", file=sys.stderr)
        return EXIT_UNREADABLE
    try:
        auth = read_auth(args.auth, args.auth_file)
        check_server(args.host, auth, args.insecure, args.share)  # refused before anything loads or listens
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    _prefer_openblas(args, "auto")
    print(f"orpo-local UI on http://{args.host}:{args.port} (runs in {Path(args.runs_dir).resolve()}); Ctrl-C stops it", file=sys.stderr)
    try:
        launch(host=args.host, port=args.port, lang=args.lang, runs_dir=args.runs_dir, share=args.share, auth=auth,
               insecure=args.insecure, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run, format_table

    is_run = (Path(args.target) / "config.yaml").exists()
    try:
        backend = args.backend or run_backend(args.target)
        _prefer_openblas(args, backend)
        result = evaluate_run(args.target, data=args.data, split=args.split, max_pairs=args.max_pairs,
                              data_format=args.format, backend_name=backend, checkpoint=args.checkpoint)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(format_table(result))
    out = Path(args.out) if args.out else (Path(args.target) / "eval.json" if is_run else None)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {out}")
    return EXIT_OK


def cmd_export(args) -> int:
    from .export import export, gguf_commands

    if args.to in ("merged", "merged-mlx"):  # the merge runs in a framework: MLX wants its fast BLAS
        _prefer_openblas(args, "torch" if args.to == "merged" else "mlx")
    try:
        out = export(args.run_dir, args.to, out=args.out, checkpoint=args.checkpoint, quant=args.quant,
                     progress=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(out)
    if args.to == "gguf":
        print("Run it with Ollama or llama.cpp:")
        for command in gguf_commands(out):
            print(f"  {command}")
    return EXIT_OK


def cmd_runs(args) -> int:
    from .runs import backend_text, list_runs, status_text
    from .verdict import margin as logp_margin

    runs = list_runs(args.runs_dir)
    if not runs:
        print(f"no runs in {args.runs_dir}")
        return EXIT_OK
    # status: "running" only while a process trains it; a killed run is "interrupted, resumable"
    # backend: "torch" for one process, "torch × 2 (torchrun)" for a run trained in two
    print(f"{'run':<48} {'status':<22} {'backend':<22} {'steps':>9}  {'loss':>7} {'acc':>5} {'margin':>8}")
    for r in runs:
        last = r["last_eval"] or r["last_train"]
        metric = lambda k, fmt: format(last[k], fmt) if k in last else "-"  # noqa: E731
        margin = format(logp_margin(last), "+8.4f") if "logps/chosen" in last else "-"
        print(f"{Path(r['run_dir']).name:<48} {status_text(r):<22} {backend_text(r):<22} "
              f"{r.get('step', 0):>4}/{r.get('total_steps', 0):<4}  {metric('loss', '7.4f')} "
              f"{metric('rewards/accuracies', '5.2f')} {margin:>8}")
    return EXIT_OK


# ------------------------------------------------------------------ data check

def cmd_data_check(args) -> int:
    from .config import ConfigError, format_columns, parse_columns
    from .data import DataFileError
    from .datacheck import check_data

    try:
        check = check_data(args.path, format=args.format, model=None if args.no_tokenize else args.name,
                           max_length=args.max_length, max_prompt_length=args.max_prompt_length, examples=args.examples,
                           progress=lambda m: print(m, file=sys.stderr), columns=parse_columns(args.columns),
                           template=args.template)
    except (DataFileError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    report = check.report
    detected = "auto-detected" if args.format == "auto" else "as given"
    print(f"Source:  {report.source}")
    print(f"Format:  {report.format} ({detected})")
    if report.columns:
        print(f"Columns: {format_columns(report.columns)} (data.columns: standard name=your column)")
    print(f"Rows:    {report.n_rows}   valid: {len(report.pairs)}   invalid: {len(report.invalid)}")
    if check.tokenize_error:
        print(f"\nTokenisation skipped: {check.tokenize_error}")
    elif check.stats is not None:
        _print_tokenized(check, args)
    if report.invalid:
        print(f"\nInvalid rows ({len(report.invalid)}):")
        for bad in report.invalid:
            print(f"  row {bad.row}: {bad.reason}")
        return EXIT_INVALID_ROWS
    return EXIT_OK


def _print_tokenized(check, args) -> None:
    stats, lengths = check.stats, check.lengths
    print(f"\nTokenised with {args.name}, template {check.template} (max_length {args.max_length}, max_prompt_length {args.max_prompt_length}):")
    print(f"  kept: {stats.pairs_out}   truncated: {stats.truncated}   dropped: {stats.dropped}"
          + (f"   special-token text kept as plain text: {stats.escaped} pairs" if stats.escaped else ""))
    if lengths:
        print(f"  prompt tokens: mean {lengths['prompt_mean']:.0f}, max {lengths['prompt_max']}   "
              f"response tokens: mean {lengths['response_mean']:.0f}, max {lengths['response_max']}")
    for where, reason in stats.dropped_rows:
        print(f"  dropped {where}: {reason}")
    for ex in check.examples:
        print(f"\n── row {ex.row} {'(truncated) ' if ex.truncated else ''}── prompt ({ex.prompt_tokens} tokens) ──")
        print(ex.prompt, end="")
        print(f"⟦── chosen ({ex.chosen_tokens} tokens, all targets) ──⟧")
        print(ex.chosen)
        print(f"⟦── rejected ({ex.rejected_tokens} tokens, all targets) ──⟧")
        print(ex.rejected)


# ------------------------------------------------------------------ data synth, model prepare

def cmd_data_synth(args) -> int:
    from .data.synthetic import arithmetic_pairs

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for pair in arithmetic_pairs(args.n, seed=args.seed):
            fh.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
    print(f"wrote {args.n} pairs to {out}")
    return EXIT_OK


def cmd_model_prepare(args) -> int:
    from .models import ModelNotFound, prepare_bundled_model

    try:
        print(prepare_bundled_model(progress=lambda m: print(m, file=sys.stderr)))
    except ModelNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    return EXIT_OK


def cmd_model_list(args) -> int:
    from .config import ConfigError, TrainConfig
    from .models import format_presets, preset_table

    try:
        config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(format_presets(preset_table(config)))
    print(f"\nMemory: training at batch {config.optim.batch_size}, max length {config.data.max_length}, LoRA rank "
          f"{config.lora.rank}. The bundled model is English-first; for Chinese data pick a Qwen model.")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
