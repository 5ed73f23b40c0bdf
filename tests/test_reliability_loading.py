"""What loading a model, an adapter or a checkpoint may execute (docs/reliability.md, item 6, loading).

Each hostile folder plants a payload that would create a marker file if any code of the folder ran
or any pickle in it were unpickled in full; the marker must never appear. Optimizer state loads with
weights_only=True and weights from safetensors only, unless model.allow_pickle_weights.
"""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local.backends.torch_backend import TorchBackend  # noqa: E402
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig  # noqa: E402


class Payload:
    """Unpickling this opens (creates) `marker`: any full unpickle of a file holding it leaves the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def copy_model(tiny, folder):
    shutil.copytree(tiny, folder)
    return folder


def test_a_checkpoints_training_state_is_plain_tensors_loadable_without_unpickling(tiny, tmp_path):
    """optimizer.pt holds only tensors, numbers and containers, so `torch.load(weights_only=True)` reads it:
    the backend loads it that way."""
    backend = TorchBackend()
    backend.load(ModelConfig(name=str(tiny), dtype="float32"), LoraConfig(), 0)
    backend.init_optimizer(OptimConfig())
    for p in backend.model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    backend.optimizer.step()  # Adam now has moments and a step count
    backend.save_state(tmp_path)
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(state) >= {"optimizer", "torch_rng"} and state["optimizer"]["state"]


def test_a_hostile_optimizer_state_is_not_unpickled(tiny, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "torch_rng": torch.get_rng_state()}, tmp_path / "optimizer.pt")
    backend = TorchBackend()
    backend.load(ModelConfig(name=str(tiny), dtype="float32"), LoraConfig(), 0)
    backend.init_optimizer(OptimConfig())
    try:
        backend.load_state(tmp_path)
    except Exception:  # noqa: BLE001 - refusing is right; running the payload is not
        pass
    assert not marker.exists(), "loading a checkpoint ran code from its optimizer.pt"


def test_a_models_own_python_code_never_runs(tiny, tmp_path):
    """A model folder whose config asks for its own modelling code (auto_map): it is not imported
    (trust_remote_code stays False), so its code never runs."""
    folder = copy_model(tiny, tmp_path / "remote")
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    try:
        TorchBackend().load(ModelConfig(name=str(folder), dtype="float32"), LoraConfig(), 0)
    except Exception:  # noqa: BLE001 - refusing is right too
        pass
    assert not marker.exists(), "the model folder's own code ran"


def test_pickled_weights_are_never_unpickled_in_full(tiny, tmp_path):
    """A folder with pytorch_model.bin (a pickle) holding a payload and no safetensors: whatever the load
    does with it, the payload does not run (transformers reads .bin with weights_only=True)."""
    folder = copy_model(tiny, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": Payload(marker)}, folder / "pytorch_model.bin")
    try:
        TorchBackend().load(ModelConfig(name=str(folder), dtype="float32"), LoraConfig(), 0)
    except Exception:  # noqa: BLE001
        pass
    assert not marker.exists(), "a pickled weights file ran code"


def test_weights_load_from_safetensors_only_unless_asked(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = copy_model(tiny, tmp_path / "bin-only")
    torch.save(AutoModelForCausalLM.from_pretrained(tiny).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(Exception, match="safetensors"):
        TorchBackend().load(ModelConfig(name=str(folder), dtype="float32"), LoraConfig(), 0)
