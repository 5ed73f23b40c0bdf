"""Float64 NumPy reference of ORPO_SPEC.md: the judge every backend is tested against.

Inputs are logits (N, T, V) over a batch laid out as orpo_local.batching makes it: N = 2B
rows, chosen first, then rejected; token t is predicted by logits[:, t - 1].

All batch metrics are sums divided by the accumulation window's normalisers
(`num_tokens` NLL tokens, `num_pairs` pairs), so summing them over the micro-batches of a
window gives exactly the one-big-batch value.

`orpo_loss_grad` is the analytic gradient d loss / d logits, checked against finite
differences in test_reference.py and then used to check backend autograd.
"""

from __future__ import annotations

import numpy as np

LN2 = float(np.log(2.0))
CLAMP = -1e-7


def log1mexp(v: np.ndarray) -> np.ndarray:
    """log(1 - exp(v)) for v < 0, stable at both ends (Maechler 2012); v is clamped to <= -1e-7."""
    v = np.minimum(np.asarray(v, dtype=np.float64), CLAMP)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v < -LN2, np.log1p(-np.exp(v)), np.log(-np.expm1(v)))


def log1mexp_grad(v: np.ndarray) -> np.ndarray:
    """d/dv log1mexp(v): -e^v / (1 - e^v) = -1 / expm1(-v) below the clamp, 0 above it (constant there)."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(v < CLAMP, -1.0 / np.expm1(-v), 0.0)


def log_odds(v: np.ndarray) -> np.ndarray:
    """log(P / (1 - P)) with P = exp(v)."""
    return np.asarray(v, dtype=np.float64) - log1mexp(v)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def token_logps(logits: np.ndarray, input_ids: np.ndarray) -> np.ndarray:
    """(N, T-1): log P(input_ids[:, t] | < t) for t = 1..T-1."""
    lsm = log_softmax(logits[:, :-1])
    return np.take_along_axis(lsm, np.asarray(input_ids)[:, 1:, None].astype(np.int64), -1)[..., 0]


def sequence_logps(logits, input_ids, response_mask) -> np.ndarray:
    """(N,): mean log-prob over each row's response tokens."""
    m = np.asarray(response_mask, dtype=np.float64)[:, 1:]
    return (token_logps(logits, input_ids) * m).sum(-1) / m.sum(-1)


def _masks(batch, nll_on_prompt):
    resp = np.asarray(batch["response_mask"], dtype=np.float64)[:, 1:]
    att = np.asarray(batch["attention_mask"], dtype=np.float64)[:, 1:]
    b = resp.shape[0] // 2
    nll_mask = (att if nll_on_prompt else resp)[:b]
    return resp, nll_mask, b


def orpo_loss(logits, batch, lambda_=0.1, nll_on_prompt=False, num_tokens=None, num_pairs=None):
    """(loss, metrics) of ORPO_SPEC.md in float64."""
    tl = token_logps(logits, batch["input_ids"])
    resp, nll_mask, b = _masks(batch, nll_on_prompt)
    n_tok = nll_mask.sum() if num_tokens is None else float(num_tokens)
    n_pairs = b if num_pairs is None else float(num_pairs)

    logps = (tl * resp).sum(-1) / resp.sum(-1)
    c, r = logps[:b], logps[b:]
    nll = -(tl[:b] * nll_mask).sum() / n_tok
    lo = log_odds(c) - log_odds(r)
    log_sig = -np.logaddexp(0.0, -lo)
    or_loss = -log_sig
    loss = nll + lambda_ * or_loss.sum() / n_pairs
    metrics = {
        "loss": loss,
        "nll_loss": nll,
        "or_loss": or_loss.sum() / n_pairs,
        "log_odds_ratio": log_sig.sum() / n_pairs,
        "log_odds_chosen": lo.sum() / n_pairs,
        "logps/chosen": c.sum() / n_pairs,
        "logps/rejected": r.sum() / n_pairs,
        "rewards/chosen": lambda_ * c.sum() / n_pairs,
        "rewards/rejected": lambda_ * r.sum() / n_pairs,
        "rewards/accuracies": (c > r).sum() / n_pairs,
        "rewards/margins": lambda_ * (c - r).sum() / n_pairs,
    }
    return float(loss), {k: float(v) for k, v in metrics.items()}


def orpo_loss_grad(logits, batch, lambda_=0.1, nll_on_prompt=False, num_tokens=None, num_pairs=None) -> np.ndarray:
    """Analytic d loss / d logits, shape (N, T, V), float64."""
    logits = np.asarray(logits, dtype=np.float64)
    ids = np.asarray(batch["input_ids"]).astype(np.int64)
    tl = token_logps(logits, ids)
    resp, nll_mask, b = _masks(batch, nll_on_prompt)
    n_tok = nll_mask.sum() if num_tokens is None else float(num_tokens)
    n_pairs = b if num_pairs is None else float(num_pairs)

    logps = (tl * resp).sum(-1) / resp.sum(-1)
    c, r = logps[:b], logps[b:]
    lo = log_odds(c) - log_odds(r)
    sig = 1.0 / (1.0 + np.exp(-lo))

    def dlog_odds(v):  # d/dv [v - log1mexp(min(v, CLAMP))] = 1/(1 - e^v), or 1 where clamped
        return np.where(v > CLAMP, 1.0, -1.0 / np.expm1(np.minimum(v, CLAMP)))

    d_or = lambda_ / n_pairs * (sig - 1.0)  # d loss / d lo, per pair
    d_logps = np.concatenate([d_or * dlog_odds(c), -d_or * dlog_odds(r)])
    g_tok = d_logps[:, None] * resp / resp.sum(-1, keepdims=True)  # (N, T-1)
    g_tok[:b] -= nll_mask / n_tok

    probs = np.exp(log_softmax(logits[:, :-1]))
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, ids[:, 1:, None], 1.0, -1)
    grad = np.zeros_like(logits)
    grad[:, :-1] = g_tok[..., None] * (onehot - probs)
    return grad


# Test inputs, not part of the judge.

# log1mexp's regimes: the log1p branch (v < -ln 2), both sides of the switch, the expm1 branch,
# just below the clamp, and above it (where v is clamped to -1e-7)
LOG1MEXP_POINTS = [-800.0, -30.0, -5.0, -1.0, -0.6932, -0.6931, -0.5, -0.1, -1e-3, -1e-6, -5e-7, -2e-7, -5e-8, -1e-9, 0.0]


def confident_logits(logits, batch, boost) -> np.ndarray:
    """`logits` with each response target's logit raised by boost[row] (one value per row): a model
    sure of its responses, whose log-probs rise towards 0, past -ln 2 and, boosted enough, past the clamp."""
    z = np.array(logits, dtype=np.float64)
    ids = np.asarray(batch["input_ids"])
    rows, cols = np.nonzero(np.asarray(batch["response_mask"])[:, 1:])
    z[rows, cols, ids[rows, cols + 1]] += np.asarray(boost, dtype=np.float64)[rows]
    return z
