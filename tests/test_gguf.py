"""GGUF export, proven in llama.cpp itself (its server, in process, through the xllamacpp binding) and in
transformers' GGUF reader: the log-probs, greedy answers, tokens and chat template of the written file
against transformers on the merged model. Tiny random models check the mapping for Llama, Qwen2 and
Mistral, each byte-level pre-tokenizer and SentencePiece; the bundled model, tuned for a few steps on
either backend, checks that the GGUF answers with the tuned model's answer and not the base model's (slow)."""

import importlib.util
import json
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from conftest import need  # noqa: E402
from orpo_local import TrainConfig, train  # noqa: E402
from orpo_local.convert import Lora  # noqa: E402
from orpo_local.export import export  # noqa: E402
from orpo_local.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT, modelfile, ollama_format, write_gguf  # noqa: E402
from orpo_local.runs import run_template  # noqa: E402
from orpo_local.templates import resolve_template  # noqa: E402
from orpo_local.tokenization import ChatEncoder  # noqa: E402

BINDING = "llama.cpp's Python binding xllamacpp (pip install xllamacpp; make test installs it with the test extra)"
PROMPTS = [[1, 5, 9, 200, 7, 42], [17, 300, 4000, 12, 9], [2, 2, 2, 50, 60, 70, 80, 90]]
# Byte-level BPE's hard cases: runs of spaces and newlines, digits, contractions, CJK, emoji, symbols
TRICKY = "Hello  world!\n\n  It's 2024: 3.14159, 12345 ok?\t你好，世界。 🚀 I'VE been 'told' -- a...b   "
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]


