"""Prefix sharing on MLX (orpo_local.batching "prefix" layout): the prompts pass once, each layer's keys and
values are handed to both answers as mlx-lm's KV cache would be. On the tiny Llama the loss, every metric and
every LoRA gradient equal the plain layout's: in float32 to rounding, and in float64 with MLX's fast kernels
replaced by exact ones to 1e-10 (mx.fast's attention and RMSNorm compute in float32 even on float64 inputs).
Both NLL modes, padding, multi-turn prompts, accumulation over micro-batches of two widths, the compiled step,
and train() running the prefix layout by default with the plain layout's losses."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from batches import random_batch  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from orpo_local.backends.mlx_backend import MLXBackend, model_loss, pick_layout, to_mx  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import OrpoConfig  # noqa: E402
from orpo_local.tokenization import TokenizedPair  # noqa: E402
from test_mlx_compile import backend as loaded  # noqa: E402  (the tiny model with LoRA, B randomised)


@pytest.fixture(scope="module")
def backend(tiny):
    b = loaded(tiny, compile=False)
    assert b.layout == "prefix" and loaded(tiny, compile=False, prefix_sharing=False).layout == "plain"
    return b


def multi_turn_pairs(seed: int, n: int = 5) -> list[TokenizedPair]:
    """Pairs whose prompts are several turns long (token runs of 12-60) and answers short, one a 1-token prompt."""
    rng = np.random.default_rng(seed)
    pairs = [TokenizedPair(rng.integers(3, 2000, rng.integers(12, 60)).tolist(), rng.integers(3, 2000, rng.integers(1, 9)).tolist(),
                           rng.integers(3, 2000, rng.integers(1, 9)).tolist()) for _ in range(n)]
    return pairs + [TokenizedPair([5], [6, 7], [8])]


def single_turn_pairs(seed: int) -> list[TokenizedPair]:
    return random_batch(n_pairs=5, vocab=2000, seed=seed, max_prompt=9, max_resp=20)[2]


def window(b: MLXBackend, batches, nll_on_prompt: bool):
    """(LoRA gradients, summed metrics) of one accumulation window, as NumPy / floats."""
    grads, totals, _ = b.window_grads(batches, OrpoConfig(lambda_=0.7, nll_on_prompt=nll_on_prompt))
    return {k: np.array(v) for k, v in tree_flatten(grads)}, {k: v.item() for k, v in totals.items()}


def assert_same(got, want, rtol: float, atol: float):
    (g_got, m_got), (g_want, m_want) = got, want
    assert set(g_got) == set(g_want) and len(g_want) == 28  # 2 layers x 7 projections x (A, B)
    for name in g_want:
        scale = np.abs(g_want[name]).max()
        assert scale > 0, name
        assert np.abs(g_got[name] - g_want[name]).max() <= rtol * scale, name
    assert m_got.keys() == m_want.keys()
    for k in m_want:
        assert m_got[k] == pytest.approx(m_want[k], rel=rtol, abs=atol), k


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("which", ["single-turn", "multi-turn"])
def test_prefix_loss_metrics_and_lora_gradients_equal_the_plain_path(backend, nll_on_prompt, which):
    pairs = single_turn_pairs(11) if which == "single-turn" else multi_turn_pairs(2)
    plain = window(backend, [collate(pairs, 0, 32)], nll_on_prompt)
    prefix = window(backend, [collate(pairs, 0, 32, "prefix")], nll_on_prompt)
    assert_same(prefix, plain, rtol=2e-5, atol=1e-6)  # float32 rounding: measured ~1e-6 of the largest entry


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_prefix_accumulated_micro_batches_equal_one_plain_batch(backend, nll_on_prompt):
    pairs = multi_turn_pairs(7, n=6)
    plain = window(backend, [collate(pairs, 0, 32)], nll_on_prompt)
    accumulated = window(backend, [collate(pairs[:2], 0, 32, "prefix"), collate(pairs[2:], 0, 32, "prefix")], nll_on_prompt)
    assert collate(pairs[:2], 0, 32, "prefix")["prompt_ids"].shape != collate(pairs[2:], 0, 32, "prefix")["prompt_ids"].shape
    assert_same(accumulated, plain, rtol=2e-5, atol=1e-6)


def exact_sdpa(queries, keys, values, *, scale, mask=None, sinks=None, stream=None):
    """mx.fast.scaled_dot_product_attention in the inputs' dtype (grouped heads, "causal" or a bool/additive mask)."""
    b, n_q, length, d = queries.shape
    n_kv = keys.shape[1]
    keys, values = (mx.repeat(a, n_q // n_kv, axis=1) for a in (keys, values))
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = mx.tri(length, keys.shape[2], k=keys.shape[2] - length, dtype=mx.bool_)
    if mask is not None:
        scores = mx.where(mask, scores, -1e300) if mask.dtype == mx.bool_ else scores + mask
    return mx.softmax(scores, axis=-1) @ values


def exact_rms_norm(x, weight, eps, stream=None):
    return x * mx.rsqrt((x * x).mean(-1, keepdims=True) + eps) * weight


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_prefix_path_equals_the_plain_path_in_float64_with_exact_kernels(tiny, monkeypatch, nll_on_prompt):
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", exact_sdpa)
    monkeypatch.setattr(mx.fast, "rms_norm", exact_rms_norm)
    b = loaded(tiny, compile=False)
    b.model.set_dtype(mx.float64)
    pairs = multi_turn_pairs(3, n=4)
    value_and_grad = nn.value_and_grad(b.model, model_loss)

    def run(layout):
        (loss, metrics), grads = value_and_grad(b.model, to_mx(collate(pairs, 0, 32, layout), nll_on_prompt), 0.7, nll_on_prompt, None, None)
        return {k: np.array(v) for k, v in tree_flatten(grads)}, {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}

    plain, prefix = run("plain"), run("prefix")
    assert next(iter(plain[0].values())).dtype == np.float64
    assert_same(prefix, plain, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_the_compiled_prefix_step_equals_the_uncompiled_one(tiny, backend, nll_on_prompt):
    pairs = multi_turn_pairs(5, n=4)
    batches = [collate(pairs[:2], 0, 32, "prefix"), collate(pairs[2:], 0, 32, "prefix")]
    compiled = loaded(tiny, compile=True)
    assert_same(window(compiled, batches, nll_on_prompt), window(backend, batches, nll_on_prompt), rtol=2e-5, atol=1e-6)
    evals = [b.evaluate(batches, OrpoConfig(lambda_=0.7, nll_on_prompt=nll_on_prompt)) for b in (compiled, backend)]
    for k in evals[1]:
        assert evals[0][k] == pytest.approx(evals[1][k], rel=2e-5, abs=1e-6), k


def test_models_the_cache_trick_does_not_fit_keep_the_plain_layout(backend, monkeypatch):
    monkeypatch.setattr(backend.model, "model_type", "gemma2")  # soft-capped logits, another attention
    assert pick_layout(backend.model, True) == "plain"
    monkeypatch.setattr(backend.model, "model_type", "llama")
    monkeypatch.setattr(backend.model.layers[0], "use_sliding", True, raising=False)
    assert pick_layout(backend.model, True) == "plain"


def test_train_runs_the_prefix_layout_by_default_with_the_losses_of_the_plain_layout(tiny, arith, tmp_path):
    from orpo_local import TrainConfig, train
    from orpo_local.runs import read_json, read_metrics

    def run(sharing, folder):
        config = TrainConfig().with_overrides({
            "model.name": str(tiny), "model.backend": "mlx", "model.dtype": "float32", "model.prefix_sharing": sharing,
            "data.path": str(arith), "run.runs_dir": str(tmp_path / folder), "optim.max_steps": 3, "optim.batch_size": 4,
            "run.eval_every": 2, "data.val_min_pairs": 4})
        result = train(config, progress=False)
        return read_json(result.run_dir / "run.json"), read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")

    prefix_info, prefix_steps, prefix_evals = run(True, "prefix")
    plain_info, plain_steps, plain_evals = run(False, "plain")
    assert prefix_info["batch_layout"] == "prefix" and plain_info["batch_layout"] == "plain"
    assert len(prefix_steps) == 3 and len(prefix_evals) >= 2
    for a, b in zip(prefix_steps + prefix_evals, plain_steps + plain_evals, strict=True):
        for k in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=2e-5, abs=1e-6), k
    # the same pairs/s are computed over fewer tokens: each prompt once
    assert sum(s["tokens_per_s"] / s["pairs_per_s"] for s in prefix_steps) < sum(s["tokens_per_s"] / s["pairs_per_s"] for s in plain_steps)


def test_chunked_vocabulary_projection_equals_one_pass_on_values_and_gradients():
    from orpo_local.backends.mlx_backend import head_logps

    mx.random.seed(0)
    head = nn.Linear(16, 1000, bias=False)
    hidden, tokens = mx.random.normal((37, 16)), mx.random.randint(0, 1000, (37,))
    weights = mx.random.normal((37,))

    def run(budget):
        f = lambda h: (head_logps(head, h, tokens, 1000, budget) * weights).sum()  # noqa: E731
        return head_logps(head, hidden, tokens, 1000, budget), mx.grad(f)(hidden)

    (whole, g_whole), (chunked, g_chunked) = run(1 << 30), run(4 * 1000 * 5)  # the second: 5 targets at a time, 8 chunks
    np.testing.assert_allclose(np.array(chunked), np.array(whole), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(g_chunked), np.array(g_whole), rtol=1e-6, atol=1e-7)
    assert float(mx.abs(g_whole).max()) > 0


@pytest.mark.parametrize("layout", ["plain", "prefix"])
def test_a_step_with_the_vocabulary_projection_in_chunks_equals_one_projection(backend, monkeypatch, layout):
    from orpo_local.backends import mlx_backend

    pairs = multi_turn_pairs(9, n=3)
    whole = window(backend, [collate(pairs, 0, 32, layout)], True)
    vocab = backend.model.model.embed_tokens.weight.shape[0]
    monkeypatch.setattr(mlx_backend, "LOGITS_BUDGET", 4 * vocab * 7)  # 7 targets at a time
    assert_same(window(backend, [collate(pairs, 0, 32, layout)], True), whole, rtol=2e-5, atol=1e-6)
