"""The float64 reference itself: hand-worked numbers, limits, and a finite-difference gradient check."""

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest

import reference as ref
from batches import random_batch
from orpo_local.batching import collate
from orpo_local.tokenization import TokenizedPair

LN3 = math.log(3.0)


def hand_batch(prompt_len=1):
    """One pair, vocabulary of 4. Chosen response tokens each get P = 1/2 (target logit ln 3, three
    others 0); rejected response tokens P = 1/4 (all logits 0); prompt targets P = 1/4."""
    prompt = [0] + [3] * (prompt_len - 1)
    batch = collate([TokenizedPair(prompt, [1, 1], [2, 2])], pad_id=0, pad_to=1)
    logits = np.zeros(batch["input_ids"].shape + (4,))
    logits[0, prompt_len - 1: prompt_len + 1, 1] = LN3
    return batch, logits


def test_hand_worked_loss_and_metrics():
    batch, logits = hand_batch()
    loss, m = ref.orpo_loss(logits, batch, lambda_=0.1)
    # logp_w = ln 1/2, logp_l = ln 1/4; odds_w = 1, odds_l = 1/3; log_odds = ln 3
    # L_OR = -ln sigmoid(ln 3) = ln 4/3; L_NLL = ln 2
    assert m["logps/chosen"] == pytest.approx(math.log(0.5), rel=1e-12)
    assert m["logps/rejected"] == pytest.approx(math.log(0.25), rel=1e-12)
    assert m["log_odds_chosen"] == pytest.approx(LN3, rel=1e-12)
    assert m["or_loss"] == pytest.approx(math.log(4 / 3), rel=1e-12)
    assert m["log_odds_ratio"] == pytest.approx(math.log(3 / 4), rel=1e-12)
    assert m["nll_loss"] == pytest.approx(math.log(2), rel=1e-12)
    assert loss == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3), rel=1e-12)
    assert m["rewards/chosen"] == pytest.approx(0.1 * math.log(0.5), rel=1e-12)
    assert m["rewards/margins"] == pytest.approx(0.1 * math.log(2), rel=1e-12)
    assert m["rewards/accuracies"] == 1.0


def test_hand_worked_nll_on_prompt():
    batch, logits = hand_batch(prompt_len=2)
    _, plain = ref.orpo_loss(logits, batch)
    _, with_prompt = ref.orpo_loss(logits, batch, nll_on_prompt=True)
    assert plain["nll_loss"] == pytest.approx(math.log(2), rel=1e-12)
    # targets: one prompt token at P = 1/4, two response tokens at P = 1/2
    assert with_prompt["nll_loss"] == pytest.approx((math.log(4) + 2 * math.log(2)) / 3, rel=1e-12)
    assert with_prompt["or_loss"] == plain["or_loss"]  # the odds ratio never sees the prompt


def _log1mexp_50_digits(v: float) -> float:
    with localcontext() as ctx:
        ctx.prec = 50
        return float((1 - Decimal(v).exp()).ln())


def test_log1mexp_is_accurate_across_the_range_and_finite_at_limits():
    v = np.array([-40.0, -30.0, -5.0, -1.0, -0.7, -0.69, -0.1, -1e-3, -1e-6])
    np.testing.assert_allclose(ref.log1mexp(v), [_log1mexp_50_digits(x) for x in v], rtol=1e-14)
    assert ref.log1mexp(np.array([-1e-20]))[0] == pytest.approx(math.log(1e-7), rel=1e-6)  # clamped
    assert ref.log1mexp(np.array([0.0]))[0] == pytest.approx(math.log(1e-7), rel=1e-6)
    assert ref.log1mexp(np.array([-1000.0]))[0] == 0.0
    # both branches agree at the switch point -ln 2
    a, b = -ref.LN2 - 1e-12, -ref.LN2 + 1e-12
    assert ref.log1mexp(np.array([a]))[0] == pytest.approx(ref.log1mexp(np.array([b]))[0], abs=1e-10)


def _log1mexp_slope_50_digits(v: float) -> float:
    """Central difference of log(1 - e^v) at 50 digits, step 1e-20 |v|: exact to ~1e-40 relative."""
    with localcontext() as ctx:
        ctx.prec = 50
        x, h = Decimal(v), Decimal(v).copy_abs() * Decimal("1e-20")
        return float(((1 - (x + h).exp()).ln() - (1 - (x - h).exp()).ln()) / (2 * h))


