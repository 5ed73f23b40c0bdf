"""Config: every field documented, validation lists all problems, YAML round trip, overrides."""

import dataclasses

import pytest

from orpo_local.config import SECTIONS, ConfigError, TrainConfig, field_info, resolve_key


def test_every_field_has_a_default_and_help():
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_defaults_are_the_measured_recipe_and_work_offline():
    cfg = TrainConfig()  # docs/quality.md section 1: the sweep that chose these
    assert (cfg.orpo.lambda_, cfg.optim.learning_rate, cfg.optim.epochs, cfg.orpo.nll_on_prompt) == (2.0, 1e-3, 1.0, False)
    assert (cfg.optim.warmup_steps, cfg.optim.schedule, cfg.data.val_fraction, cfg.data.val_min_pairs) == (3, "cosine", 0.1, 32)
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "zh-sample"
    assert "0 is plain SFT" in field_info("orpo", "lambda_").metadata["help"]


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig().with_overrides(["optim.learning_rate=5e-5", "lambda_=0.25", "lora.target_modules=q_proj,v_proj"])
    cfg.to_yaml(tmp_path / "c.yaml")
    again = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert again == cfg
    assert again.optim.learning_rate == 5e-5 and again.orpo.lambda_ == 0.25 and again.lora.target_modules == ["q_proj", "v_proj"]


def test_validation_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"optim": {"learning_rate": -1, "batch_size": 0}, "lora": {"rank": 0}, "bogus": {}})
    msg = str(err.value)
    for part in ("learning_rate must be > 0", "batch_size must be >= 1", "rank must be >= 1", "unknown section 'bogus'"):
        assert part in msg
    with pytest.raises(ConfigError, match="schedule='sine' is not one of"):
        TrainConfig().with_overrides(["schedule=sine"])
    with pytest.raises(ConfigError, match="must be true or false"):
        TrainConfig().with_overrides(["nll_on_prompt=maybe"])
    with pytest.raises(ConfigError, match="max_prompt_length must be in"):
        TrainConfig().with_overrides(["data.max_prompt_length=600"])
    (tmp_path / "bad.yaml").write_text("optim:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.epochs must be a number"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_typed_overrides_are_taken_as_given_and_bad_yaml_is_explained():
    cfg = TrainConfig().with_overrides({"data.path": "prefs #2.jsonl", "run.runs_dir": "~"})
    assert cfg.data.path == "prefs #2.jsonl" and cfg.run.runs_dir == "~"  # no YAML comment/None surprises
    with pytest.raises(ConfigError, match="cannot read the value"):
        TrainConfig().with_overrides(["lora.target_modules=[q_proj"])


def test_override_keys_resolve_or_explain():
    assert resolve_key("learning-rate") == ("optim", "learning_rate")
    assert resolve_key("model.name") == ("model", "name")
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve_key("optim.nope")
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_key("name")  # model.name and run.name
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().with_overrides(["learning_rate"])
