"""Data-parallel training on torch.distributed (gloo on CPU) and on mx.distributed (mlx.launch, a ring over
localhost): two processes that each hold half of a window end with the gradients and metrics of the whole
window in one process; `orpo-local train --nproc 2` trains and resumes like one process over the same global
batches, with either backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from orpo_local.batching import collate  # noqa: E402
from orpo_local.config import OrpoConfig  # noqa: E402
from orpo_local.backends.torch_backend import all_reduce_grads, backward_window  # noqa: E402

from batches import random_batch  # noqa: E402
from conftest import need  # noqa: E402
from orpo_local.distributed import World, free_ports, launcher_command, torchrun_command, world  # noqa: E402


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
    mp.spawn(worker, args=(free_ports(1), str(folder), layout, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, w in zip(got["grads"], want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
        for k, v in want.items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-10, abs=1e-13), k


def test_mlx_launch_is_recognised_and_started_without_importing_mlx(monkeypatch, tmp_path):
    """world() reads mlx.launch's environment (its rank and the ring's hostfile, one entry per process), and
    launcher_command starts orpo-local's CLI under torchrun or mlx.launch, our flags kept from the launcher's."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]')
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MLX_RANK", "2")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert world() == World(2, 3, "mlx.launch") and world().framework == "mlx" and not world().writer
    hostfile.write_text("")  # what mlx.launch -n 1 writes
    assert world() == World()
    argv = ["train", "--backend", "mlx", "-n", "3"]
    assert launcher_command("torch", 2, argv) == torchrun_command(2, argv)
    command = launcher_command("mlx", 2, argv)
    assert Path(command[0]).name == "mlx.launch" and command[1:4] == ["-n", "2", "--backend"]
    assert command[command.index("--python") + 1] == sys.executable
    assert command[command.index("--"):] == ["--", "-m", "orpo_local.cli", *argv]
    with pytest.raises(ValueError, match="no launcher"):
        launcher_command("jax", 2, argv)


# One process of the MLX twin of the test above, started by mlx.launch: its share of the same window
# (and of a one-batch window, where process 1 has none) and of the evaluation, with the backend's sums.
MLX_WORKER = """
import json, sys
import mlx.core as mx, numpy as np
from mlx.utils import tree_flatten
sys.path.insert(0, sys.argv[1])
from test_distributed import mlx_model_and_pairs, window, windows, ORPO
from orpo_local.distributed import barrier, broadcast, init_mlx, world

w = world()
init_mlx(w)
backend, pairs = mlx_model_and_pairs(sys.argv[2])
out = {"world": [w.rank, w.size, w.launcher], "name": broadcast("run-名前" if w.writer else None, w)}
for name, micro in windows(pairs):
    grads, totals, tokens = backend.window_grads(w.share(micro), ORPO)
    out[name] = {"grads": {k: np.array(g).tolist() for k, g in tree_flatten(grads)},
                 "metrics": {k: v.item() for k, v in totals.items()}, "tokens": tokens}
out["eval"] = backend.evaluate(window(pairs, "prefix"), ORPO)
barrier(w)
with open(f"{sys.argv[3]}/rank{w.rank}.json", "w") as f:
    json.dump(out, f)
"""
ORPO = OrpoConfig(lambda_=0.5, nll_on_prompt=True)


def windows(pairs):
    """(name, micro-batches) of the MLX test: the window above in both MLX layouts, and its first micro-batch alone."""
    for layout in ("plain", "prefix"):
        full = window(pairs, layout)
        yield from ((f"{layout} window", full), (f"{layout} one", full[:1]))


