"""RoPE settings of transformers 5 config folders reach mlx-lm: `mlx_model_config` lifts the nested
`rope_parameters` into the keys each mlx-lm ModelArgs reads, and a merged export keeps them."""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
transformers = pytest.importorskip("transformers")

from mlx_lm.models.rope_utils import Llama3RoPE, SuScaledRoPE, YarnRoPE  # noqa: E402
from mlx_lm.utils import _get_classes, load_config, load_model  # noqa: E402

from orpo_local.backends.mlx_backend import MLXBackend, mlx_model_config  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def gemma3(**kw):  # layers 2 and 5 global (theta 1e6, linear x8 as in Gemma 3 4B), the others local (1e4)
    return transformers.Gemma3TextConfig(num_hidden_layers=6, sliding_window_pattern=3, head_dim=16,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0}, **SMALL, **kw)


def llama3():
    return transformers.LlamaConfig(num_hidden_layers=2, max_position_embeddings=131072, rope_parameters=dict(LLAMA3), **SMALL)


def qwen2_yarn():
    return transformers.Qwen2Config(num_hidden_layers=2, max_position_embeddings=131072, **SMALL,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 2e6, "factor": 4.0,
                                                     "original_max_position_embeddings": 32768})


def phi3_longrope():  # head_dim 16, 12 rotary dims: 6 factors
    return transformers.Phi3Config(num_hidden_layers=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": 250000.0, "partial_rotary_factor": 0.75,
                                                    "short_factor": [1.0] * 6, "long_factor": [3.0] * 6}, **SMALL)


def phi3_partial():
    return transformers.Phi3Config(num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 250000.0,
                                                                         "partial_rotary_factor": 0.5}, **SMALL)


def saved(cfg, folder):
    cfg.save_pretrained(folder)
    return folder


def mlx_args(folder):
    """What mlx-lm's load hands to the model's ModelArgs, with our overrides."""
    config = load_config(folder)
    config.update(mlx_model_config(str(folder)))
    model_cls, args_cls = _get_classes(config)
    return args_cls.from_dict(config), model_cls


def hf_inv_freq(cfg):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, _ = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")
    return inv_freq.numpy()


def test_gemma3_global_and_local_layers_get_their_own_theta(tmp_path):
    folder = saved(gemma3(), tmp_path)
    assert "rope_theta" not in json.loads((folder / "config.json").read_text())  # transformers 5 nests it by layer type
    args, model_cls = mlx_args(folder)
    assert args.rope_theta == 1e6 and args.rope_local_base_freq == 1e4
    assert args.rope_scaling["factor"] == 8.0 and args.rope_scaling["rope_type"] == "linear"
    layers = model_cls(args).layers
    assert [(layer.self_attn.rope.base, layer.self_attn.rope.scale) for layer in layers] == [
        (1e4, 1.0), (1e4, 1.0), (1e6, 1 / 8), (1e4, 1.0), (1e4, 1.0), (1e6, 1 / 8)]


def test_multimodal_gemma3_text_config_is_lifted(tmp_path):
    folder = saved(transformers.Gemma3Config(text_config=gemma3().to_dict()), tmp_path)
    text = mlx_model_config(str(folder))["text_config"]
    assert text["rope_theta"] == 1e6 and text["rope_local_base_freq"] == 1e4 and text["rope_scaling"]["factor"] == 8.0
    assert text["hidden_size"] == 64  # the rest of text_config is kept: mlx-lm's update is shallow


def test_llama3_scaling_reaches_the_model_with_transformers_frequencies(tmp_path):
    cfg = llama3()
    args, model_cls = mlx_args(saved(cfg, tmp_path))
    assert args.rope_theta == 500000.0
    assert {k: args.rope_scaling[k] for k in LLAMA3 if k != "rope_theta"} == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    rope = model_cls(args).layers[0].self_attn.rope
    assert isinstance(rope, Llama3RoPE)
    np.testing.assert_allclose(1 / np.array(rope._freqs), hf_inv_freq(cfg), rtol=1e-5)


def test_qwen2_yarn_reaches_the_model(tmp_path):
    args, model_cls = mlx_args(saved(qwen2_yarn(), tmp_path))
    assert args.rope_theta == 2e6 and args.rope_scaling["factor"] == 4.0
    assert args.rope_scaling["original_max_position_embeddings"] == 32768
    assert isinstance(model_cls(args).layers[0].self_attn.rope, YarnRoPE)


def test_phi3_longrope_and_partial_rotary_factor_inside_rope_parameters(tmp_path):
    args, model_cls = mlx_args(saved(phi3_longrope(), tmp_path))
    assert args.rope_theta == 250000.0 and args.partial_rotary_factor == 0.75
    assert args.rope_scaling["type"] == "longrope" and args.rope_scaling["long_factor"] == [3.0] * 6
    rope = model_cls(args).layers[0].self_attn.rope
    assert isinstance(rope, SuScaledRoPE) and rope.dim == 12

    args, model_cls = mlx_args(saved(phi3_partial(), tmp_path / "partial"))
    assert args.rope_theta == 250000.0 and args.partial_rotary_factor == 0.5 and args.rope_scaling is None
    rope = model_cls(args).layers[0].self_attn.rope
    assert (rope.dims, rope.base) == (8, 250000.0)


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def test_merged_export_keeps_gemma3_rope_for_plain_mlx_lm_and_transformers(tmp_path):
    src = saved(gemma3(), tmp_path / "base")
    args, model_cls = mlx_args(src)
    backend = MLXBackend()
    backend.model, backend.path, backend.tokenizer = model_cls(args), str(src), _NoTokenizer()
    backend.save_merged(tmp_path / "merged")

    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["rope_theta"] == 1e6 and written["rope_local_base_freq"] == 1e4 and written["rope_scaling"]["factor"] == 8.0
    plain, _ = load_model(tmp_path / "merged")  # mlx-lm alone, no overrides
    assert [layer.self_attn.rope.base for layer in plain.layers] == [1e4, 1e4, 1e6, 1e4, 1e4, 1e6]
    back = transformers.AutoConfig.from_pretrained(tmp_path / "merged")  # transformers reads the same RoPE back
    for layer_type, want in gemma3().rope_parameters.items():
        assert {k: back.rope_parameters[layer_type][k] for k in want} == want