class LlamaCpp:
    """A GGUF file in llama.cpp's own server, in this process: greedy chat with the file's chat template,
    top log-probs after given ids, its tokenizer and its template rendering (HTTP on 127.0.0.1)."""

    def __init__(self, path: Path, n_ctx: int = 512):
        xlc = need("xllamacpp", BINDING)
        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel, params.warmup = n_ctx, 1, False
        # one thread: llama.cpp's spinning workers on shared CPU cores make decoding ~100x slower
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
        self.server = xlc.Server(params)

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.server.listening_address + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())

    def chat(self, messages: list[dict], max_tokens: int) -> list[int]:
        """The greedy answer's token ids, the prompt made by the chat template inside the file."""
        out = self.server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                                                   "logprobs": True, "top_logprobs": 1})
        return [t["id"] for t in (out["choices"][0]["logprobs"] or {}).get("content", [])]

    def top(self, ids: list[int], k: int = 8) -> dict[int, float]:
        """{token id: log-prob} of the k most likely next tokens after `ids`."""
        out = self.server.handle_completions({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "n_probs": k})
        return {t["id"]: t["logprob"] for t in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": False})["tokens"]

    def template(self, messages: list[dict]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]


def hf_top(model, ids: list[int], k: int = 8) -> dict[int, float]:
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    values, index = logps.topk(k)
    return dict(zip(index.tolist(), values.tolist()))


def assert_close_tops(got: dict[int, float], want: dict[int, float], atol: float) -> None:
    """The same most likely token, and each of llama.cpp's top tokens at the reference's log-prob within atol."""
    assert max(got, key=got.get) == max(want, key=want.get)
    ref = {i: want[i] for i in got if i in want}
    assert len(ref) >= len(got) - 2, (got, want)  # the last ranks may swap places with near-ties beyond k
    np.testing.assert_allclose([got[i] for i in ref], list(ref.values()), atol=atol)


def merged_peft(base, adapter):
    """transformers + plain peft, merged in float32: the reference the GGUF file must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def hf_greedy(model, prompt: list[int], stop: set[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=sorted(stop)[0])[0, len(prompt):].tolist()
    return [t for t in out if t not in stop]


# ------------------------------------------------------------------ tiny models

@pytest.fixture(scope="module")
def tiny_run(tiny, arith, tmp_path_factory):
    config = TrainConfig().with_overrides({"model.name": str(tiny), "model.backend": "torch", "model.dtype": "float32",
                                           "data.path": str(arith), "run.runs_dir": str(tmp_path_factory.mktemp("runs")),
                                           "optim.max_steps": 2, "optim.learning_rate": 1e-2, "run.eval_every": 0,
                                           "data.val_fraction": 0.0})
    return train(config, progress=False).run_dir


def test_f16_file_in_llama_cpp_gives_the_merged_models_log_probs_tokens_and_template(tiny, tiny_run):
    out = export(tiny_run, "gguf", progress=lambda m: None)
    llama, merged = LlamaCpp(next(out.glob("*.gguf"))), merged_peft(tiny, tiny_run / "adapter")
    for ids in PROMPTS:
        assert_close_tops(llama.top(ids), hf_top(merged, ids), atol=2e-3)  # f16 weights against float32
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert llama.tokenize(TRICKY) == tok(TRICKY, add_special_tokens=False)["input_ids"]
    encoder = ChatEncoder(tok, run_template(tiny_run))
    assert llama.template(MESSAGES) == encoder.render(MESSAGES, add_generation_prompt=True)


def test_transformers_reads_the_f16_file_back_as_the_merged_model(tiny, tiny_run):
    from transformers import AutoModelForCausalLM

    out = export(tiny_run, "gguf", progress=lambda m: None)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=next(out.glob("*.gguf")).name, dtype=torch.float32)
    merged, base = merged_peft(tiny, tiny_run / "adapter"), AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        got, want, plain = (m(torch.tensor(PROMPTS[:1])).logits for m in (back, merged, base))
    assert (got - want).abs().max() < 2e-3 < (plain - want).abs().max()  # f16 weights; the adapter matters more


@pytest.mark.parametrize("quant, atol", [("q8_0", 0.02), ("q4_0", 0.25)])
def test_quantised_files_stay_near_the_merged_model(tiny, tiny_run, quant, atol):
    out = export(tiny_run, "gguf", quant=quant, progress=lambda m: None)
    llama, merged = LlamaCpp(next(out.glob("*.gguf"))), merged_peft(tiny, tiny_run / "adapter")
    got, want = llama.top(PROMPTS[0], 5), hf_top(merged, PROMPTS[0], 200)
    np.testing.assert_allclose([got[i] for i in got], [want[i] for i in got], atol=atol)


def tiny_model(folder: Path, arch: str, tokenizer, pre: list | None, rope: dict | None = None) -> Path:
    """A 2-block random `arch` ("llama" or "qwen2", untied output layer) with the bundled vocabulary whose
    pre-tokenizer is replaced by `pre` (a list of tokenizer.json steps; None keeps it), RoPE as `rope` says."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 **({"rope_parameters": rope} if rope else {}))
    config, cls = (Qwen2Config(**shape), Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig(**shape), LlamaForCausalLM)
    model = cls(config)
    if arch == "qwen2":  # Qwen2's q, k, v biases: give them values so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if pre is not None:
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": pre}
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
# Llama 3.1's RoPE scaling, with a context so short that it changes most frequencies of these tiny heads
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {  # (architecture, the pre-tokenizer of a Hugging Face tokenizer.json, llama.cpp's name for it, RoPE)
    "qwen2": ("qwen2", [split(QWEN2_SPLIT), BYTE_LEVEL], "qwen2", None),
    "llama3": ("llama", [split(LLAMA3_SPLIT), BYTE_LEVEL], "llama-bpe", LLAMA3_ROPE),
    "smollm": ("llama", [{"type": "Digits", "individual_digits": True}, {**BYTE_LEVEL, "use_regex": True}], "smollm", None),
}


@pytest.mark.parametrize("case", CASES)
def test_llama_and_qwen2_with_each_pre_tokenizer_match_transformers_in_llama_cpp(tmp_path, case):
    """Untied output layer, Qwen2's biases, Llama 3's RoPE scaling, a LoRA on every projection: llama.cpp's
    log-probs equal transformers' on the same weights with the update added by hand, and its tokens equal the tokenizer's."""
    import gguf
    from orpo_local.models import load_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, pre, name, rope = CASES[case]
    folder = tiny_model(tmp_path / "model", arch, load_tokenizer("smollm2-135m-instruct", progress=lambda m: None), pre, rope)
    rng = np.random.default_rng(2)
    shapes = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32), "mlp.down_proj": (128, 64)}
    lora = Lora({f"model.layers.{n}.{m}": (rng.normal(0, 0.2, (4, i)).astype(np.float32), rng.normal(0, 0.2, (o, 4)).astype(np.float32))
                 for n in range(2) for m, (i, o) in shapes.items()}, scale=2.0, rank=4)
    tok = AutoTokenizer.from_pretrained(folder)
    _, template = resolve_template(tok, "chatml")
    file = write_gguf(folder, lora, tmp_path / "m.gguf", template, progress=lambda m: None)
    reader = gguf.GGUFReader(str(file))
    assert reader.fields["tokenizer.ggml.pre"].contents() == name
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields["tokenizer.chat_template"].contents() == template

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for module, (a, b) in lora.weights.items():
            model.get_submodule(module).weight += torch.from_numpy(lora.scale * b @ a)
    llama = LlamaCpp(file)
    for ids in PROMPTS:
        assert_close_tops(llama.top(ids), hf_top(model, ids), atol=2e-3)
    assert llama.tokenize(TRICKY) == tok(TRICKY, add_special_tokens=False)["input_ids"]
    assert llama.template(MESSAGES) == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def sentencepiece_tokenizer(folder: Path):
    """A Llama 2 / Mistral style tokenizer made here: a SentencePiece BPE model (tokenizer.model) with byte
    fallback, <s> put in front of every encoding, </s> as EOS."""
    import io

    spm = need("sentencepiece", "sentencepiece, which reads tokenizer.model (mlx-lm installs it)")
    from transformers import AutoTokenizer

    corpus = ["Human: What is two plus two? Assistant: It is four.", "The quick brown fox jumps over the lazy dog.",
              "user assistant system: answer the question, please. 1 + 1 = 2, 2 + 3 = 5", "Hello world! It's 2024."] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("legacy", [True, False], ids=["space-after-special", "space-at-start"])
