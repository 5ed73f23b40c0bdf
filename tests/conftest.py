"""Shared test set-up: the reference module and small batch builders are importable from tests."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# Never reach for the network in tests; the bundled model and tiny models are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
