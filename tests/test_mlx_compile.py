"""The compiled MLX step (mx.compile, captured as mlx-lm captures its own) against the plain one, on the
tiny Llama in float32: the same loss, metrics, LoRA gradients and trained LoRA weights, with accumulation
over micro-batches of two widths, both NLL targets, clipping and LoRA dropout; a graph traced once per
batch shape and then reused; the non-finite guard; the switch that turns compiling off."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from batches import random_batch  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from orpo_local.backends import mlx_backend  # noqa: E402
from orpo_local.backends.mlx_backend import COMPILE_ENV, TARGET_BUCKETS, MLXBackend, to_mx  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig  # noqa: E402

# float32 rounding only: compiled kernels fuse elementwise ops, and the compiled path projects a padded
# target list (more rows in the head's matmul); measured differences are ~1e-7 relative
RTOL, ATOL = 1e-5, 1e-6


def backend(tiny, compile: bool, dropout: float = 0.0, prefix_sharing: bool = True) -> MLXBackend:
    """The tiny model with LoRA in float32, B randomised (so A gets gradients too), AdamW ready."""
    b = MLXBackend(compile=compile)
    b.load(ModelConfig(name=str(tiny), dtype="float32", prefix_sharing=prefix_sharing), LoraConfig(rank=4, dropout=dropout), 0)
    rng = np.random.default_rng(1)
    b.model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                          for k, v in tree_flatten(b.model.trainable_parameters()) if k.endswith("lora_b")], strict=False)
    b.init_optimizer(OptimConfig())
    return b


@pytest.fixture(scope="module")
def short():
    _, _, pairs = random_batch(n_pairs=2, vocab=256, seed=3, max_prompt=9, max_resp=12)
    batch = collate(pairs, 0, pad_to=MLXBackend.pad_to)
    assert batch["input_ids"].shape == (4, 32)
    return batch


@pytest.fixture(scope="module")
def long():
    _, _, pairs = random_batch(n_pairs=3, vocab=256, seed=4, max_prompt=30, max_resp=30)
    batch = collate(pairs, 0, pad_to=MLXBackend.pad_to)
    assert batch["input_ids"].shape == (6, 64)  # another padded width than short's
    return batch


def lora(b: MLXBackend) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(b.model.trainable_parameters())}


def assert_same_metrics(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=RTOL, abs=ATOL), k


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_compiled_window_gradient_and_eval_metrics_equal_the_plain_ones(tiny, short, long, nll_on_prompt):
    fast, plain = backend(tiny, True), backend(tiny, False)
    orpo = OrpoConfig(lambda_=0.3, nll_on_prompt=nll_on_prompt)
    g_fast, m_fast, tok_fast = fast.window_grads([short, long], orpo)
    g_plain, m_plain, tok_plain = plain.window_grads([short, long], orpo)
    assert tok_fast == tok_plain
    assert_same_metrics({k: v.item() for k, v in m_fast.items()}, {k: v.item() for k, v in m_plain.items()})
    g_fast, g_plain = dict(tree_flatten(g_fast)), dict(tree_flatten(g_plain))
    assert g_fast.keys() == g_plain.keys() and len(g_plain) == 28  # 2 layers x 7 projections x (A, B)
    for k, want in g_plain.items():
        assert np.abs(np.array(want)).max() > 0, k
        np.testing.assert_allclose(np.array(g_fast[k]), np.array(want), rtol=RTOL, atol=ATOL, err_msg=k)
    assert_same_metrics(fast.evaluate([short, long], orpo), plain.evaluate([short, long], orpo))


@pytest.mark.parametrize("nll_on_prompt, dropout", [(False, 0.0), (True, 0.1)])
def test_compiled_steps_train_the_same_lora_weights(tiny, short, long, nll_on_prompt, dropout):
    fast, plain = backend(tiny, True, dropout), backend(tiny, False, dropout)
    start = lora(plain)
    orpo = OrpoConfig(lambda_=0.3, nll_on_prompt=nll_on_prompt)
    # accumulation over two widths with clipping, no clipping, and a window reusing the first graph
    schedule = [([short, long], 0.5), ([long], 0.0), ([short], 1.0)]
    for step, (window, max_norm) in enumerate(schedule):
        got, want = fast.train_step(window, 1e-3, orpo, max_norm), plain.train_step(window, 1e-3, orpo, max_norm)
        assert_same_metrics(got, want)
        if step == 0:
            assert want["grad_norm"] > 0.5  # the clip is really applied
    after = lora(plain)
    for k, want in after.items():
        assert np.abs(want - start[k]).max() > 1e-4, k
        np.testing.assert_allclose(lora(fast)[k], want, rtol=RTOL, atol=ATOL, err_msg=k)
    if dropout:  # dropout really draws: another seed, another loss (and the same in both paths)
        losses = []
        for b in (fast, plain):
            for seed in (0, 1):
                mx.random.seed(seed)
                losses.append(b.window_grads([short], orpo)[1]["loss"].item())
        assert losses[0] != pytest.approx(losses[1], rel=1e-4)
        assert losses[2:] == pytest.approx(losses[:2], rel=RTOL, abs=ATOL)


def test_a_batch_shape_is_traced_once_then_reused(tiny, short, long, monkeypatch):
    traces = []
    real = mlx_backend.model_token_logps

    def spy(model, batch):  # Python runs only while MLX traces, once the graph is compiled
        traces.append(batch["input_ids"].shape)
        return real(model, batch)

    monkeypatch.setattr(mlx_backend, "model_token_logps", spy)
    fast = backend(tiny, True)
    other = {**short, "input_ids": (short["input_ids"] + 7) % 256}  # the same shapes and targets, other tokens
    orpo = OrpoConfig()
    fast.train_step([short], 1e-3, orpo, 1.0)
    assert traces == [(4, 32)]
    fast.train_step([other], 1e-3, orpo, 1.0)
    fast.train_step([other, short], 1e-3, orpo, 1.0)  # other window normalisers: inputs, not constants
    assert traces == [(4, 32)]
    fast.train_step([long], 1e-3, orpo, 1.0)
    assert traces == [(4, 32), (6, 64)]
    fast.evaluate([short], orpo)
    fast.evaluate([other], orpo)
    assert traces == [(4, 32), (6, 64), (4, 32)]  # eval mode is its own graph, then reused too

    plain = backend(tiny, False)
    traces.clear()
    plain.train_step([short], 1e-3, orpo, 1.0)
    plain.train_step([other], 1e-3, orpo, 1.0)
    assert len(traces) == 2  # the spy does see every uncompiled call


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_bucketed_targets_pad_to_an_eighth_of_the_grid(long, nll_on_prompt):
    plain, padded = to_mx(long, nll_on_prompt), to_mx(long, nll_on_prompt, bucket_targets=True)
    grid = 6 * 63
    step = -(-grid // TARGET_BUCKETS)
    n, size = plain["targets"].size, padded["targets"].size
    assert size % step == 0 and n <= size < n + step
    mask = np.array(padded["target_mask"])
    assert mask.sum() == n and mask[:n].all()
    np.testing.assert_array_equal(np.array(padded["targets"])[:n], np.array(plain["targets"]))


def test_a_non_finite_loss_skips_the_update_on_the_compiled_path(tiny, short):
    fast = backend(tiny, True)
    name = next(k for k in lora(fast) if k.endswith("lora_b"))
    fast.model.load_weights([(name, mx.full(lora(fast)[name].shape, float("nan")))], strict=False)
    before = lora(fast)
    out = fast.train_step([short], 1e-3, OrpoConfig(), 1.0)
    assert not np.isfinite(out["loss"])
    after = lora(fast)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # NaN == NaN here
    assert fast.optimizer.step.item() == 0 and fast.steps == 1


def test_compiling_is_on_by_default_and_off_with_the_switch(monkeypatch):
    from orpo_local.backends import get_backend

    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert MLXBackend().compile and get_backend("mlx").compile
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert not MLXBackend().compile and MLXBackend(compile=True).compile
