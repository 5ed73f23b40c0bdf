"""Exports (adapter zip, merged model for torch and MLX), run deletion and the pre-load size estimate."""

import json
import zipfile

import numpy as np
import pytest

from orpo_local import TrainConfig, train
from orpo_local.estimate import model_size, training_memory
from orpo_local.export import export_adapter, export_merged
from orpo_local.runs import delete_run, list_runs


def run_config(tiny, arith, runs, backend):
    return TrainConfig().with_overrides({"model.name": str(tiny), "model.backend": backend, "model.dtype": "float32",
                                         "data.path": str(arith), "run.runs_dir": str(runs), "optim.max_steps": 2,
                                         "optim.learning_rate": 1e-2, "run.eval_every": 0, "data.val_fraction": 0.1})


def test_torch_merged_model_equals_base_plus_adapter(tiny, arith, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train(run_config(tiny, arith, tmp_path, "torch"), progress=False)
    out = export_merged(run.run_dir, tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".merged-*")), "the temporary folder is gone"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), str(run.run_dir / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7, 42]])
    with torch.no_grad():
        want, got, plain = peft(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)


def test_mlx_merged_model_equals_base_plus_adapter(tiny, arith, tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load as mlx_load
    from orpo_local.backends.mlx_backend import mlx_model_config

    run = train(run_config(tiny, arith, tmp_path, "mlx"), progress=False)
    out = export_merged(run.run_dir, tmp_path / "merged")
    merged, _ = mlx_load(str(out))
    with_adapter, _ = mlx_load(str(tiny), adapter_path=str(run.run_dir / "adapter"), model_config=mlx_model_config(str(tiny)))
    base, _ = mlx_load(str(tiny), model_config=mlx_model_config(str(tiny)))
    ids = mx.array([[1, 5, 9, 200, 7, 42]])
    got, want, plain = (np.array(m(ids).astype(mx.float32)) for m in (merged, with_adapter, base))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3


def test_adapter_zip_describes_itself_and_delete_removes_only_runs(tiny, arith, tmp_path):
    pytest.importorskip("torch")
    run = train(run_config(tiny, arith, tmp_path, "torch"), progress=False)
    archive = export_adapter(run.run_dir)
    assert archive == run.run_dir / "exports" / f"{run.run_dir.name}-adapter.zip"
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "run.json"} <= names
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        delete_run(tmp_path)
    delete_run(run.run_dir)
    assert not run.run_dir.exists() and list_runs(tmp_path) == []


def test_size_and_memory_estimate_from_safetensors_headers(tiny):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    size = model_size(str(tiny))
    real = sum(t.numel() for t in load_file(tiny / "model.safetensors").values())
    assert size.n_params == real and size.n_layers == 2 and size.hidden == 64
    assert size.linear_shapes["q_proj"] == (64, 64) and size.linear_shapes["k_proj"] == (64, 32)
    assert size.linear_shapes["down_proj"] == (128, 64)
    cfg = TrainConfig()
    est = training_memory(size, cfg)
    # r=8 on q,k,v,o,gate,up,down of 2 blocks: 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 2
    assert est["lora_params"] == 8 * 1024 * 2 == sum(
        p.numel() for n, p in _peft_params(tiny, torch) if "lora_" in n)
    small = training_memory(size, cfg.with_overrides({"gradient_checkpointing": True, "load_in_4bit": True}))
    assert small["activations_gb"] < est["activations_gb"] and small["weights_gb"] < est["weights_gb"]

    # Worked by hand for the bundled model (134,515,008 params, 30 blocks, hidden 576, vocab 49,152), 2 pairs of 512 tokens:
    #   LoRA r=8: 30 x 8 x (1152 q + 768 k + 768 v + 1152 o + 2112 gate + 2112 up + 2112 down) = 2,442,240 params, x 16 B = 0.04 GB
    #   bf16 weights 134,515,008 x 2 B = 0.27 GB; NF4 x 0.5625 B = 0.08 GB
    #   activations: 2048 tokens x 30 blocks x 576 x 2 B x 34 (2 with checkpointing) = 2.41 GB (0.14 GB),
    #   plus the logits 1024 x 49,152 x 4 B x 2 = 0.40 GB: 2.81 GB (0.54 GB)
    bundled = model_size("smollm2-135m-instruct")
    fixed = cfg.with_overrides({"optim.batch_size": 2, "data.max_length": 512, "lora.rank": 8, "lora.num_layers": -1,
                                "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                "model.dtype": "auto", "model.gradient_checkpointing": False, "model.load_in_4bit": False})
    plain = training_memory(bundled, fixed)
    assert plain == {"weights_gb": 0.27, "lora_optimizer_gb": 0.04, "activations_gb": 2.81, "total_gb": 3.12, "lora_params": 2442240}
    qlora = training_memory(bundled, fixed.with_overrides({"model.gradient_checkpointing": True, "model.load_in_4bit": True}))
    assert qlora == {"weights_gb": 0.08, "lora_optimizer_gb": 0.04, "activations_gb": 0.54, "total_gb": 0.66, "lora_params": 2442240}
    assert json.loads(json.dumps(plain)) == plain  # plain numbers, ready for the UI as they are


def _peft_params(tiny, torch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return list(model.named_parameters())