def mlx_model_and_pairs(folder):
    """The MLX backend on `folder` with LoRA on q/v whose B matrices are random (mlx-lm starts them at zero,
    which would leave the A gradients zero), and six random pairs."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from orpo_local.backends.mlx_backend import MLXBackend
    from orpo_local.config import LoraConfig, ModelConfig

    backend = MLXBackend()
    backend.load(ModelConfig(name=folder, dtype="float32"), LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), 0)
    rng = np.random.default_rng(0)
    b = [(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
         for k, v in tree_flatten(backend.model.trainable_parameters()) if k.endswith("lora_b")]
    backend.model.update(tree_unflatten(b))
    return backend, random_batch(n_pairs=6, vocab=256, seed=3, max_prompt=9, max_resp=8)[2]


def mlx_launch(nproc: int, script: list[str], env=None, timeout=300) -> subprocess.CompletedProcess:
    """`script` (a file and its arguments) in `nproc` local processes under mlx.launch on the ring."""
    launch = Path(sys.executable).parent / "mlx.launch"
    command = [str(launch), "-n", str(nproc), "--backend", "ring", "--starting-port", str(free_ports(nproc)),
               "--python", sys.executable, "--", *script]
    r, w = os.pipe()  # mlx.launch reads its stdin: an empty pipe of its own
    try:
        return subprocess.run(command, stdin=r, capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        os.close(r)
        os.close(w)


def need_mlx_ring(tmp_path):
    """Skip (fail in CI) where MLX or its ring backend cannot join two local processes."""
    need("mlx_lm", "the MLX backend is not installed")
    probe = tmp_path / "ring_probe.py"
    probe.write_text("import mlx.core as mx\nmx.distributed.init(strict=True, backend='ring')\n"
                     "print('sum', mx.distributed.all_sum(mx.array([1.0])).item())\n")
    try:
        done = mlx_launch(2, [str(probe)], timeout=120)
        ok, why = done.stdout.count("sum 2.0") == 2, done.stdout[-500:] + done.stderr[-1500:]
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, repr(e)
    need(ok, f"mx.distributed's ring backend cannot join two local processes through mlx.launch here: {why}")


@pytest.mark.slow  # about 30 s on 2 cores: mlx.launch polls its processes' pipes without pause, taking a core
def test_two_mlx_processes_give_the_gradients_and_metrics_of_one(tiny, tmp_path):
    """The MLX twin of the test above, in float32 (MLX on the CPU has no float64 matmul): each process's share,
    summed by the backend, against one process on the whole window, for the gradient, metrics, tokens and the
    sharded evaluation; also a window of one micro-batch (process 1 adds zeros), broadcast and barrier."""
    need_mlx_ring(tmp_path)
    from mlx.utils import tree_flatten

    backend, pairs = mlx_model_and_pairs(str(tiny))
    want = {}
    for name, micro in windows(pairs):
        grads, totals, tokens = backend.window_grads(micro, ORPO)
        want[name] = ({k: np.array(g) for k, g in tree_flatten(grads)}, {k: v.item() for k, v in totals.items()}, tokens)
    want_eval = backend.evaluate(window(pairs, "prefix"), ORPO)
    (tmp_path / "worker.py").write_text(MLX_WORKER)
    done = mlx_launch(2, [str(tmp_path / "worker.py"), str(Path(__file__).parent), str(tiny), str(tmp_path)],
                      env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert all((tmp_path / f"rank{r}.json").exists() for r in (0, 1)), done.stdout[-1000:] + done.stderr[-3000:]  # mlx.launch exits 0 regardless
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["world"] == [rank, 2, "mlx.launch"] and got["name"] == "run-名前"
        for name, (grads, metrics, tokens) in want.items():
            assert set(got[name]["grads"]) == set(grads) and got[name]["tokens"] == tokens
            for k, g in grads.items():
                np.testing.assert_allclose(np.array(got[name]["grads"][k]), g, rtol=1e-5, atol=1e-7, err_msg=f"{name} {k}")
            for k, v in metrics.items():
                assert got[name]["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (name, k)
        for k, v in want_eval.items():
            assert got["eval"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), ("eval", k)


def test_a_failed_process_fails_orpo_local_train_nproc_under_mlx_launch(tiny, tmp_path):
    """mlx.launch exits 0 whatever its processes do; `orpo-local train --nproc 2` returns their failure."""
    need_mlx_ring(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no answers"}\n')
    done = subprocess.run([sys.executable, "-m", "orpo_local.cli", "train", "--model", str(tiny), "--data", str(bad), "--backend",
                           "mlx", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "no valid preference pairs" in done.stderr, done.stderr[-3000:]


def run_cli(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "orpo_local.cli", "train", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# per backend: the launcher run.json records and the adapter's weights file
LAUNCHED = {"torch": ("torchrun", "adapter_model.safetensors"), "mlx": ("mlx.launch", "adapters.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_two_processes_train_and_resume_like_one(backend, tiny, arith, tmp_path):
    """orpo-local train --nproc 2 (batch 2 each; torchrun or mlx.launch) against one process with batch 2 and 2
    accumulation steps: the same batches in every window, stopped at step 2 and resumed to 4 on both sides: the
    same losses, metrics, gradient norms and LoRA weights; one run folder."""
    from safetensors.numpy import load_file

    from orpo_local.runs import read_json, read_metrics

    if backend == "mlx":
        need_mlx_ring(tmp_path)
    launcher, weights = LAUNCHED[backend]
    common = ["--model", str(tiny), "--data", str(arith), "--backend", backend, "--set", "model.dtype=float32",
              "--set", "optim.batch_size=2", "--set", "data.val_min_pairs=4", "--set", "run.eval_every=2",
              "--set", "run.save_every=2", "--set", "lora.dropout=0"]
    run_cli([*common, "--runs-dir", str(tmp_path / "one"), "--max-steps", "2", "--set", "optim.grad_accumulation=2"], tmp_path)
    run_cli([*common, "--runs-dir", str(tmp_path / "two"), "--max-steps", "2", "--nproc", "2"], tmp_path)
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()  # only process 0 wrote a run folder
    assert read_json(two / "run.json")["world_size"] == 2 and read_json(two / "run.json")["launcher"] == launcher
    run_cli(["--resume", str(one), "--max-steps", "4"], tmp_path)  # the same stop and resume on both sides
    run_cli(["--resume", str(two), "--max-steps", "4", "--nproc", "2"], tmp_path)
    assert [p.name for p in (tmp_path / "two").iterdir()] == [two.name]
    for kind in ("train", "eval"):
        a, b = read_metrics(one, kind), read_metrics(two, kind)
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
        for x, y in zip(a, b):
            for k in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7), (kind, x["step"], k)
    w1, w2 = load_file(str(one / "adapter" / weights)), load_file(str(two / "adapter" / weights))
    assert set(w1) == set(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6)
