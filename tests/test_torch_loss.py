"""Torch backend math against the float64 reference: values and gradients, both NLL modes,
padding, bf16 tolerance, and gradient accumulation equal to one big batch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import reference as ref  # noqa: E402
from batches import random_batch  # noqa: E402
from orpo_local.backends.torch_backend import (_selective_parts, backward_window, log1mexp, model_token_logps,  # noqa: E402
                                               orpo_loss, orpo_loss_from_token_logps, sequence_logps, token_logps)
from orpo_local.batching import collate  # noqa: E402
from orpo_local.tokenization import TokenizedPair  # noqa: E402


def as_torch(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float64_values_and_gradients_match_reference(nll_on_prompt, seed):
    batch, logits, _ = random_batch(n_pairs=3, vocab=13, seed=seed)
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss, metrics = orpo_loss(x, as_torch(batch), 0.37, nll_on_prompt)
    loss.backward()
    want_loss, want = ref.orpo_loss(logits, batch, 0.37, nll_on_prompt)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    for k, v in want.items():
        assert float(metrics[k]) == pytest.approx(v, rel=1e-6, abs=1e-12), k
    np.testing.assert_allclose(x.grad.numpy(), ref.orpo_loss_grad(logits, batch, 0.37, nll_on_prompt), rtol=1e-6, atol=1e-12)
    seq = sequence_logps(x.detach(), torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["response_mask"]))
    np.testing.assert_allclose(seq.numpy(), ref.sequence_logps(logits, batch["input_ids"], batch["response_mask"]), rtol=1e-9)


def test_log1mexp_is_finite_with_finite_gradients_at_the_limits():
    v = torch.tensor([-800.0, -30.0, -0.6931, -0.6932, -1e-3, -1e-9, 0.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(v)
    y.sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), ref.log1mexp(v.detach().numpy()), rtol=1e-12)
    assert torch.isfinite(v.grad).all()


def test_bf16_logits_stay_within_the_documented_tolerance():
    # bf16 has an 8-bit mantissa: logits are rounded by up to 2^-9 relative before the float32 loss.
    # Documented tolerance: loss within 2e-2 relative, gradients within 5e-2 of the largest entry.
    batch, logits, _ = random_batch(n_pairs=4, vocab=64, seed=5)
    x = torch.tensor(logits, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = orpo_loss(x, as_torch(batch), 0.1)
    loss.backward()
    assert loss.dtype == torch.float32  # the loss itself is float32
    want_loss, _ = ref.orpo_loss(logits, batch, 0.1)
    assert float(loss) == pytest.approx(want_loss, rel=2e-2)
    want_grad = ref.orpo_loss_grad(logits, batch, 0.1)
    assert np.abs(x.grad.float().numpy() - want_grad).max() <= 5e-2 * np.abs(want_grad).max()


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_accumulated_micro_batches_give_the_gradients_of_one_big_batch(tmp_path, nll_on_prompt):
    from transformers import AutoModelForCausalLM
    from tiny import tiny_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path), dtype=torch.float64)
    _, _, pairs = random_batch(n_pairs=5, vocab=256, seed=9, max_prompt=9, max_resp=12)

    def grads(micro):
        model.zero_grad()
        metrics = backward_window(model, micro, 0.5, nll_on_prompt, "cpu")
        return [p.grad.clone() for p in model.parameters()], metrics

    big_g, big_m = grads([collate(pairs, pad_id=0, pad_to=32)])
    acc_g, acc_m = grads([collate(pairs[:2], pad_id=0, pad_to=8), collate(pairs[2:], pad_id=0, pad_to=16)])
    for a, b in zip(big_g, acc_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for k in big_m:
        if k != "tokens":
            assert acc_m[k] == pytest.approx(big_m[k], rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_vocabulary_projection_only_at_targets_equals_the_full_logits_path(tmp_path, nll_on_prompt):
    from transformers import AutoModelForCausalLM
    from tiny import tiny_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path), dtype=torch.float64)
    assert _selective_parts(model) is not None  # the fast path is really taken
    _, _, pairs = random_batch(n_pairs=3, vocab=256, seed=4, max_prompt=9, max_resp=7)
    batch = as_torch(collate(pairs, pad_id=0, pad_to=8))

    def run(fast):
        model.zero_grad()
        if fast:
            tl = model_token_logps(model, batch, nll_on_prompt)
            loss, m = orpo_loss_from_token_logps(tl, batch, 0.4, nll_on_prompt)
        else:
            logits = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"]).logits
            loss, m = orpo_loss(logits, batch, 0.4, nll_on_prompt)
        loss.backward()
        return float(loss), {k: float(v) for k, v in m.items()}, [p.grad.clone() for p in model.parameters()]

    fast, slow = run(True), run(False)
    assert fast[0] == pytest.approx(slow[0], rel=1e-12)
    for k in slow[1]:
        assert fast[1][k] == pytest.approx(slow[1][k], rel=1e-10, abs=1e-14), k
    for a, b in zip(fast[2], slow[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_models_with_scaled_logits_keep_the_full_forward_pass(tmp_path):
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, logits_scaling=8.0)
    model = GraniteForCausalLM(cfg).double()
    assert _selective_parts(model) is None
    batch = as_torch(collate([TokenizedPair([1, 2, 3], [4, 5], [6])], pad_id=0, pad_to=8))
    tl = model_token_logps(model, batch, False)
    full = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(tl, token_logps(full, batch["input_ids"]))