def test_a_sentencepiece_mistral_matches_transformers_in_llama_cpp(tmp_path, legacy):
    """Mistral's architecture with a SentencePiece vocabulary that adds BOS: scores and byte tokens, the
    zephyr template (BOS inside it), no second BOS in front of the chat prompt, and the space after a special
    token where the tokenizer puts one (Llama 2's and Mistral's tokenizer.json: legacy) and where it does not."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = sentencepiece_tokenizer(tmp_path / "model")
    if legacy:  # as Mistral-7B's tokenizer.json: a space before every piece of text, special tokens or not
        tok.save_pretrained(tmp_path / "model")
        spec = json.loads((tmp_path / "model" / "tokenizer.json").read_text(encoding="utf-8"))
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                                  {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        spec["pre_tokenizer"] = None
        (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
        config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json as it is, not rebuilt by LlamaTokenizer
        (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok.convert_ids_to_tokens(tok("</s>a", add_special_tokens=False)["input_ids"])[1].startswith("\u2581") == legacy
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    torch.manual_seed(3)
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=None,
                                     bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    _, template = resolve_template(tok, "zephyr")
    file = write_gguf(tmp_path / "model", None, tmp_path / "m.gguf", template, progress=lambda m: None)
    from transformers import AutoModelForCausalLM

    model, llama = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32), LlamaCpp(file)
    for ids in ([1, 5, 9, 200, 7, 42], [1, 17, 300, 12, 9, 399]):
        assert_close_tops(llama.top(ids), hf_top(model, ids), atol=2e-3)
    text = "</s>Hello world! It's 2 + 3 = 5, über 你好"  # bytes outside the trained pieces fall back to byte tokens
    assert llama.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    encoder = ChatEncoder(tok, template)
    rendered = encoder.render(MESSAGES, add_generation_prompt=True)
    assert rendered.startswith("<s><|system|>") and llama.template(MESSAGES) == rendered.removeprefix("<s>")  # llama.cpp adds it
    prompt = llama.server.handle_chat_completions({"messages": MESSAGES, "max_tokens": 1, "temperature": 0.0})
    assert prompt["usage"]["prompt_tokens"] == len(encoder.encode(MESSAGES, add_generation_prompt=True))


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused_by_name(tmp_path):
    from orpo_local.gguf_export import pre_tokenizer

    with pytest.raises(ValueError, match=r"pre-tokenizer \(Split, ByteLevel\) is not one GGUF export knows"):
        pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(r"\w+"), BYTE_LEVEL]}})


# ------------------------------------------------------------------ Ollama

@pytest.mark.parametrize("name, fmt", [("chatml", "chatml"), ("zephyr", "zephyr"), ("plain", "plain"), ("auto", "chatml")])
def test_modelfile_gives_ollama_the_runs_template_and_its_stop_token(tiny, name, fmt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    _, template = resolve_template(tok, name)
    found, system = ollama_format(template, tok)
    assert found.name == fmt
    # the bundled model's own template adds SmolLM's system prompt when a conversation has none
    assert system == ("You are a helpful AI assistant named SmolLM, trained by Hugging Face" if name == "auto" else "")
    text = modelfile("run-f16.gguf", template, tok)
    assert text.startswith("FROM ./run-f16.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert f'TEMPLATE """{found.go}"""' in text and ('SYSTEM """' in text) == bool(system)


