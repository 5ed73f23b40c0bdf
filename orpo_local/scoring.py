"""Score preference pairs with a loaded backend: ORPO metrics over a fixed set, no training.

Used to compare a base model with a tuned one on the same pairs (the training-loop tests,
`orpo-local eval`).
"""

from __future__ import annotations

from .batching import collate
from .config import OrpoConfig
from .tokenization import TokenizedPair


def score_pairs(backend, pairs: list[TokenizedPair], pad_id: int, orpo: OrpoConfig | None = None, batch_size: int = 8) -> dict[str, float]:
    """ORPO metrics of `pairs` taken as one window (accuracy = share with logp(chosen) > logp(rejected))."""
    pad_to, layout = getattr(backend, "pad_to", 32), getattr(backend, "layout", "plain")
    batches = [collate(pairs[i: i + batch_size], pad_id, pad_to, layout) for i in range(0, len(pairs), batch_size)]
    return backend.evaluate(batches, orpo or OrpoConfig())
