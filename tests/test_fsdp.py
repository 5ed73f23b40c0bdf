"""Sharded training (model.fsdp, FSDP2) on torch.distributed, gloo on CPU: two processes that each hold half
of the model and a share of every window take the steps of one process over the same windows (loss, metrics,
clipped global gradient norm, LoRA weights, optimiser moments); `orpo-local train --nproc 2 --set model.fsdp=true`
trains and resumes like one process, and its adapter is a plain PEFT folder. FSDP-QLoRA stores the 4-bit
weights in the compute dtype and, with bitsandbytes' CPU kernels, steps like one 4-bit process too."""

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


def windows(layout: str) -> list[list]:
    """Two optimiser windows: 3 micro-batches (2 + 1 over two processes), then 1 (the second process idles)."""
    pairs = random_batch(n_pairs=7, vocab=256, seed=5, max_prompt=9, max_resp=8)[2]
    cut = [pairs[:2], pairs[2:3], pairs[3:5], pairs[5:]]
    mbs = [collate(p, 0, 8, layout) for p in cut]
    return [mbs[:3], mbs[3:]]


def trained(folder, case: str, fsdp: bool, rank: int = 0, size: int = 1):
    """A backend after the two windows (this process's share of each) and an evaluation of three batches,
    with the metrics of each."""
    layout, four_bit = case.split("-")[0], case.endswith("4bit")
    backend = TorchBackend()
    backend.load(ModelConfig(name=str(folder), dtype="float32", fsdp=fsdp, prefix_sharing=layout == "shared", load_in_4bit=four_bit),
                 LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]), 0)
    assert backend.layout == layout
    backend.init_optimizer(OptimConfig(learning_rate=1e-2))
    steps = [backend.train_step(w[rank::size], 1e-2, ORPO, CLIP) for w in windows(layout)]
    return backend, steps + [backend.evaluate(windows(layout)[0], ORPO)]


def worker(rank, port, folder, cases, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for case in cases:
            backend, steps = trained(folder, case, True, rank, 2)
            backend.save_adapter(f"{out}/{case}/adapter{rank}")
            backend.save_state(f"{out}/{case}/adapter{rank}")
            torch.save(steps, f"{out}/{case}/steps{rank}.pt")
    finally:
        dist.destroy_process_group()


def cases() -> list[str]:
    """Both batch layouts, and FSDP-QLoRA where bitsandbytes is installed (it quantises on CPU too)."""
    import importlib.util

    return ["plain", "shared"] + (["shared-4bit"] if importlib.util.find_spec("bitsandbytes") else [])


def max_difference(a: dict, b: dict) -> float:
    """The largest |a - b| over the tensors (or numbers) of two dicts with the same keys."""
    assert set(a) == set(b)
    return max(float((torch.as_tensor(a[k]) - torch.as_tensor(b[k])).abs().max()) for k in a)


def test_two_sharded_processes_step_like_one(small, tmp_path):
    """The windows split 2 + 1 and 1 + 0, so a process runs idle passes; every step is clipped; the 4-bit case's
    one process stores its NF4 weights packed in bytes, the sharded one in float32."""
    from safetensors.torch import load_file

    mp.spawn(worker, args=(free_port(), str(small), cases(), str(tmp_path)), nprocs=2, join=True)
    for case in cases():
        one, want = trained(small, case, False)
        one.save_adapter(tmp_path / case / "one")
        one.save_state(tmp_path / case / "one")
        lora = load_file(tmp_path / case / "one" / "adapter_model.safetensors")
        moments = torch.load(tmp_path / case / "one" / "optimizer.pt", weights_only=True)["optimizer"]
        for rank in (0, 1):
            steps = torch.load(tmp_path / case / f"steps{rank}.pt")
            for w, g in zip(want, steps, strict=True):
                assert w.get("grad_norm", 1.0) > CLIP
                for k in w:
                    assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (case, k)
            got = load_file(tmp_path / case / f"adapter{rank}" / "adapter_model.safetensors")
            state = torch.load(tmp_path / case / f"adapter{rank}" / "optimizer.pt", weights_only=True)["optimizer"]
            assert state["param_groups"] == moments["param_groups"] and set(state["state"]) == set(moments["state"])
            diffs = {"metrics": max(max_difference(w, g) for w, g in zip(want, steps)), "lora": max_difference(lora, got),
                     "moments": max(max_difference(moments["state"][i], state["state"][i]) for i in moments["state"])}
            print(f"{case} rank {rank}: max |FSDP - one process| {diffs}")
            for k in lora:  # Adam divides by the root of tiny second moments: float32 noise shows at 1e-6
                torch.testing.assert_close(got[k], lora[k], rtol=1e-4, atol=1e-5 if case.endswith("4bit") else 1e-6)
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


def run_cli(args, cwd):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orpo_local.cli", "train", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-12000:]
    return done


@pytest.mark.slow
def test_sharded_training_through_torchrun_resumes_like_one_process(tiny, arith, tmp_path):
    """`orpo-local train --nproc 2 --set model.fsdp=true` (batch 2 each), stopped at step 2 and resumed to 4, against one
    process with batch 2 and 2 accumulation steps straight to 4 (a constant learning rate, so stopping changes no
    step): the same losses, metrics and LoRA weights, and an adapter plain peft loads."""
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from orpo_local.runs import read_json, read_metrics

    common = ["--model", str(tiny), "--data", str(arith), "--backend", "torch", "--set", "model.dtype=float32",
              "--set", "optim.batch_size=2", "--set", "data.val_min_pairs=4", "--set", "run.eval_every=2",
              "--set", "run.save_every=2", "--set", "lora.dropout=0", "--set", "optim.schedule=constant",
              "--set", "optim.warmup_steps=0"]
    run_cli([*common, "--runs-dir", str(tmp_path / "one"), "--max-steps", "4", "--set", "optim.grad_accumulation=2"], tmp_path)
    run_cli([*common, "--runs-dir", str(tmp_path / "two"), "--max-steps", "2", "--nproc", "2", "--set", "model.fsdp=true"], tmp_path)
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    run_cli(["--resume", str(two), "--max-steps", "4", "--nproc", "2"], tmp_path)
    assert read_json(two / "run.json")["world_size"] == 2 and read_json(two / "run.json")["step"] == 4
    diffs = {}
    for kind in ("train", "eval"):
        a, b = read_metrics(one, kind), read_metrics(two, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
        for x, y in zip(a, b):
            for k in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "grad_norm"):
                if k in x:
                    diffs[kind] = max(diffs.get(kind, 0.0), abs(x[k] - y[k]))
                    assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (kind, x["step"], k)
    w1, w2 = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (one, two))
    c1, c2 = (read_json(run / "adapter" / "adapter_config.json") for run in (one, two))
    assert set(w1) == set(w2) and set(c1.pop("target_modules")) == set(c2.pop("target_modules")) and c1 == c2  # peft keeps a set
    diffs["lora"] = max(float(np.abs(w2[k] - w1[k]).max()) for k in w1)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    ids = torch.tensor([[1, 5, 9, 30, 40, 50]])
    logits = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), str(run / "adapter"))(input_ids=ids).logits
              for run in (one, two)]
    diffs["logits"] = float((logits[0] - logits[1]).abs().max())
    print(f"max |FSDP - one process| {diffs}")
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
