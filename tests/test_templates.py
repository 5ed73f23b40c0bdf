"""Named chat templates and base models (ORPO_SPEC.md, "Templates"): a tiny random base Llama whose
tokenizer has no chat template and no chat control tokens trains on both backends with `zephyr` and
with `auto`; the run records its template and chat, eval and the merged export (read back with plain
transformers and mlx_lm) use it; a template needing missing tokens is refused naming one that works;
a truncated prompt keeps its template head and role header."""

import json

import pytest

from orpo_local import TrainConfig, train
from orpo_local.chat import ChatSession
from orpo_local.data import PreferencePair
from orpo_local.models import load_tokenizer
from orpo_local.runs import read_json
from orpo_local.templates import TemplateNotUsable, render_named, resolve_template, usable_templates
from orpo_local.tokenization import ChatEncoder, tokenize_pairs
from orpo_local.train import TrainingError
from tiny import base_tokenizer, tiny_llama

HI = [{"role": "user", "content": "Hi"}]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


@pytest.fixture(scope="module")
def base_tok():
    return base_tokenizer()


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, base_tok):
    """A 2-layer random Llama saved with the base tokenizer: no chat_template anywhere in its folder."""
    folder = tiny_llama(tmp_path_factory.mktemp("base"), vocab_size=len(base_tok), tokenizer=base_tok)
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    assert not (folder / "chat_template.jinja").exists()
    return folder


def rendered(tok, name, messages, gen=False):
    return tok.apply_chat_template(messages, chat_template=resolve_template(tok, name)[1], tokenize=False,
                                   add_generation_prompt=gen)


def test_named_templates_render_their_formats_with_the_tokenizers_own_bos_and_eos(base_tok, smol):
    # a base tokenizer that adds <s> gets it in front; </s> is its EOS
    assert rendered(base_tok, "zephyr", CHAT) == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n"
    assert rendered(base_tok, "zephyr", HI, gen=True) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    assert rendered(base_tok, "plain", CHAT) == "<s>Be brief.\n\nHuman: Hi\n\nAssistant: Yo</s>\n\n"
    assert rendered(base_tok, "plain", HI, gen=True) == "<s>Human: Hi\n\nAssistant:"
    # SmolLM2 adds no BOS when encoding, and its EOS is <|im_end|>
    assert rendered(smol, "zephyr", CHAT) == "<|system|>\nBe brief.<|im_end|>\n<|user|>\nHi<|im_end|>\n<|assistant|>\nYo<|im_end|>\n"
    assert rendered(smol, "chatml", CHAT) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert rendered(smol, "qwen", HI, gen=True) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                                    "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert resolve_template(smol, "auto") == ("auto", smol.chat_template)


def test_auto_on_a_tokenizer_without_a_template_is_plain(base_tok):
    assert resolve_template(base_tok, "auto") == ("plain", render_named(base_tok, "plain"))
    assert usable_templates(base_tok) == ["auto", "zephyr", "plain"]


@pytest.mark.parametrize("name", ["chatml", "llama3", "qwen"])
def test_a_template_needing_missing_control_tokens_is_refused_naming_one_that_works(base_tok, smol, name):
    with pytest.raises(TemplateNotUsable, match=r"lacks .* use data.template=zephyr \(this tokenizer can use: zephyr, plain\)"):
        resolve_template(base_tok, name)
    if name == "llama3":
        with pytest.raises(TemplateNotUsable, match=r"<\|begin_of_text\|>.*use data.template=auto"):
            resolve_template(smol, name)


def test_zephyr_end_of_turn_is_the_eos_target_and_the_prompt_a_prefix(base_tok):
    enc = ChatEncoder(base_tok, "zephyr")
    pair = PreferencePair(prompt=HI, chosen="It is four.", rejected="Five.")
    (tp,), stats = tokenize_pairs([pair], enc, 128, 32)
    assert base_tok.decode(tp.prompt) == "<s><|user|>\nHi</s>\n<|assistant|>\n" and tp.prompt[0] == base_tok.bos_token_id
    assert tp.chosen[-1] == base_tok.eos_token_id and base_tok.decode(tp.chosen) == "It is four.</s>"
    assert stats.boundary_fallbacks == 0


LONG_TURNS = [{"role": "user", "content": "An old question about the fox. " * 30},
              {"role": "assistant", "content": "An old answer."},
              {"role": "user", "content": "And now: what is two plus two?"}]


