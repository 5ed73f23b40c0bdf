"""Length-bucketed, padded NumPy batches of preference pairs (backends convert them).

A batch of B pairs holds 2B rows: the B chosen sequences, then the B rejected ones, so one
forward pass serves both (as TRL's `concatenated_forward` does):

    input_ids      (2B, T) int32  prompt + response, right-padded with pad_id
    attention_mask (2B, T) int32  1 on real tokens
    response_mask  (2B, T) int32  1 on response tokens (the ORPO targets, end-of-turn included)

Token t is predicted by the logits at t - 1, so the loss reads the masks from column 1 on.
T is rounded up to a multiple of `pad_to` so compiled shapes repeat (mlx-lm does the same).

Pairs are sorted by length and cut into batches once; each epoch visits those batches in a
seeded order, so batch k of a run is a pure function of (pairs, seed, k): resuming at a
step needs only k.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .tokenization import TokenizedPair


def bucket(pairs: list[TokenizedPair], batch_size: int) -> list[list[int]]:
    """Indices of pairs grouped into batches of similar length (the last may be smaller)."""
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_order(n_batches: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_batches)


def collate(pairs: list[TokenizedPair], pad_id: int, pad_to: int = 32) -> dict[str, np.ndarray]:
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    longest = max(len(a) + len(b) for a, b in seqs)
    width = -(-longest // pad_to) * pad_to
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(seqs), width), dtype=np.int32)
    response_mask = np.zeros((len(seqs), width), dtype=np.int32)
    for row, (prompt, response) in enumerate(seqs):
        n_p, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = prompt + response
        attention_mask[row, :n] = 1
        response_mask[row, n_p:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def iterate_batches(
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_id: int,
    seed: int,
    start: int = 0,
    pad_to: int = 32,
    loop: bool = True,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (k, batch) for k = start, start + 1, ...; epoch = k // batches_per_epoch."""
    if not pairs:
        raise ValueError("no pairs to batch")
    batches = bucket(pairs, batch_size)
    k = start
    while True:
        epoch, i = divmod(k, len(batches))
        if not loop and epoch > 0:
            return
        order = epoch_order(len(batches), seed, epoch)
        yield k, collate([pairs[j] for j in batches[order[i]]], pad_id, pad_to)
        k += 1
