"""ChatSession on a tiny random Llama: history reaches the next prompt through the chat template,
from_run loads the run's adapter (or the chosen checkpoint's), cached generation is a plain greedy
decode, seeded sampling repeats, and a character cut between its byte tokens is never kept."""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from orpo_local import ChatSession, TrainConfig, train  # noqa: E402
from orpo_local.backends import get_backend  # noqa: E402
from orpo_local.config import ModelConfig  # noqa: E402
from orpo_local.runs import checkpoints  # noqa: E402
from orpo_local.tokenization import ChatEncoder  # noqa: E402

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not importlib.util.find_spec("mlx_lm"), reason="MLX is not installed"))]
IDS = [1, 5, 9, 200, 7, 42]


@pytest.fixture(scope="module")
def run(tiny, arith, tmp_path_factory):
    """A 3-step torch run with a checkpoint at step 2 and the final adapter at step 3."""
    config = TrainConfig().with_overrides({
        "model.name": str(tiny), "model.backend": "torch", "model.dtype": "float32", "data.path": str(arith),
        "run.runs_dir": str(tmp_path_factory.mktemp("runs")), "optim.max_steps": 3, "optim.batch_size": 4,
        "optim.learning_rate": 1e-2, "optim.warmup_steps": 0, "run.save_every": 2, "run.eval_every": 0, "run.seed": 3})
    return train(config, progress=False).run_dir


def loaded(name: str, tiny):
    """The tiny base model in float32 on backend `name`, for inference."""
    backend = get_backend(name)
    backend.load(ModelConfig(name=str(tiny), dtype="float32"), None, 0, adapter=None, trainable=False)
    return backend


def record_prompts(backend, monkeypatch) -> list[list[int]]:
    """The prompt ids of every generate() call on `backend`, in order."""
    prompts, generate = [], backend.generate

    def recording(prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids))
        return generate(prompt_ids, *args, **kwargs)

    monkeypatch.setattr(backend, "generate", recording)
    return prompts


def last_logits(backend, ids: list[int]) -> np.ndarray:
    """(V,) logits at the last position of one full forward pass, no cache."""
    if backend.name == "torch":
        with torch.no_grad():
            return backend.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float().numpy()
    import mlx.core as mx

    return np.array(backend.model(mx.array([ids]))[0, -1].astype(mx.float32))