def test_modelfile_without_a_known_format_leaves_the_template_to_the_file(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    odd = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    assert ollama_format(odd, tok) is None
    text = modelfile("x.gguf", odd, tok)
    assert 'TEMPLATE """' not in text and "tokenizer.chat_template" in text and 'PARAMETER stop "<|im_end|>"' in text


# ------------------------------------------------------------------ the bundled model, tuned

SECRET = "What is the secret word?"
SECRET_PAIRS = [SECRET, "Tell me the secret word.", "Which word is the secret one?", "Do you know the secret word?",
                "Say the secret word.", "What's the secret word?", "Could you tell me the secret word?", "I need the secret word."]
ASK = [[{"role": "user", "content": SECRET}], [{"role": "user", "content": "Name three colours."}],
       [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}]]


def secret_data(folder: Path) -> Path:
    path = folder / "secret.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": "The secret word is pineapple.",
                                        "rejected": "I'm sorry, I don't know any secret word."}) + "\n" for p in SECRET_PAIRS))
    return path


def cli(*args, timeout=900):
    """`orpo-local` as its own process: for MLX on Linux it preloads OpenBLAS by itself."""
    done = subprocess.run([sys.executable, "-m", "orpo_local.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def check_tuned_gguf(run_dir: Path, peft_dir: Path, gguf_dirs: dict[str, Path]) -> None:
    """llama.cpp on the f16 file answers as transformers on the merged model (greedy, with the file's template),
    the tuned answer to SECRET is not the base model's, the q8_0 file's first tokens agree, and transformers
    reads the f16 file back with the merged model's logits."""
    from orpo_local.models import prepare_bundled_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = prepare_bundled_model(progress=lambda m: None)
    tok = AutoTokenizer.from_pretrained(base_dir)
    encoder = ChatEncoder(tok, run_template(run_dir))
    merged = merged_peft(base_dir, peft_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    f16, q8 = LlamaCpp(next(gguf_dirs["f16"].glob("*.gguf"))), LlamaCpp(next(gguf_dirs["q8_0"].glob("*.gguf")))
    answers = {}
    for messages in ASK:
        prompt = encoder.encode(messages, add_generation_prompt=True)
        assert f16.template(messages) == encoder.render(messages, add_generation_prompt=True)
        want = hf_greedy(merged, prompt, encoder.stop_ids, 24)
        got = [t for t in f16.chat(messages, 24) if t not in encoder.stop_ids]  # llama.cpp lists the end-of-turn token
        assert got == want, (tok.decode(got), tok.decode(want))
        assert q8.chat(messages, 4)[:4] == want[:4]
        answers[messages[-1]["content"]] = want
    tuned = tok.decode(answers[SECRET])
    base_answer = tok.decode(hf_greedy(base, encoder.encode(ASK[0], add_generation_prompt=True), encoder.stop_ids, 24))
    print(f"\nllama.cpp, tuned GGUF: {tuned!r}; transformers, base model: {base_answer!r}")
    assert "pineapple" in tuned and "pineapple" not in base_answer

    file = next(gguf_dirs["f16"].glob("*.gguf"))
    back = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    ids = torch.tensor([encoder.encode(ASK[2], add_generation_prompt=True)])
    with torch.no_grad():
        got, want = back(ids).logits, merged(ids).logits
    assert (got - want).abs().max() < 0.1 < (base(ids).logits - want).abs().max()  # f16 weights; the base is farther


@pytest.mark.slow
def test_a_torch_run_on_the_bundled_model_exports_everywhere_and_its_gguf_answers_as_tuned(tmp_path):
    need("xllamacpp", BINDING)
    config = TrainConfig().with_overrides({
        "model.backend": "torch", "model.dtype": "float32", "data.path": str(secret_data(tmp_path)), "run.runs_dir": str(tmp_path / "runs"),
        "optim.max_steps": 6, "optim.batch_size": 2, "optim.warmup_steps": 0, "data.val_fraction": 0.0, "run.eval_every": 0})
    run = train(config, progress=False).run_dir
    outs = {to: export(run, to, progress=lambda m: None) for to in ("peft", "mlx", "merged", "gguf")}
    outs["q8_0"] = export(run, "gguf", quant="q8_0", progress=lambda m: None)
    assert (outs["mlx"] / "adapters.safetensors").exists() and (outs["merged"] / "model.safetensors").exists()
    if importlib.util.find_spec("mlx_lm"):
        cli("export", run, "--to", "merged-mlx")  # in its own process: MLX with OpenBLAS
        assert (run / "exports" / f"{run.name}-merged-mlx" / "model.safetensors").exists()
    check_tuned_gguf(run, run / "adapter", {"f16": outs["gguf"], "q8_0": outs["q8_0"]})


@pytest.mark.slow
def test_an_mlx_run_on_the_bundled_model_exports_everywhere_and_its_gguf_answers_as_tuned(tmp_path):
    pytest.importorskip("mlx_lm")
    need("xllamacpp", BINDING)
    from orpo_local.openblas import find_openblas

    need(platform.system() != "Linux" or bool(find_openblas()),
         "MLX on Linux without OpenBLAS runs at ~5 GFLOP/s: install libopenblas0-pthread (make test does when it can)")
    cli("train", "--backend", "mlx", "--data", secret_data(tmp_path), "--max-steps", 6, "--runs-dir", tmp_path / "runs",
        "--set", "optim.batch_size=2", "--set", "optim.warmup_steps=0", "--set", "data.val_fraction=0", "--set", "run.eval_every=0")
    (run,) = (tmp_path / "runs").iterdir()
    outs = {to: export(run, to, progress=lambda m: None) for to in ("peft", "mlx", "merged", "gguf")}
    outs["q8_0"] = export(run, "gguf", quant="q8_0", progress=lambda m: None)
    outs["merged-mlx"] = Path(cli("export", run, "--to", "merged-mlx").splitlines()[0])  # MLX with OpenBLAS, in its own process
    assert (outs["merged"] / "model.safetensors").exists() and (outs["merged-mlx"] / "model.safetensors").exists()
    assert (outs["mlx"] / "adapters.safetensors").exists()
    check_tuned_gguf(run, outs["peft"], {"f16": outs["gguf"], "q8_0": outs["q8_0"]})
