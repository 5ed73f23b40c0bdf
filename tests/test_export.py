"""Exports (adapter zip, merged model for torch and MLX; adapters converted between PEFT and mlx-lm; every
`export` target from a run of either backend), run deletion and the pre-load size estimate. GGUF's own
checks, in llama.cpp, are in test_gguf.py."""

import importlib.util
import json
import zipfile

import numpy as np
import pytest

from orpo_local import TrainConfig, train
from orpo_local.convert import Lora, adapter_format, read_adapter, write_mlx, write_peft
from orpo_local.estimate import model_size, training_memory
from orpo_local.export import TARGETS, adapter_for, export, export_adapter, export_merged
from orpo_local.runs import delete_run, list_runs, run_template

HAS_MLX = importlib.util.find_spec("mlx_lm") is not None
IDS = [[1, 5, 9, 200, 7, 42]]


def run_config(tiny, arith, runs, backend, **over):
    return TrainConfig().with_overrides({"model.name": str(tiny), "model.backend": backend, "model.dtype": "float32",
                                         "data.path": str(arith), "run.runs_dir": str(runs), "optim.max_steps": 2,
                                         "optim.learning_rate": 1e-2, "run.eval_every": 0, "data.val_fraction": 0.1, **over})


@pytest.fixture(scope="module")
def runs(tiny, arith, tmp_path_factory):
    """A 2-step run on each backend: torch with adapters on both blocks, MLX on the last block only
    (so the conversions map mlx-lm's num_layers and PEFT's layers_to_transform both ways)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("runs")
    out = {"torch": train(run_config(tiny, arith, root, "torch", **{"run.name": "t"}), progress=False).run_dir}
    if HAS_MLX:
        out["mlx"] = train(run_config(tiny, arith, root, "mlx", **{"run.name": "m", "lora.num_layers": 1}), progress=False).run_dir
    return out


def peft_logits(tiny, adapter=None) -> np.ndarray:
    """Logits of IDS from plain transformers (+ plain peft): PeftModel.from_pretrained, nothing of ours."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def mlx_logits(model_dir, adapter=None) -> np.ndarray:
    """Logits of IDS from plain mlx_lm.load(..., adapter_path=...)."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    model, _ = mlx_load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def logits_with(backend: str, tiny, adapter) -> np.ndarray:
    return peft_logits(tiny, adapter) if backend == "torch" else mlx_logits(tiny, adapter)


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


# ------------------------------------------------------------------ adapters between the backends

@pytest.mark.parametrize("source", ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed"))])
def test_a_converted_adapter_gives_the_other_framework_the_same_logits(runs, tiny, source):
    pytest.importorskip("mlx_lm")
    run, other = runs[source], {"torch": "mlx", "mlx": "torch"}[source]
    fmt = {"torch": "peft", "mlx": "mlx"}[other]
    out = export(run, fmt, progress=lambda m: None)
    assert out == run / "exports" / f"{run.name}-{fmt}" and adapter_format(out) == fmt
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == run_template(run)
    want, got = logits_with(source, tiny, run / "adapter"), logits_with(other, tiny, out)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # float32, two frameworks
    assert np.abs(got - logits_with(other, tiny, None)).max() > 1e-2, "the adapter changes the model"
    config = json.loads((out / "adapter_config.json").read_text())
    if fmt == "peft":  # the last block only, alpha / r = mlx-lm's scale 2
        assert config["layers_to_transform"] == [1] and config["lora_alpha"] / config["r"] == 2.0
        assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    else:
        assert config["num_layers"] == 2 and config["lora_parameters"]["scale"] == 16 / 8
    back = read_adapter(out)
    orig = read_adapter(run / "adapter")
    assert back.weights.keys() == orig.weights.keys() and back.scale == orig.scale and back.rank == orig.rank


def test_a_peft_adapter_on_blocks_mlx_lm_cannot_name_is_padded_with_zeros(tiny, tmp_path):
    """mlx-lm adapts the last N blocks with one set of keys; PEFT can adapt block 0 alone and q, v only."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx_lm")
    rng = np.random.default_rng(0)
    mods = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (64, 32)}
    lora = Lora({m: (rng.normal(0, 0.3, (4, i)).astype(np.float32), rng.normal(0, 0.3, (o, 4)).astype(np.float32))
                 for m, (i, o) in mods.items()}, scale=1.5, rank=4)
    write_peft(lora, tmp_path / "peft", base=str(tiny), n_layers=2)
    write_mlx(lora, tmp_path / "mlx", n_layers=2)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["layers_to_transform"] == [0]
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    np.testing.assert_allclose(mlx_logits(tiny, tmp_path / "mlx"), peft_logits(tiny, tmp_path / "peft"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed"))])
def test_every_target_from_a_run_of_either_backend(runs, tiny, source):
    pytest.importorskip("mlx_lm")
    run = runs[source]
    want = logits_with(source, tiny, run / "adapter")
    outs = {to: export(run, to, progress=lambda m: None) for to in TARGETS}
    assert {to: sorted(p.name for p in out.iterdir() if p.suffix != ".md") for to, out in outs.items()} == {
        "peft": ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"],
        "mlx": ["adapter_config.json", "adapters.safetensors", "chat_template.jinja"],
        "merged": ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
        "merged-mlx": ["chat_template.jinja", "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"],
        "gguf": ["Modelfile", f"{run.name}-f16.gguf"],
    }
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(outs["merged"], dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(IDS)).logits.numpy(), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(mlx_logits(outs["merged-mlx"]), want, atol=1e-4, rtol=1e-4)
    for to in ("merged", "merged-mlx"):  # the tokenizer formats prompts as the run did
        assert AutoTokenizer.from_pretrained(outs[to]).chat_template == run_template(run)
    assert not list((run / "exports").glob(".*")), "no temporary folder is left behind"


def test_an_export_replaces_its_folder_whole_or_leaves_it_as_it_was(runs, monkeypatch):
    run = runs["torch"]
    out = export(run, "peft", progress=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import orpo_local.export as ex

    def broken(config, adapter, fmt, folder, progress):  # dies half-way through writing
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_write_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        export(run, "peft", progress=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list((run / "exports").glob(".*")), "the temporary folder is removed"
    with pytest.raises(ValueError, match="use one of peft, mlx, merged, merged-mlx, gguf"):
        export(run, "onnx")
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step-9'"):
        export(run, "peft", checkpoint="step-9")


@pytest.mark.skipif(not HAS_MLX, reason="MLX is not installed")
def test_chat_on_the_other_backend_with_a_converted_adapter(runs, tiny):
    """A torch run chats on MLX and an MLX run on torch: adapter_for converts once and reuses it."""
    from orpo_local import ChatSession
    from orpo_local.backends import get_backend
    from orpo_local.config import ModelConfig

    for source, other in (("torch", "mlx"), ("mlx", "torch")):
        run = runs[source]
        adapter = adapter_for(run, other, progress=lambda m: None)
        assert adapter_format(adapter) == {"torch": "peft", "mlx": "mlx"}[other]
        stamp = (adapter / "adapter_config.json").stat().st_mtime_ns
        assert adapter_for(run, other, progress=lambda m: None) == adapter and (adapter / "adapter_config.json").stat().st_mtime_ns == stamp
        assert adapter_for(run, source) == run / "adapter"
        backend = get_backend(other)
        backend.load(ModelConfig(name=str(tiny), dtype="float32"), None, 0, adapter=adapter, trainable=False)
        there = ChatSession(backend, template=run_template(run), temperature=0.0, max_tokens=8)
        here = ChatSession.from_run(run, temperature=0.0, max_tokens=8)
        prompt = there.encoder.encode([{"role": "user", "content": "1+1=?"}], add_generation_prompt=True)
        assert prompt == here.encoder.encode([{"role": "user", "content": "1+1=?"}], add_generation_prompt=True)
        assert list(there.backend.generate(prompt, 8, 0.0, 1.0, set())) == list(here.backend.generate(prompt, 8, 0.0, 1.0, set()))
        assert there.reply("1+1=?") == here.reply("1+1=?")


def test_cli_export_writes_the_target_and_prints_how_to_run_a_gguf(runs, capsys):
    from orpo_local.cli import main

    run = runs["torch"]
    assert main(["export", str(run), "--to", "gguf", "--quant", "q8_0", "--out", str(run / "exports" / "g")]) == 0
    out = capsys.readouterr().out.splitlines()
    gguf = run / "exports" / "g" / f"{run.name}-q8_0.gguf"
    assert out[0] == str(run / "exports" / "g") and gguf.exists() and (gguf.parent / "Modelfile").exists()
    assert out[2:] == [f"  ollama create {run.name}-q8_0 -f {gguf.parent / 'Modelfile'}", f"  llama-cli -m {gguf}"]
    assert main(["export", str(run), "--to", "peft", "--checkpoint", "step-9"]) == 2
    assert "no checkpoint 'step-9'" in capsys.readouterr().err


def test_runs_tab_export_streams_progress_then_says_where_and_how_to_run_it(runs, tmp_path):
    pytest.importorskip("gradio")
    from orpo_local.ui.engine import Engine
    from orpo_local.ui.tab_runs import export_to

    run = runs["torch"]
    engine = Engine(runs_dir=run.parent, data_dir=tmp_path / "uploads", lang="en")
    notes = list(export_to(engine, str(run), "", "gguf", "q4_0"))
    assert notes[0].startswith(f"Exporting {run.name} (adapter) as gguf q4_0") and "tensors written" in notes[-2]
    folder = run / "exports" / f"{run.name}-gguf-q4_0"
    assert engine.show(folder) in notes[-1] and f"`llama-cli -m {folder / (run.name + '-q4_0.gguf')}`" in notes[-1]
    failed = list(export_to(engine, str(run), "step-9", "peft", "f16"))
    assert failed[-1].startswith("Error: ") and "no checkpoint 'step-9'" in failed[-1]
    assert list(export_to(engine, None, "", "peft", "f16")) == [engine.t("runs.none")]


# ------------------------------------------------------------------ size estimate

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