def test_log1mexp_grad_is_the_derivative_below_the_clamp_and_zero_above():
    v = np.array([p for p in ref.LOG1MEXP_POINTS if ref.CLAMP > p > -700])  # e^-800 is below float range
    np.testing.assert_allclose(ref.log1mexp_grad(v), [_log1mexp_slope_50_digits(x) for x in v], rtol=1e-14)
    assert ref.log1mexp_grad(np.array([-800.0]))[0] == 0.0  # -e^v / (1 - e^v) underflows, as it should
    assert np.all(ref.log1mexp_grad(np.array([-1e-7, -5e-8, 0.0])) == 0.0)  # clamped: constant


def test_limit_cases_are_finite_and_exact():
    batch, logits = hand_batch()
    # chosen response almost certain (P -> 1): the naive log(1 - exp(logp)) would give -inf
    sure = logits.copy()
    sure[0, 0:2, 1] = 60.0
    loss, m = ref.orpo_loss(sure, batch)
    assert np.isfinite(loss) and all(np.isfinite(list(m.values())))
    assert m["or_loss"] < 1e-6
    # rejected response hopeless (logp ~ -200): log odds -> logp itself
    hopeless = logits.copy()
    hopeless[1, 0:2, 2] = -400.0
    _, m = ref.orpo_loss(hopeless, batch)
    assert np.isfinite(m["loss"]) and m["or_loss"] < 1e-30
    # identical chosen and rejected probabilities: log_odds = 0, L_OR = ln 2, accuracy 0
    same = np.zeros_like(logits)
    _, m = ref.orpo_loss(same, batch)
    assert m["log_odds_chosen"] == 0.0 and m["or_loss"] == pytest.approx(math.log(2), rel=1e-12)
    assert m["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_analytic_gradient_matches_finite_differences(nll_on_prompt):
    batch, logits, _ = random_batch(n_pairs=3, vocab=7, seed=1)
    grad = ref.orpo_loss_grad(logits, batch, lambda_=0.7, nll_on_prompt=nll_on_prompt)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for idx in [tuple(rng.integers(0, s) for s in logits.shape) for _ in range(60)]:
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (ref.orpo_loss(up, batch, 0.7, nll_on_prompt)[0] - ref.orpo_loss(down, batch, 0.7, nll_on_prompt)[0]) / (2 * eps)
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # padding positions and the last column never receive gradient
    pad = batch["attention_mask"] == 0
    assert np.all(grad[pad] == 0.0) and np.all(grad[:, -1] == 0.0)


def test_gradient_stays_finite_and_bounded_where_logp_is_clamped():
    # chosen logp ~ -1e-25 > -1e-7: without the clamp d log_odds / d logp = 1 / (1 - P) ~ 1e25
    batch, logits = hand_batch()
    logits[0, 0:2, 1] = 60.0
    grad = ref.orpo_loss_grad(logits, batch)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() < 1.0
    # ...and just below the clamp the analytic gradient still matches finite differences
    logits[0, 0:2, 1] = 18.0  # logp ~ -4e-8 per token
    grad = ref.orpo_loss_grad(logits, batch)
    eps, idx = 1e-3, (1, 0, 0)
    up, down = logits.copy(), logits.copy()
    up[idx] += eps
    down[idx] -= eps
    fd = (ref.orpo_loss(up, batch)[0] - ref.orpo_loss(down, batch)[0]) / (2 * eps)
    assert grad[idx] == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_accumulation_with_window_normalisers_equals_one_big_batch(nll_on_prompt):
    big, logits, pairs = random_batch(n_pairs=4, vocab=9, seed=3, pad_to=1)
    full_loss, full_m = ref.orpo_loss(logits, big, 0.3, nll_on_prompt)
    key = "attention_mask" if nll_on_prompt else "response_mask"
    n_tok = big[key][:4, 1:].sum()

    total, summed = 0.0, {}
    for part in (pairs[:1], pairs[1:]):  # uneven micro-batches, padded differently
        small = collate(part, pad_id=0, pad_to=1)
        rows = [pairs.index(p) for p in part]
        width = small["input_ids"].shape[1]
        sub = np.concatenate([logits[rows, :width], logits[[4 + r for r in rows], :width]])
        loss, m = ref.orpo_loss(sub, small, 0.3, nll_on_prompt, num_tokens=n_tok, num_pairs=4)
        total += loss
        for k, v in m.items():
            summed[k] = summed.get(k, 0.0) + v
    assert total == pytest.approx(full_loss, rel=1e-12)
    for k, v in full_m.items():
        assert summed[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k
