"""MLX backend (on MLX's CPU device here): reference values and gradients, accumulation,
parity with the torch backend on the same weights and LoRA, resume, 4-bit QLoRA, and adapters
that mlx-lm loads by itself."""

import threading

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")

import reference as ref  # noqa: E402
from batches import random_batch  # noqa: E402
from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.backends.mlx_backend import MLXBackend, log1mexp, orpo_loss, sequence_logps, to_mx, token_logps  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OrpoConfig  # noqa: E402
from orpo_local.events import Step  # noqa: E402
from orpo_local.models import load_tokenizer  # noqa: E402
from orpo_local.runs import read_json, read_metrics  # noqa: E402
from orpo_local.tokenization import tokenize_pairs  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_float64_values_and_gradients_match_reference(nll_on_prompt, seed):
    batch, logits, _ = random_batch(n_pairs=3, vocab=13, seed=seed)
    mb = to_mx(batch)
    x = mx.array(logits, dtype=mx.float64)
    (loss, metrics), grad = mx.value_and_grad(lambda z: orpo_loss(z, mb, 0.37, nll_on_prompt))(x)
    want_loss, want = ref.orpo_loss(logits, batch, 0.37, nll_on_prompt)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-12), k
    np.testing.assert_allclose(np.array(grad), ref.orpo_loss_grad(logits, batch, 0.37, nll_on_prompt), rtol=1e-6, atol=1e-12)
    seq = sequence_logps(x, mb["input_ids"], mb["response_mask"])
    np.testing.assert_allclose(np.array(seq), ref.sequence_logps(logits, batch["input_ids"], batch["response_mask"]), rtol=1e-6)


# MLX's exp is accurate to ~1.2e-6 relative at v = -30, in float64 too
@pytest.mark.parametrize("dtype", [mx.float64, mx.float32], ids=["float64", "float32"])
def test_log1mexp_values_and_gradient_match_the_analytic_derivative(dtype):
    v = mx.array(ref.LOG1MEXP_POINTS, dtype=dtype)
    g = mx.grad(lambda z: log1mexp(z).sum())(v)
    at = np.array(v.astype(mx.float64))  # the points as `dtype` holds them
    np.testing.assert_allclose(np.array(log1mexp(v).astype(mx.float64)), ref.log1mexp(at), rtol=2e-6, atol=0)
    # d/dv log(1 - e^v) = -e^v / (1 - e^v) on both branches, 0 where v is clamped
    np.testing.assert_allclose(np.array(g.astype(mx.float64)), ref.log1mexp_grad(at), rtol=2e-6, atol=0)


