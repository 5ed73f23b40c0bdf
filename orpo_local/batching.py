"""Length-bucketed, padded NumPy batches of preference pairs (backends convert them), in one of
two layouts; a backend names the one it consumes (`backend.layout`).

"plain": a batch of B pairs holds 2B rows, the B chosen sequences, then the B rejected ones, so
one forward pass serves both (as TRL's `concatenated_forward` does):

    input_ids      (2B, T) int32  prompt + response, right-padded with pad_id
    attention_mask (2B, T) int32  1 on real tokens
    response_mask  (2B, T) int32  1 on response tokens (the ORPO targets, end-of-turn included)

Token t is predicted by the logits at t - 1, so the loss reads the masks from column 1 on.

"shared" (prefix sharing): one row per pair, [prompt][chosen][rejected], so each prompt is
computed once. The rejected answer's positions restart where the prompt ends, and
`shared_attention` lets it see the prompt but not the chosen answer, so every log-prob equals
the plain layout's:

    input_ids    (B, T) int32  prompt + chosen + rejected, right-padded with pad_id
    position_ids (B, T) int32  0..P-1, P..P+C-1, P..P+R-1, then 0 on padding
    segment      (B, T) int8   0 padding, 1 prompt, 2 chosen, 3 rejected
    prev         (B, T) int32  the position whose output predicts token t: t - 1, except the
                               rejected answer's first token, predicted by the prompt's last (P - 1)

"prefix" (prefix sharing through the attention cache, for models that take no position ids or
mask, as mlx-lm's): the prompts once, then both answers, which attend to the prompts' keys and values
(the backend keeps them as a model's KV cache does, with gradients flowing through them):

    prompt_ids (B, P)  int32  the prompts, right-padded
    prompt_len (B,)    int32
    answer_ids (2B, A) int32  the B chosen answers, then the B rejected ones, right-padded
    answer_len (2B,)   int32  (answer row i answers prompt i mod B; its positions start at prompt_len)

`prefix_targets` lists what the loss reads as indices into the (B*P + 2B*A) hidden states of the
two passes, flattened prompts first.

T (P, A) is rounded up to a multiple of `pad_to` so compiled shapes repeat (mlx-lm does the same).

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


PAD, PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3
LAYOUTS = ("plain", "shared", "prefix")


def collate(pairs: list[TokenizedPair], pad_id: int, pad_to: int = 32, layout: str = "plain") -> dict[str, np.ndarray]:
    if layout == "shared":
        return collate_shared(pairs, pad_id, pad_to)
    if layout == "prefix":
        return collate_prefix(pairs, pad_id, pad_to)
    if layout != "plain":
        raise ValueError(f"unknown batch layout {layout!r}; use one of {', '.join(LAYOUTS)}")
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


def collate_shared(pairs: list[TokenizedPair], pad_id: int, pad_to: int = 32) -> dict[str, np.ndarray]:
    """One [prompt][chosen][rejected] row per pair (the "shared" layout above)."""
    longest = max(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    width = -(-longest // pad_to) * pad_to
    input_ids = np.full((len(pairs), width), pad_id, dtype=np.int32)
    position_ids = np.zeros((len(pairs), width), dtype=np.int32)
    segment = np.zeros((len(pairs), width), dtype=np.int8)
    prev = np.tile(np.arange(-1, width - 1, dtype=np.int32), (len(pairs), 1))
    for row, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt), len(p.chosen), len(p.rejected)
        end = n_p + n_c + n_r
        input_ids[row, :end] = p.prompt + p.chosen + p.rejected
        position_ids[row, :end] = np.r_[np.arange(n_p + n_c), np.arange(n_p, n_p + n_r)]
        segment[row, :n_p], segment[row, n_p:n_p + n_c], segment[row, n_p + n_c:end] = PROMPT, CHOSEN, REJECTED
        prev[row, n_p + n_c] = n_p - 1
    return {"input_ids": input_ids, "position_ids": position_ids, "segment": segment, "prev": prev}


def _padded(rows: list[list[int]], pad_id: int, pad_to: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows right-padded to a multiple of pad_to, their lengths)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    out = np.full((len(rows), -(-int(lengths.max()) // pad_to) * pad_to), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, lengths


def collate_prefix(pairs: list[TokenizedPair], pad_id: int, pad_to: int = 32) -> dict[str, np.ndarray]:
    """The prompts once and the answers beside them (the "prefix" layout above)."""
    prompt_ids, prompt_len = _padded([p.prompt for p in pairs], pad_id, pad_to)
    answer_ids, answer_len = _padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, pad_to)
    return {"prompt_ids": prompt_ids, "prompt_len": prompt_len, "answer_ids": answer_ids, "answer_len": answer_len}


def prefix_targets(batch: dict[str, np.ndarray], nll_on_prompt: bool) -> dict[str, np.ndarray]:
    """Of the "prefix" layout, the (K,) targets the loss reads: `src`, the flat index of the hidden state that
    predicts each (prompts' (B, P) first, then answers' (2B, A)); `token`, the id it predicts; `row`, the answer
    row it counts for (a prompt token: its pair's chosen row); `segment`, CHOSEN or REJECTED for answer tokens,
    PROMPT for the prompt tokens the NLL reads with nll_on_prompt (from each prompt's second token)."""
    (b, width_p), width_a = batch["prompt_ids"].shape, batch["answer_ids"].shape[1]
    src, token, row, segment = [], [], [], []
    for i, n in enumerate(batch["answer_len"]):
        pair = i % b
        src.append(np.r_[pair * width_p + batch["prompt_len"][pair] - 1, b * width_p + i * width_a + np.arange(n - 1)])
        token.append(batch["answer_ids"][i, :n])
        row.append(np.full(n, i))
        segment.append(np.full(n, CHOSEN if i < b else REJECTED))
    if nll_on_prompt:
        for pair, n in enumerate(batch["prompt_len"]):
            src.append(pair * width_p + np.arange(n - 1))
            token.append(batch["prompt_ids"][pair, 1:n])
            row.append(np.full(n - 1, pair))
            segment.append(np.full(n - 1, PROMPT))
    return {"src": np.concatenate(src).astype(np.int32), "token": np.concatenate(token).astype(np.int32),
            "row": np.concatenate(row).astype(np.int32), "segment": np.concatenate(segment).astype(np.int8)}


def shared_attention(segment: np.ndarray) -> np.ndarray:
    """(B, T, T) bool: may query i attend to key j? Causal within each segment, and both answers see the
    whole prompt; padding sees only padding (so no row of the softmax is empty)."""
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    width = segment.shape[1]
    causal = np.tri(width, dtype=bool)[None]
    return (causal & (seg_q == seg_k)) | ((seg_k == PROMPT) & (seg_q >= CHOSEN))


def target_masks(batch: dict[str, np.ndarray], nll_on_prompt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the "shared" layout, (chosen, rejected, nll) target masks (B, T) bool: token t is a target predicted
    by the output at prev[t]. The NLL reads the chosen answer, and with nll_on_prompt the prompt from its second token."""
    seg = batch["segment"]
    chosen, rejected = seg == CHOSEN, seg == REJECTED
    nll = chosen | ((seg == PROMPT) & (batch["prev"] >= 0)) if nll_on_prompt else chosen
    return chosen, rejected, nll


def iterate_batches(
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_id: int,
    seed: int,
    start: int = 0,
    pad_to: int = 32,
    loop: bool = True,
    layout: str = "plain",
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
        yield k, collate([pairs[j] for j in batches[order[i]]], pad_id, pad_to, layout)
        k += 1
