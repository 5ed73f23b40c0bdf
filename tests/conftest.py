"""Shared test set-up: the reference module and small batch builders are importable from tests,
and `need` decides what a missing optional piece means (skip here, fail in CI)."""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Never reach for the network in tests; the bundled model and tiny models are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def need(what: str | bool, reason: str):
    """`what` is a module name (imported and returned) or a bool condition that must hold.

    When it is missing or false the test skips with `reason`, except in CI (CI=true, which
    .ci/run also sets), where `make test` installs everything the project ships: there a
    missing piece is a failure, so a broken install cannot pass as a green run of skips.
    """
    __tracebackhide__ = True  # skips and failures are reported at the caller's line
    if isinstance(what, str):
        try:
            return importlib.import_module(what)
        except ImportError as e:
            reason = f"{reason} ({e})"
    elif not isinstance(what, bool):
        raise TypeError(f"need() takes a module name or a bool, not {what!r}")
    elif what:
        return True
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI installs this, so it must not be missing: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random Llama with the bundled tokenizer (and its chat template), saved to a folder."""
    from orpo_local.models import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    return tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=len(tok), tokenizer=tok)


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """40 synthetic arithmetic pairs as a conversational .jsonl file."""
    from orpo_local.data.synthetic import arithmetic_pairs

    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in arithmetic_pairs(40, seed=0)), encoding="utf-8")
    return path