@pytest.mark.parametrize("which", ["bundled", "zephyr"])
def test_a_truncated_multi_turn_prompt_keeps_its_head_and_role_header(which, base_tok, smol):
    tok, template = (smol, "auto") if which == "bundled" else (base_tok, "zephyr")
    enc = ChatEncoder(tok, template)
    pair = PreferencePair(prompt=LONG_TURNS, chosen="It is four.", rejected="Five.", system="Be brief.")
    (full,), _ = tokenize_pairs([pair], enc, 10_000, 32)
    later = PreferencePair(prompt=LONG_TURNS[2:], chosen=pair.chosen, rejected=pair.rejected, system=pair.system)
    (short,), _ = tokenize_pairs([later], enc, 10_000, 32)
    # room for the later turns and a little of the old question: dropping that turn would go below max_prompt_length
    max_prompt = len(short.prompt) + len(enc.encode(LONG_TURNS[1:2])) + 12
    max_length = max_prompt + len(full.chosen)
    (tp,), stats = tokenize_pairs([pair], enc, max_length, max_prompt)
    assert len(full.prompt) + len(full.chosen) > max_length and stats.truncated == 1
    assert max_prompt - 3 <= len(tp.prompt) <= max_prompt and len(tp.prompt) + len(tp.chosen) <= max_length
    text = tok.decode(tp.prompt)
    head = {"bundled": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", "zephyr": "<s><|system|>\nBe brief.</s>\n<|user|>\n"}[which]
    tail = {"bundled": "<|im_start|>user\nAnd now: what is two plus two?<|im_end|>\n<|im_start|>assistant\n",
            "zephyr": "<|user|>\nAnd now: what is two plus two?</s>\n<|assistant|>\n"}[which]
    assert text.startswith(head) and text.endswith(tail) and "An old answer." in text
    kept = text[len(head):].split("An old answer.")[0]
    assert 0 < len(kept) < len(LONG_TURNS[0]["content"]) and "fox" in kept  # cut inside the oldest kept text
    assert tp.chosen == full.chosen  # the answers are untouched when the prompt cut is enough


def config(model, arith, runs, backend, template, **over):
    return TrainConfig().with_overrides({
        "model.name": str(model), "model.backend": backend, "model.dtype": "float32", "data.path": str(arith),
        "run.runs_dir": str(runs), "optim.max_steps": 2, "optim.batch_size": 2, "run.eval_every": 0,
        "data.val_fraction": 0.1, "data.val_min_pairs": 0, "data.template": template, **over})


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_base_model_trains_with_zephyr_and_everything_after_uses_it(backend, base_model, base_tok, arith, tmp_path):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "peft")
    from transformers import AutoTokenizer

    from orpo_local.export import export_adapter, export_merged

    run = train(config(base_model, arith, tmp_path, backend, "zephyr"), progress=False)
    assert run.status == "finished" and run.step == 2
    d = run.run_dir
    text = (d / "chat_template.jinja").read_text()
    assert text == render_named(base_tok, "zephyr") and read_json(d / "run.json")["template"] == "zephyr"
    # chat formats prompts through the recorded template
    session = ChatSession.from_run(d, max_tokens=3, temperature=0)
    prompt = session.encoder.encode(session.messages("Hi"), add_generation_prompt=True)
    assert base_tok.decode(prompt) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    reply = session.reply("Hi")
    assert session.history == [HI[0], {"role": "assistant", "content": reply}]
    # the merged folder carries it: plain transformers formats a chat the way the model was trained
    merged = AutoTokenizer.from_pretrained(export_merged(d, tmp_path / "merged"))
    assert merged.chat_template == text
    assert merged.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    if backend == "mlx":
        from mlx_lm import load

        _, wrapper = load(str(tmp_path / "merged"))
        assert wrapper.apply_chat_template(HI, tokenize=False, add_generation_prompt=True) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    import zipfile

    with zipfile.ZipFile(export_adapter(d)) as zf:
        assert zf.read("chat_template.jinja").decode() == text


def test_a_base_model_trains_with_auto_as_plain(base_model, base_tok, arith, tmp_path):
    pytest.importorskip("peft")
    run = train(config(base_model, arith, tmp_path, "torch", "auto"), progress=False)
    assert run.status == "finished"
    assert (run.run_dir / "chat_template.jinja").read_text() == render_named(base_tok, "plain")
    assert read_json(run.run_dir / "run.json")["template"] == "plain"


def test_a_template_the_tokenizer_cannot_use_is_refused_before_a_model_loads(base_model, arith, tmp_path):
    class NoBackend:
        def load(self, *a, **k):
            raise AssertionError("the model must not load")

    with pytest.raises(TrainingError, match=r"'chatml' needs the control token\(s\) <\|im_start\|>, <\|im_end\|>.*data.template=zephyr"):
        train(config(base_model, arith, tmp_path, "torch", "chatml"), progress=False, backend=NoBackend())
    assert not list(tmp_path.iterdir()), "no run folder is created for a refused template"
