"""Random batches in orpo_local's layout, for loss tests of the reference and of backends."""

import numpy as np

from orpo_local.batching import collate
from orpo_local.tokenization import TokenizedPair


def random_batch(n_pairs=3, vocab=11, seed=0, pad_to=8, max_prompt=5, max_resp=6):
    """(batch, logits): pairs of random lengths (so rows are padded), logits ~ N(0, 2)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, vocab, rng.integers(1, max_prompt + 1)).tolist()
        chosen = rng.integers(0, vocab, rng.integers(1, max_resp + 1)).tolist()
        rejected = rng.integers(0, vocab, rng.integers(1, max_resp + 1)).tolist()
        pairs.append(TokenizedPair(prompt, chosen, rejected))
    batch = collate(pairs, pad_id=0, pad_to=pad_to)
    logits = rng.normal(0.0, 2.0, batch["input_ids"].shape + (vocab,))
    return batch, logits, pairs
