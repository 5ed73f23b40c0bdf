"""The loss normalisers of an accumulation window, judged from outside.

Each backend's train_step (through backward_window on torch) and evaluate is compared with the
float64 reference on the same model's logits, the window's NLL tokens and pairs counted here from
the pairs themselves. Tests that call orpo_local.backend.window_sizes on both sides of a comparison
cannot see it go wrong (a doubled pair count halves every pair metric on both sides); these can.
LoRA gradients are judged by pulling the reference's d loss / d logits back to the LoRA weights
with the framework's autograd (a vector-Jacobian product through the model, not through the loss).
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import reference as ref  # noqa: E402
from batches import random_batch  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig  # noqa: E402

LAMBDA = 0.3
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
# (first pair, end pair, pad_to) per micro-batch: the five pairs as one batch, or as uneven
# micro-batches of 2 and 3 pairs padded to different widths
WINDOWS = {"one-batch": [(0, 5, 32)], "two-micro-batches": [(0, 2, 8), (2, 5, 16)]}
MODES = {"nll-on-response": False, "nll-on-prompt": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a 256-token vocabulary (the reference's (N, T, V) arrays stay small)
    and the bundled tokenizer, which the backends load but these batches of raw ids never use."""
    from orpo_local.models import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    return tiny_llama(tmp_path_factory.mktemp("tiny256"), vocab_size=256, tokenizer=tok)


@pytest.fixture(scope="module")
def pairs():
    return random_batch(n_pairs=5, vocab=256, seed=9, max_prompt=9, max_resp=12)[2]


def window_of(pairs, window):
    return [collate(pairs[a:b], pad_id=0, pad_to=pad_to) for a, b, pad_to in WINDOWS[window]]


def hand_counts(pairs, nll_on_prompt):
    """(NLL targets, pairs) of a window from the pair lengths. Every chosen response token is a
    target (a prompt holds >= 1 token, so none sits at position 0); with nll_on_prompt every
    chosen-row token but the first is."""
    if nll_on_prompt:
        return sum(len(p.prompt) + len(p.chosen) - 1 for p in pairs), len(pairs)
    return sum(len(p.chosen) for p in pairs), len(pairs)


def reference_window(logits, micro, pairs, nll_on_prompt):
    """Window metrics (summed over micro-batches) and d loss / d logits per micro-batch, float64."""
    n_tok, n_pairs = hand_counts(pairs, nll_on_prompt)
    metrics, dlogits = {}, []
    for z, mb in zip(logits, micro):
        _, m = ref.orpo_loss(z, mb, LAMBDA, nll_on_prompt, num_tokens=n_tok, num_pairs=n_pairs)
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
        dlogits.append(ref.orpo_loss_grad(z, mb, LAMBDA, nll_on_prompt, num_tokens=n_tok, num_pairs=n_pairs))
    # with every pair won (or lost) a wrong pair count would still give accuracy 1 (or 0) x share
    assert 0 < metrics["rewards/accuracies"] < 1, "the pairs must have both outcomes for the accuracy to tell"
    metrics["tokens"] = float(sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs))
    return metrics, dlogits


def assert_metrics(got, want, rel):
    # differences of near-equal log-probs (log odds, margins) are judged against the log-probs' size
    scale = rel * abs(want["logps/chosen"])
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rel, abs=scale), k


# ----------------------------------------------------------------------------- torch, float64

def torch_backend(model_dir):
    """TorchBackend on the tiny model in float64 (so only a wrong normaliser could move a number),
    LoRA B randomised: peft starts it at zero, which would leave A without gradient."""
    from orpo_local.backends.torch_backend import TorchBackend

    tb = TorchBackend()
    tb.load(ModelConfig(name=str(model_dir), dtype="float32"), LORA, 0)
    tb.model.double()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return tb


