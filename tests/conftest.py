"""Shared test set-up: the reference module and small batch builders are importable from tests."""

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
