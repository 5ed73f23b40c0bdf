"""Data-parallel training on torch.distributed (gloo on CPU): two processes that each hold half of a
window end with the gradients and metrics of the whole window in one process; `orpo-local train --nproc 2`
trains and resumes like one process over the same global batches."""

import os
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from orpo_local.batching import collate  # noqa: E402
from orpo_local.backends.torch_backend import all_reduce_grads, backward_window  # noqa: E402

from batches import random_batch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_pairs(folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model, random_batch(n_pairs=6, vocab=256, seed=3, max_prompt=9, max_resp=8)[2]


def window(pairs, layout):
    return [collate(pairs[:2], 0, 8, layout), collate(pairs[2:3], 0, 8, layout), collate(pairs[3:], 0, 8, layout)]


def worker(rank, port, folder, layout, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, pairs = model_and_pairs(folder)
        mine = window(pairs, layout)[rank::2]  # rank 0: micro-batches 0 and 2, rank 1: micro-batch 1
        metrics = backward_window(model, mine, 0.5, True, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        all_reduce_grads(params)
        torch.save({"metrics": metrics, "grads": [p.grad for p in params]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_two_processes_give_the_gradients_and_metrics_of_one(layout, tmp_path):
    from tiny import tiny_llama

    folder = tiny_llama(tmp_path / "model")
    model, pairs = model_and_pairs(folder)
    want = backward_window(model, window(pairs, layout), 0.5, True, "cpu")
    want_grads = [p.grad for p in model.parameters() if p.requires_grad]
    mp.spawn(worker, args=(free_port(), str(folder), layout, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, w in zip(got["grads"], want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
        for k, v in want.items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-10, abs=1e-13), k


def run_cli(args, cwd):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orpo_local.cli", "train", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_through_torchrun_train_and_resume_like_one(tiny, arith, tmp_path):
    """orpo-local train --nproc 2 (batch 2 each) against one process with batch 2 and 2 accumulation steps: the same
    batches in every window, stopped at step 2 and resumed to 4 on both sides: the same losses, metrics and LoRA
    weights; one run folder."""
    from safetensors.numpy import load_file

    from orpo_local.runs import read_json, read_metrics

    common = ["--model", str(tiny), "--data", str(arith), "--backend", "torch", "--set", "model.dtype=float32",
              "--set", "optim.batch_size=2", "--set", "data.val_min_pairs=4", "--set", "run.eval_every=2",
              "--set", "run.save_every=2", "--set", "lora.dropout=0"]
    run_cli([*common, "--runs-dir", str(tmp_path / "one"), "--max-steps", "2", "--set", "optim.grad_accumulation=2"], tmp_path)
    run_cli([*common, "--runs-dir", str(tmp_path / "two"), "--max-steps", "2", "--nproc", "2"], tmp_path)
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()  # only process 0 wrote a run folder
    assert read_json(two / "run.json")["world_size"] == 2 and read_json(two / "run.json")["launcher"] == "torchrun"
    run_cli(["--resume", str(one), "--max-steps", "4"], tmp_path)  # the same stop and resume on both sides
    run_cli(["--resume", str(two), "--max-steps", "4", "--nproc", "2"], tmp_path)
    assert [p.name for p in (tmp_path / "two").iterdir()] == [two.name]
    for kind in ("train", "eval"):
        a, b = read_metrics(one, kind), read_metrics(two, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
        for x, y in zip(a, b):
            for k in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (kind, x["step"], k)
    w1, w2 = load_file(str(one / "adapter" / "adapter_model.safetensors")), load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6)