def torch_lora(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def torch_reference(model, micro, pairs, nll_on_prompt):
    """Reference metrics and LoRA gradients {name: array} for the model as it is now."""
    batches = [{k: torch.from_numpy(v) for k, v in mb.items()} for mb in micro]
    logits = [model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"]).logits for b in batches]
    metrics, dlogits = reference_window([z.detach().numpy() for z in logits], micro, pairs, nll_on_prompt)
    lora = torch_lora(model)
    grads = torch.autograd.grad(logits, list(lora.values()), [torch.from_numpy(g) for g in dlogits])
    return metrics, {name: g.numpy() for name, g in zip(lora, grads)}


def torch_spy(backend):
    """A list that receives the gradients train_step hands the optimiser, {name: array} per step."""
    seen, lora = [], torch_lora(backend.model)

    def spy(optimizer, args, kwargs):
        seen.append({k: p.grad.numpy().copy() for k, p in lora.items()})

    backend.optimizer.register_step_pre_hook(spy)
    return seen


# ----------------------------------------------------------------------------- MLX, float32

def mlx_backend(model_dir):
    """MLXBackend on the tiny model in float32 (its only CPU dtype), LoRA B randomised."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from orpo_local.backends.mlx_backend import MLXBackend

    backend = MLXBackend()
    backend.load(ModelConfig(name=str(model_dir), dtype="float32"), LORA, 0)
    mx.random.seed(1)
    b_weights = [(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(backend.model.trainable_parameters())
                 if k.endswith("lora_b")]
    assert b_weights
    backend.model.load_weights(b_weights, strict=False)
    return backend


def mlx_reference(model, micro, pairs, nll_on_prompt):
    """Reference metrics and LoRA gradients (float32 pull-back of the float64 d loss / d logits)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    ids = [mx.array(mb["input_ids"]) for mb in micro]
    logits = [np.array(model(x), dtype=np.float64) for x in ids]
    metrics, dlogits = reference_window(logits, micro, pairs, nll_on_prompt)
    pull_back = nn.value_and_grad(model, lambda m, x, cotangent: (m(x) * cotangent).sum())
    grads = {}
    for x, g in zip(ids, dlogits):
        for k, v in tree_flatten(pull_back(model, x, mx.array(g.astype(np.float32)))[1]):
            grads[k] = grads.get(k, 0.0) + np.array(v, dtype=np.float64)
    return metrics, grads


def mlx_spy(backend):
    """A list that receives the gradients train_step hands the optimiser, {name: array} per step."""
    from mlx.utils import tree_flatten

    seen, update = [], backend.optimizer.update

    def spy(model, grads):
        seen.append({k: np.array(v, dtype=np.float64) for k, v in tree_flatten(grads)})
        update(model, grads)

    backend.optimizer.update = spy
    return seen


@dataclass
class Side:
    """One backend under test: how to load it, judge it, see its gradients, and how close it must be."""

    load: Callable
    reference: Callable
    spy: Callable
    rel: float  # metrics and grad_norm, relative
    grad_rtol: float
    grad_atol: float


# torch in float64 leaves only rounding. MLX runs float32: measured within 1.4e-7 relative on the
# metrics and grad_norm, 2e-8 absolute on gradients whose largest entry is 5e-2
SIDES = {"torch": Side(torch_backend, torch_reference, torch_spy, 1e-9, 1e-9, 1e-13),
         "mlx": Side(mlx_backend, mlx_reference, mlx_spy, 1e-6, 1e-4, 1e-7)}


# ----------------------------------------------------------------------------- the tests

CASES = [pytest.param(side, window, nll, id=f"{side}-{window}-{mode}") for side in SIDES for window in WINDOWS
         for mode, nll in MODES.items()]


def judged(model_dir, pairs, side, window, nll_on_prompt):
    """(backend, its window of micro-batches, reference metrics, reference LoRA gradients, OrpoConfig)."""
    backend = SIDES[side].load(model_dir)
    micro = window_of(pairs, window)
    want, want_grads = SIDES[side].reference(backend.model, micro, pairs, nll_on_prompt)
    return backend, micro, want, want_grads, OrpoConfig(lambda_=LAMBDA, nll_on_prompt=nll_on_prompt)


@pytest.mark.parametrize("side, window, nll_on_prompt", CASES)
def test_train_step_matches_the_reference_with_hand_counted_normalisers(model_dir, pairs, side, window, nll_on_prompt):
    backend, micro, want, want_grads, orpo = judged(model_dir, pairs, side, window, nll_on_prompt)
    backend.init_optimizer(OptimConfig())
    seen = SIDES[side].spy(backend)
    got = backend.train_step(micro, 1e-3, orpo, max_grad_norm=0.0)
    tol = SIDES[side]  # how close this backend must be
    assert_metrics(got, want, tol.rel)
    assert len(seen) == 1 and seen[0].keys() == want_grads.keys()  # one step, unclipped, every LoRA weight
    for k, w in want_grads.items():
        np.testing.assert_allclose(seen[0][k], w, rtol=tol.grad_rtol, atol=tol.grad_atol, err_msg=k)
    want_norm = np.sqrt(sum((w ** 2).sum() for w in want_grads.values()))
    assert got["grad_norm"] == pytest.approx(want_norm, rel=tol.rel)


@pytest.mark.parametrize("side, window, nll_on_prompt", CASES)
def test_evaluate_matches_the_reference_with_hand_counted_normalisers(model_dir, pairs, side, window, nll_on_prompt):
    backend, micro, want, _, orpo = judged(model_dir, pairs, side, window, nll_on_prompt)
    want.pop("tokens")  # evaluate reports no throughput
    got = backend.evaluate(micro, orpo)
    assert got.keys() == want.keys()
    assert_metrics(got, want, SIDES[side].rel)