def peft_logits(tiny, adapter) -> torch.Tensor:
    """Logits of IDS from plain transformers + peft: the reference for an adapter's weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits


def session_logits(chat) -> torch.Tensor:
    with torch.no_grad():
        return chat.backend.model(torch.tensor([IDS])).logits


# ------------------------------------------------------------------ history

def test_history_reaches_the_next_prompt_through_the_chat_template(tiny, monkeypatch):
    backend = loaded("torch", tiny)
    prompts = record_prompts(backend, monkeypatch)
    chat = ChatSession(backend, temperature=1.0, top_p=1.0, max_tokens=6, seed=0)  # greedy, the tiny model only says "\n"
    encode = ChatEncoder(backend.tokenizer).encode
    first = chat.reply("1+1=?")
    assert len(first.strip()) > 3, "a reply to carry over"
    chat.reply("and 2+2?")
    turns = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": first}, {"role": "user", "content": "and 2+2?"}]
    assert prompts[0] == encode(turns[:1], add_generation_prompt=True)
    assert prompts[1] == encode(turns, add_generation_prompt=True)
    shown = backend.tokenizer.decode(prompts[1])
    assert f"<|im_start|>user\n1+1=?<|im_end|>" in shown and f"<|im_start|>assistant\n{first}<|im_end|>" in shown
    assert shown.index("1+1=?") < shown.index(first) < shown.index("and 2+2?")

    chat.reset()
    chat.reply("3+3?")
    assert prompts[2] == encode([{"role": "user", "content": "3+3?"}], add_generation_prompt=True)


def test_the_system_prompt_leads_every_turn(tiny, monkeypatch):
    backend = loaded("torch", tiny)
    prompts = record_prompts(backend, monkeypatch)
    chat = ChatSession(backend, system="Answer in one word.", temperature=0.0, max_tokens=3)
    chat.reply("hi")
    chat.reply("again")
    for prompt in prompts:
        assert backend.tokenizer.decode(prompt).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")


# ------------------------------------------------------------------ from_run

def test_from_run_uses_the_final_adapter_or_the_chosen_checkpoint(tiny, run):
    step2 = dict(checkpoints(run))[2]
    base = peft_logits(tiny, None)
    final = ChatSession.from_run(run, temperature=0.0, max_tokens=8)
    torch.testing.assert_close(session_logits(final), peft_logits(tiny, run / "adapter"))
    assert (session_logits(final) - base).abs().max() > 1e-2, "the tuned model is not the base model"

    at_step2 = ChatSession.from_run(run, checkpoint=step2, temperature=0.0, max_tokens=8)
    torch.testing.assert_close(session_logits(at_step2), peft_logits(tiny, step2 / "adapter"))
    assert (session_logits(at_step2) - session_logits(final)).abs().max() > 1e-3, "step 2's weights are not the final ones"

    plain = ChatSession(loaded("torch", tiny), temperature=0.0, max_tokens=8)
    torch.testing.assert_close(session_logits(plain), base)
    replies = {name: chat.reply("1+1=?") for name, chat in (("base", plain), ("final", final), ("step 2", at_step2))}
    assert replies["final"] != replies["base"], replies


# ------------------------------------------------------------------ decoding

@pytest.mark.parametrize("name", BACKENDS)
def test_cached_generation_equals_a_greedy_decode_without_cache(tiny, name):
    backend = loaded(name, tiny)
    prompt = ChatEncoder(backend.tokenizer).encode([{"role": "user", "content": "你好，长城有多长？"}], add_generation_prompt=True)
    got = list(backend.generate(prompt, 12, 0.0, 1.0, set(), 0))
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(last_logits(backend, ids).argmax()))
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("name", BACKENDS)
def test_seeded_sampling_repeats_and_the_seed_matters(tiny, name):
    backend = loaded(name, tiny)

    def reply(seed, temperature=1.0, top_p=0.9):
        return ChatSession(backend, temperature=temperature, top_p=top_p, max_tokens=6, seed=seed).reply("写一首诗")

    first = reply(1)
    assert reply(1) == first, "the same seed gives the same sample"
    assert reply(2) != first, "another seed gives another sample"  # near-uniform over 49,152 tokens
    assert reply(2, top_p=1e-6) == reply(None, temperature=0.0), "a tiny top-p keeps only the most likely token"


# ------------------------------------------------------------------ characters cut between byte tokens

def scripted(backend, monkeypatch, script: list[int]) -> None:
    """Make `backend` sample `script` token by token (through its own generate loop and max_tokens)."""
    tokens = iter(script)
    if backend.name == "torch":
        import orpo_local.backends.torch_backend as torch_backend

        monkeypatch.setattr(torch_backend, "_sample", lambda *args: next(tokens, 0))
    else:
        import mlx.core as mx
        import mlx_lm.sample_utils

        monkeypatch.setattr(mlx_lm.sample_utils, "make_sampler", lambda **k: lambda logprobs: mx.array([next(tokens, 0)]))


@pytest.mark.parametrize("name", BACKENDS)
def test_a_character_cut_by_max_tokens_or_a_stop_token_is_dropped_not_kept(tiny, name, monkeypatch):
    backend = loaded(name, tiny)
    tok = backend.tokenizer
    encoder = ChatEncoder(tok)
    head, cut = tok.encode("你好", add_special_tokens=False), tok.encode("长", add_special_tokens=False)
    assert len(cut) == 3 and tok.decode(cut[:2]) == "\ufffd", "长 is three byte tokens in the bundled tokenizer"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cases = [(head + cut, len(head) + 2, "你好"),  # max_tokens lands inside 长
             (head + cut[:2] + [end], 99, "你好"),  # the stop token does
             (head + cut + [end], 99, "你好长")]  # whole: the split character is shown once complete
    prompts = record_prompts(backend, monkeypatch)
    for script, max_tokens, want in cases:
        scripted(backend, monkeypatch, script)
        chat = ChatSession(backend, temperature=0.0, max_tokens=max_tokens)
        pieces = list(chat.stream("说你好"))
        assert "".join(pieces) == want and not any("\ufffd" in p for p in pieces), (script, pieces)
        assert chat.history[-1] == {"role": "assistant", "content": want}

        scripted(backend, monkeypatch, [end])
        chat.reply("再说一遍")
        history = [{"role": "user", "content": "说你好"}, {"role": "assistant", "content": want}, {"role": "user", "content": "再说一遍"}]
        assert prompts[-1] == encoder.encode(history, add_generation_prompt=True)
        assert "\ufffd" not in tok.decode(prompts[-1])
