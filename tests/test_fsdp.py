"""Sharded training (model.fsdp, FSDP2) on torch.distributed, gloo on CPU: two processes that each hold half
of the model and a share of every window take the steps of one process over the same windows (loss, metrics,
clipped global gradient norm, LoRA weights, optimiser moments); `orpo-local train --nproc 2 --set model.fsdp=true`
trains and resumes like one process, and its adapter is a plain PEFT folder. FSDP-QLoRA stores the 4-bit
weights in the compute dtype."""

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
import torch.multiprocessing as mp  # noqa: E402

from orpo_local.backends.torch_backend import TorchBackend, _nf4_config  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig  # noqa: E402

from batches import random_batch  # noqa: E402

ORPO = OrpoConfig(lambda_=0.5, nll_on_prompt=True)
CLIP = 0.05  # below the gradient norms here, so every step is clipped by the global norm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer random Llama with a 256-token vocabulary (the bundled tokenizer beside it, only for loading)."""
    from orpo_local.models import load_tokenizer
    from tiny import tiny_llama

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    return tiny_llama(tmp_path_factory.mktemp("small"), vocab_size=256, tokenizer=tok)


def windows(layout):
    """Two optimiser windows: 3 micro-batches (2 + 1 over two processes), then 1 (the second process idles)."""
    pairs = random_batch(n_pairs=7, vocab=256, seed=5, max_prompt=9, max_resp=8)[2]
    cut = [pairs[:2], pairs[2:3], pairs[3:5], pairs[5:]]
    mbs = [collate(p, 0, 8, layout) for p in cut]
    return [mbs[:3], mbs[3:]]


def trained(folder, layout: str, fsdp: bool, rank: int = 0, size: int = 1):
    """A backend after the two windows (this process's share of each), with its per-step metrics."""
    backend = TorchBackend()
    backend.load(ModelConfig(name=str(folder), dtype="float32", fsdp=fsdp, prefix_sharing=layout == "shared"),
                 LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]), 0)
    assert backend.layout == layout
    backend.init_optimizer(OptimConfig(learning_rate=1e-2))
    steps = [backend.train_step(w[rank::size], 1e-2, ORPO, CLIP) for w in windows(layout)]
    return backend, steps


def worker(rank, port, folder, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for layout in LAYOUTS:
            backend, steps = trained(folder, layout, True, rank, 2)
            backend.save_adapter(f"{out}/{layout}/adapter{rank}")
            backend.save_state(f"{out}/{layout}/adapter{rank}")
            torch.save(steps, f"{out}/{layout}/steps{rank}.pt")
    finally:
        dist.destroy_process_group()


LAYOUTS = ("plain", "shared")


def max_difference(a: dict, b: dict) -> float:
    """The largest |a - b| over the tensors (or numbers) of two dicts with the same keys."""
    assert set(a) == set(b)
    return max(float((torch.as_tensor(a[k]) - torch.as_tensor(b[k])).abs().max()) for k in a)


def test_two_sharded_processes_step_like_one(small, tmp_path):
    """Both batch layouts; the windows split 2 + 1 and 1 + 0, so a process runs idle passes; every step clipped."""
    from safetensors.torch import load_file

    mp.spawn(worker, args=(free_port(), str(small), str(tmp_path)), nprocs=2, join=True)
    for layout in LAYOUTS:
        one, want = trained(small, layout, False)
        one.save_adapter(tmp_path / layout / "one")
        one.save_state(tmp_path / layout / "one")
        lora = load_file(tmp_path / layout / "one" / "adapter_model.safetensors")
        moments = torch.load(tmp_path / layout / "one" / "optimizer.pt", weights_only=True)["optimizer"]
        for rank in (0, 1):
            steps = torch.load(tmp_path / layout / f"steps{rank}.pt")
            for w, g in zip(want, steps, strict=True):
                assert w["grad_norm"] > CLIP
                for k in w:
                    assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (layout, k)
            got = load_file(tmp_path / layout / f"adapter{rank}" / "adapter_model.safetensors")
            state = torch.load(tmp_path / layout / f"adapter{rank}" / "optimizer.pt", weights_only=True)["optimizer"]
            assert state["param_groups"] == moments["param_groups"] and set(state["state"]) == set(moments["state"])
            diffs = {"metrics": max(max_difference(w, g) for w, g in zip(want, steps)), "lora": max_difference(lora, got),
                     "moments": max(max_difference(moments["state"][i], state["state"][i]) for i in moments["state"])}
            print(f"{layout} rank {rank}: max |FSDP - one process| {diffs}")
            for k in lora:  # Adam divides by the root of tiny second moments: float32 noise shows at 1e-6
                torch.testing.assert_close(got[k], lora[k], rtol=1e-4, atol=1e-6)
            for i, s in moments["state"].items():
                for k, v in s.items():
                    torch.testing.assert_close(state["state"][i][k], v, rtol=1e-4, atol=1e-9)


def test_fsdp_needs_two_processes(small):
    with pytest.raises(ValueError, match=r"model.fsdp .* one process: train with `orpo-local train --nproc N`"):
        TorchBackend().load(ModelConfig(name=str(small), fsdp=True), LoraConfig(), 0)
    TorchBackend().load(ModelConfig(name=str(small), fsdp=True), None, 0, trainable=False)  # chat and eval of an FSDP run


def test_fsdp_qlora_stores_the_4bit_weights_in_the_compute_dtype():
    for dtype in (torch.bfloat16, torch.float32):
        assert _nf4_config(dtype, fsdp=True).bnb_4bit_quant_storage == dtype
        assert _nf4_config(dtype, fsdp=True).bnb_4bit_compute_dtype == dtype
    assert _nf4_config(torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # one device: packed bytes
