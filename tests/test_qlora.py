"""4-bit QLoRA on the torch backend is really 4-bit: the LoRA targets become bitsandbytes NF4
layers with packed uint8 storage, the load takes fewer bytes than bf16, and training steps get
the gradients of the dequantised model.

bitsandbytes ships with the torch extra everywhere but macOS; missing elsewhere it skips here
and fails in CI (conftest.need).
"""

import platform

import pytest
from conftest import need

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
if platform.system() == "Darwin":
    pytest.skip("bitsandbytes is not installed on macOS (the MLX backend quantises there)", allow_module_level=True)
bnb = need("bitsandbytes", "4-bit QLoRA needs bitsandbytes: pip install -e '.[torch]'")

from orpo_local.backends.torch_backend import TorchBackend, backward_window  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig  # noqa: E402
from orpo_local.tokenization import TokenizedPair  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Two pairs with ids below the small model's vocabulary of 256.
BATCH = collate([TokenizedPair([1, 5, 9, 30], [40, 50, 7], [60, 70, 8]), TokenizedPair([1, 11, 12], [13, 14], [15, 16, 17])], pad_id=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer random Llama with a 256-token vocabulary: its linear layers hold most of the
    weights, as in real models (the bundled tokenizer is saved alongside, only for loading)."""
    from orpo_local.models import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    return tiny_llama(tmp_path_factory.mktemp("small"), vocab_size=256, tokenizer=tok)


def load(path, four_bit: bool, lora=True, **model):
    backend = TorchBackend()
    info = backend.load(ModelConfig(name=str(path), load_in_4bit=four_bit, **model), LoraConfig() if lora else None, 0,
                        trainable=lora)
    return backend, info


def targets(model) -> dict[str, torch.nn.Module]:
    """The layer under every LoRA target (its `base_layer` where peft wrapped it), by module path."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            base = hasattr(module, "base_layer")
            out[f"{name}.base_layer" if base else name] = module.base_layer if base else module
    return out


def nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_lora_targets_are_nf4_linear4bit_layers_with_packed_uint8_weights(small):
    plain, plain_info = load(small, four_bit=False)
    q4, info = load(small, four_bit=True)
    want = targets(plain.model)
    got = targets(q4.model)
    assert len(want) == 2 * len(TARGETS) and all(type(m) is torch.nn.Linear for m in want.values())
    assert sorted(got) == sorted(want)
    for name, layer in got.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        w, shape = layer.weight, want[name].weight.shape
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8 and not w.requires_grad, name
        assert w.numel() == shape.numel() // 2, name  # two 4-bit values per byte
        state = w.quant_state
        assert state.quant_type == "nf4" and tuple(state.shape) == tuple(shape) and state.nested, name  # double quantisation
    assert info.quantized is True and info.n_params == plain_info.n_params  # packed weights counted as their values


def test_weights_take_16_levels_per_block_and_fewer_bytes_than_bf16(small):
    from safetensors.torch import load_file

    original = load_file(small / "model.safetensors")
    for lora in (True, False):  # the training load and the chat load
        bf16, _ = load(small, four_bit=False, lora=lora, dtype="bfloat16")
        q4, _ = load(small, four_bit=True, lora=lora, dtype="bfloat16")
        assert nbytes(q4.model) < nbytes(bf16.model), lora
        packed = sum(m.weight.numel() for m in targets(q4.model).values())
        assert packed * 4 == sum(m.weight.numel() * m.weight.element_size() for m in targets(bf16.model).values())
    for name, layer in targets(q4.model).items():
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        blocks = w.reshape(-1, layer.weight.quant_state.blocksize)
        assert max(len(torch.unique(b)) for b in blocks) <= 16, name  # NF4: 16 levels per block
        source = original[name.removesuffix(".base_layer") + ".weight"]
        error = (w - source).norm() / source.norm()
        assert 0.01 < error < 0.2, (name, float(error))  # quantised, and close


# after_eval: an evaluation first, as train() does; on AVX512-BF16 CPUs bitsandbytes then repacks the 4-bit
# weights for a kernel with no backward unless the backend keeps trainable layers out of it
@pytest.mark.parametrize("after_eval", [False, True])
def test_training_steps_get_the_gradients_of_the_dequantised_model(small, after_eval):
    q4, _ = load(small, four_bit=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts with B = 0, which leaves A without gradient: give B values
        for name, p in q4.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    twin, _ = load(small, four_bit=False, dtype="float32")  # the same weights, dequantised, in float32
    twin_params = dict(twin.model.named_parameters())
    with torch.no_grad():
        for name, layer in targets(q4.model).items():
            twin_params[name + ".weight"].copy_(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
        for name, p in q4.model.named_parameters():
            if not isinstance(p, bnb.nn.Params4bit):
                twin_params[name].copy_(p)
    if after_eval:  # what train() does before step 1
        q4.evaluate([BATCH], OrpoConfig())

    grads = []
    for backend in (q4, twin):
        backend.model.train()
        backend.model.zero_grad()
        metrics = backward_window(backend.model, [BATCH], 0.1, False, backend.device)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        grads.append({n: p.grad.float().clone() for n, p in backend.model.named_parameters() if p.requires_grad})
    got, want = grads
    assert sorted(got) == sorted(want) and len(got) == 2 * len(targets(q4.model))  # lora_A and lora_B of every target
    for name in want:
        assert got[name].norm() > 0, name
        assert (got[name] - want[name]).norm() <= 0.05 * want[name].norm(), name  # bf16 compute (where the CPU has it) against float32

    packed = {n: p.detach().clone() for n, p in q4.model.named_parameters() if isinstance(p, bnb.nn.Params4bit)}
    lora = {n: p.detach().clone() for n, p in q4.model.named_parameters() if p.requires_grad}
    q4.init_optimizer(OptimConfig(learning_rate=1e-3))
    for _ in range(2):
        step = q4.train_step([BATCH], 1e-3, OrpoConfig(), 1.0)
        assert torch.isfinite(torch.tensor(step["loss"])) and step["grad_norm"] > 0
    for name, p in q4.model.named_parameters():
        if name in packed:
            assert torch.equal(p, packed[name]), name  # the 4-bit base stays frozen
        elif name in lora:
            assert not torch.equal(p, lora[name]), name  # every LoRA weight trained