def test_confident_model_above_minus_ln2_and_past_the_clamp_matches_reference():
    # the torch twin's case: logps above -ln 2 everywhere, one chosen row past the clamp, one pair lost
    batch, logits, _ = random_batch(n_pairs=3, vocab=13, seed=0)
    logits = ref.confident_logits(logits, batch, [9.0, 6.0, 40.0, 7.0, 10.0, 8.0])
    mb = to_mx(batch)
    (loss, metrics), grad = mx.value_and_grad(lambda z: orpo_loss(z, mb, 0.37))(mx.array(logits, dtype=mx.float64))
    want_loss, want = ref.orpo_loss(logits, batch, 0.37)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k
    np.testing.assert_allclose(np.array(grad), ref.orpo_loss_grad(logits, batch, 0.37), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_bf16_logits_get_float32_loss_math(seed, nll_on_prompt):
    # as the torch twin: judged on the logits exactly as bf16 holds them, float32 math is within
    # 1.8e-7 relative (measured), a bf16 log-softmax ~1e-3 off; the gradient is bf16, 2^-8 relative per entry
    batch, logits, _ = random_batch(n_pairs=4, vocab=64, seed=seed)
    mb = to_mx(batch)
    x = mx.array(logits).astype(mx.bfloat16)
    held = np.array(x.astype(mx.float64))
    tl = token_logps(x, mb["input_ids"])
    (loss, metrics), grad = mx.value_and_grad(lambda z: orpo_loss(z, mb, 0.1, nll_on_prompt))(x)
    assert tl.dtype == mx.float32 and loss.dtype == mx.float32 and grad.dtype == mx.bfloat16
    assert all(v.dtype == mx.float32 for v in metrics.values())
    np.testing.assert_allclose(np.array(tl), ref.token_logps(held, batch["input_ids"]), rtol=1e-6, atol=1e-6)
    want_loss, want = ref.orpo_loss(held, batch, 0.1, nll_on_prompt)
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k
    want_grad = ref.orpo_loss_grad(held, batch, 0.1, nll_on_prompt)
    np.testing.assert_allclose(np.array(grad.astype(mx.float64)), want_grad, rtol=4e-3, atol=1e-12)


def test_a_bf16_model_gets_float32_token_logps(tok, tmp_path):
    from orpo_local.backends.mlx_backend import _head, model_token_logps
    from tiny import tiny_llama

    backend = MLXBackend()  # a 256-token vocabulary keeps float32's logsumexp error near 1e-7
    backend.load(ModelConfig(name=str(tiny_llama(tmp_path, tokenizer=tok)), dtype="bfloat16"), None, 0)
    _, _, pairs = random_batch(n_pairs=3, vocab=256, seed=4, max_prompt=9, max_resp=7)
    batch = to_mx(collate(pairs, 0, pad_to=8), True)
    tl = model_token_logps(backend.model, batch)
    # the head's bf16 logits at the targets, made as model_token_logps makes them, read by the reference
    decoder, head = _head(backend.model)
    hidden = decoder(batch["input_ids"])[:, :-1]
    logits = head(hidden.reshape(-1, hidden.shape[-1])[batch["targets"]])
    assert logits.dtype == mx.bfloat16 and tl.dtype == mx.float32
    ids = np.array(batch["input_ids"])[:, 1:].reshape(-1)[np.array(batch["targets"])]
    want = np.take_along_axis(ref.log_softmax(np.array(logits.astype(mx.float64))), ids[:, None].astype(np.int64), -1)[:, 0]
    got = np.array(tl).reshape(-1)[np.array(batch["targets"])]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _lora_pair(tiny, tok):
    """The same tiny model and LoRA (B randomised, then copied) in both backends, float32."""
    from orpo_local.backends.torch_backend import TorchBackend
    from mlx.utils import tree_flatten

    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    tb, mb = TorchBackend(), MLXBackend()
    tb.load(ModelConfig(name=str(tiny), dtype="float32"), lora, 0)
    mb.load(ModelConfig(name=str(tiny), dtype="float32"), lora, 0)
    torch.manual_seed(1)
    updates = []
    mlx_names = dict(tree_flatten(mb.model.trainable_parameters()))
    with torch.no_grad():
        for name, p in tb.model.named_parameters():
            if "lora_" not in name:
                continue
            if "lora_B" in name:
                p.normal_(0, 0.05)
            # peft: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight (r, in)
            # mlx-lm: model.layers.0.self_attn.q_proj.lora_a (in, r)
            key = name.replace("base_model.model.", "").replace(".default.weight", "").replace("lora_A", "lora_a").replace("lora_B", "lora_b")
            assert key in mlx_names, key
            updates.append((key, mx.array(p.detach().numpy().T)))
    assert len(updates) == len(mlx_names)
    mb.model.load_weights(updates, strict=False)
    return tb, mb


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_same_weights_and_batch_give_the_same_loss_and_metrics_as_torch(tiny, tok, nll_on_prompt):
    from orpo_local.data import load_pairs

    tb, mb = _lora_pair(tiny, tok)
    pairs, _ = tokenize_pairs(load_pairs("zh-sample")[:6], tok, 512, 256)
    batch = collate(pairs, tok.pad_token_id, pad_to=32)
    orpo = OrpoConfig(lambda_=0.25, nll_on_prompt=nll_on_prompt)
    t, m = tb.evaluate([batch], orpo), mb.evaluate([batch], orpo)
    # 1e-4 relative to the quantities compared: differences of near-equal fp32 log-probs (log odds,
    # margins) are judged against the size of those log-probs, not against their tiny difference
    scale = 1e-4 * abs(t["logps/chosen"])
    for key, value in t.items():
        assert m[key] == pytest.approx(value, rel=1e-4, abs=scale), key
    assert m["loss"] == pytest.approx(t["loss"], rel=1e-5)


def test_accumulated_micro_batches_give_the_gradients_of_one_big_batch(tiny, tok):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from orpo_local.backend import window_sizes
    from orpo_local.backends.mlx_backend import model_loss

    backend = MLXBackend()
    backend.load(ModelConfig(name=str(tiny)), LoraConfig(rank=4), 0)
    _, _, pairs = random_batch(n_pairs=5, vocab=len(tok), seed=9, max_prompt=9, max_resp=12)
    vg = nn.value_and_grad(backend.model, model_loss)

    def grads(micro):
        n_tok, n_pairs = window_sizes(micro, False)
        total = {}
        for b in micro:
            _, g = vg(backend.model, to_mx(b), 0.5, False, n_tok, n_pairs)
            for k, v in tree_flatten(g):
                total[k] = total[k] + v if k in total else v
        return total

    big = grads([collate(pairs, 0, pad_to=32)])
    acc = grads([collate(pairs[:2], 0, pad_to=8), collate(pairs[2:], 0, pad_to=16)])
    assert big.keys() == acc.keys() and len(big) > 0
    for k in big:
        np.testing.assert_allclose(np.array(acc[k]), np.array(big[k]), rtol=1e-4, atol=1e-7)


def mlx_config(tiny, arith, runs, **over):
    base = {"model.name": str(tiny), "model.backend": "mlx", "data.path": str(arith), "run.runs_dir": str(runs),
            "optim.max_steps": 6, "optim.batch_size": 4, "optim.learning_rate": 1e-3, "optim.warmup_steps": 2,
            "lora.dropout": 0.1, "run.save_every": 3, "run.eval_every": 3, "run.seed": 3, "data.val_fraction": 0.1}
    return TrainConfig().with_overrides({**base, **over})


def test_stop_then_resume_matches_an_uninterrupted_run(tiny, arith, tmp_path):
    full = train(mlx_config(tiny, arith, tmp_path / "a"), progress=False)
    stop = threading.Event()
    halted = train(mlx_config(tiny, arith, tmp_path / "b"), progress=False, stop=stop,
                   on_event=lambda e: stop.set() if isinstance(e, Step) and e.step == 3 else None)
    assert halted.status == "stopped" and halted.step == 3
    resumed = train(resume=halted.run_dir, progress=False)
    assert resumed.status == "finished" and read_json(resumed.run_dir / "run.json")["backend"] == "mlx"
    a = {r["step"]: r for r in read_metrics(full.run_dir, "train")}
    b = {r["step"]: r for r in read_metrics(resumed.run_dir, "train")}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "nll_loss", "or_loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-8), (step, key)


def test_adapter_loads_in_plain_mlx_lm_and_chat_streams(tiny, arith, tmp_path):
    from mlx_lm import load as mlx_load
    from orpo_local import ChatSession
    from orpo_local.backends.mlx_backend import mlx_model_config

    run = train(mlx_config(tiny, arith, tmp_path, **{"optim.max_steps": 2}), progress=False)
    adapter = run.run_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapters.safetensors", "adapter_config.json"}
    plain, _ = mlx_load(str(tiny), adapter_path=str(adapter), model_config=mlx_model_config(str(tiny)))
    ours = MLXBackend()
    ours.load(ModelConfig(name=str(tiny)), None, 0, adapter=adapter, trainable=False)
    ids = mx.array([[1, 5, 9, 200, 7]])
    np.testing.assert_allclose(np.array(plain(ids)), np.array(ours.model(ids)), rtol=1e-5, atol=1e-5)
    chat = ChatSession.from_run(run.run_dir, temperature=0.0, max_tokens=6)
    assert chat.reply("1+1=?") == chat.history[-1]["content"]


def test_four_bit_qlora_trains(tiny, arith, tmp_path):
    cfg = mlx_config(tiny, arith, tmp_path, **{"model.load_in_4bit": True, "model.quant_group_size": 32,
                                               "optim.max_steps": 3, "run.eval_every": 0})
    run = train(cfg, progress=False)
    info = read_json(run.run_dir / "run.json")
    assert run.status == "finished" and info["quantized"] is True
    rows = {r["step"]: r for r in read_metrics(run.run_dir, "train")}
    assert all(np.isfinite(rows[s]["loss"]) and rows[s]["grad_norm"] > 0 for s in (1, 2, 3))
    backend = MLXBackend()
    backend.load(ModelConfig(name=str(tiny), load_in_4bit=True, quant_group_size=32), LoraConfig(), 0)
    import mlx.nn as nn
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in backend.model.named_modules())


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_vocabulary_projection_only_at_targets_equals_the_full_logits_path(tiny, tok, nll_on_prompt):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from orpo_local.backends.mlx_backend import _head, model_token_logps, orpo_loss_from_token_logps

    backend = MLXBackend()
    backend.load(ModelConfig(name=str(tiny)), LoraConfig(rank=4), 0)
    assert _head(backend.model) is not None  # the fast path is really taken
    _, _, pairs = random_batch(n_pairs=3, vocab=len(tok), seed=4, max_prompt=9, max_resp=7)
    batch = to_mx(collate(pairs, 0, pad_to=8), nll_on_prompt)

    def fast(model, b):
        return orpo_loss_from_token_logps(model_token_logps(model, b), b, 0.4, nll_on_prompt)

    def full(model, b):
        return orpo_loss(model(b["input_ids"]), b, 0.4, nll_on_prompt)

    (lf, mf), gf = nn.value_and_grad(backend.model, fast)(backend.model, batch)
    (ls, ms), gs = nn.value_and_grad(backend.model, full)(backend.model, batch)
    assert lf.item() == pytest.approx(ls.item(), rel=1e-5)
    for k in ms:
        assert mf[k].item() == pytest.approx(ms[k].item(), rel=1e-4, abs=1e-5), k
    for (k, a), (_, b) in zip(tree_flatten(gf), tree_flatten(gs)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-6, err_msg=k)
