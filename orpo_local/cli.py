"""orpo-local: command-line interface.

    orpo-local data check PATH [--format F] [--model M] [--max-length N]
    orpo-local data synth OUT.jsonl [--n 200] [--seed 0]
    orpo-local model prepare

Defaults and help texts come from orpo_local.config; there is no second copy here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from . import __version__
from .config import field_default, field_info

EXIT_OK, EXIT_INVALID_ROWS, EXIT_UNREADABLE = 0, 1, 2


def config_argument(parser: argparse.ArgumentParser, section: str, name: str, *flags: str, **kw) -> None:
    """Add an option whose default, help and choices come from the config field `section.name`."""
    f = field_info(section, name)
    default = field_default(f)
    kw.setdefault("default", default)
    kw.setdefault("help", f"{f.metadata['help']} (default: {default})")
    if "choices" in f.metadata:
        kw.setdefault("choices", f.metadata["choices"])
    if not isinstance(default, bool):
        kw.setdefault("type", type(default))
    parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orpo-local", description="ORPO preference tuning on your own machine.")
    parser.add_argument("--version", action="version", version=f"orpo-local {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect and generate preference data").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="validate a dataset: format, counts, every invalid row, examples through the chat template")
    check.add_argument("path", help="file, folder, saved dataset, Hub id, or a bundled sample (zh-sample, en-sample)")
    config_argument(check, "data", "format")
    config_argument(check, "model", "name", "--model")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------ data check

def cmd_data_check(args) -> int:
    from .data import DataFileError, inspect_data

    try:
        report = inspect_data(args.path, format=args.format)
    except (DataFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    detected = "auto-detected" if args.format == "auto" else "as given"
    print(f"Source:  {report.source}")
    print(f"Format:  {report.format} ({detected})")
    print(f"Rows:    {report.n_rows}   valid: {len(report.pairs)}   invalid: {len(report.invalid)}")
    if report.pairs and not args.no_tokenize:
        _print_tokenized(report.pairs, args)
    if report.invalid:
        print(f"\nInvalid rows ({len(report.invalid)}):")
        for bad in report.invalid:
            print(f"  row {bad.row}: {bad.reason}")
        return EXIT_INVALID_ROWS
    return EXIT_OK


def _print_tokenized(pairs, args) -> None:
    from .models import ModelNotFound, load_tokenizer
    from .tokenization import ChatEncoder, TemplateError, tokenize_pairs

    try:
        tokenizer = load_tokenizer(args.name)
        encoder = ChatEncoder(tokenizer)
    except (ModelNotFound, OSError, TemplateError) as e:
        print(f"\nTokenisation skipped: {e}")
        return
    tokenized, stats = tokenize_pairs(pairs, encoder, args.max_length, args.max_prompt_length)
    print(f"\nTokenised with {args.name} (max_length {args.max_length}, max_prompt_length {args.max_prompt_length}):")
    print(f"  kept: {stats.pairs_out}   truncated: {stats.truncated}   dropped: {stats.dropped}"
          + (f"   special-token text kept as plain text: {stats.escaped} pairs" if stats.escaped else ""))
    if tokenized:
        p = [len(t.prompt) for t in tokenized]
        r = [len(x) for t in tokenized for x in (t.chosen, t.rejected)]
        print(f"  prompt tokens: mean {statistics.mean(p):.0f}, max {max(p)}   response tokens: mean {statistics.mean(r):.0f}, max {max(r)}")
    for row, reason in stats.dropped_rows:
        print(f"  dropped row {row}: {reason}")
    by_row = {t.row: t for t in tokenized}
    for pair in [p for p in pairs if p.row in by_row][: args.examples]:
        t = by_row[pair.row]
        dec = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        print(f"\n── row {pair.row} {'(truncated) ' if t.truncated else ''}── prompt ({len(t.prompt)} tokens) ──")
        print(dec(t.prompt), end="")
        print(f"⟦── chosen ({len(t.chosen)} tokens, all targets) ──⟧")
        print(dec(t.chosen))
        print(f"⟦── rejected ({len(t.rejected)} tokens, all targets) ──⟧")
        print(dec(t.rejected))


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


if __name__ == "__main__":
    raise SystemExit(main())
