"""One GGUF file for llama.cpp, Ollama and LM Studio: the base model with a LoRA adapter merged in,
its tokenizer and the chat template a run trained with, written by the `gguf` package (llama.cpp's own).

    write_gguf("base/model", read_adapter("runs/r/adapter"), "r-f16.gguf", template_text, quant="f16")
    modelfile("r-f16.gguf", template_text, tokenizer)   # an Ollama Modelfile for it

It follows llama.cpp's converter (convert_hf_to_gguf.py) step by step, for the architectures it was
checked on: Llama (also SmolLM2, the bundled model) and Mistral as `llama`, Qwen2 as `qwen2`.
- Tensor names come from gguf's TensorNameMap, the table the converter itself maps with.
- Llama's q and k rows are permuted back from the Hugging Face order to the one llama.cpp's RoPE expects.
- Norms and other 1-D tensors stay float32; 2-D weights are f16, q8_0, or q4_0 (the embedding and output
  layer then q8_0, as they hurt most when cut to 4 bits). A row that does not split into blocks stays f16.
- The vocabulary: SentencePiece (`tokenizer.model`, Llama 2 / Mistral) or byte-level BPE (`tokenizer.json`),
  whose llama.cpp pre-tokenizer is told by the regular expressions in tokenizer.json (PRE_TOKENIZERS).
- The merge is done here in float32 (orpo_local.convert), one weight at a time, and written as it goes:
  memory holds one tensor, not the model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .convert import AdapterError, Lora, model_config, model_tensors

QUANTS = ("f16", "q8_0", "q4_0")  # GGUF weight types: 16-bit floats, 8-bit and 4-bit blocks (llama.cpp's own)
ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2"}
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# A Hugging Face byte-level pre-tokenizer, as its steps, -> the llama.cpp pre-tokenizer that splits text the same way
PRE_TOKENIZERS = {
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",  # Qwen2, Qwen2.5
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM, SmolLM2 as published
    (("ByteLevel", True),): "gpt-2",  # GPT-2's own regular expression (the bundled model's converted tokenizer)
}


@dataclass
class Planned:
    """One tensor to write: its GGUF name, its element shape, its type, and how to compute it."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    data: Callable[[], np.ndarray]


def gguf_arch(cfg: dict):
    import gguf

    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF export knows {', '.join(ARCHITECTURES)}; this model is {arch}: use llama.cpp's "
                         "convert_hf_to_gguf.py on a merged export (orpo-local export RUN --to merged)")
    if cfg.get("quantization") or cfg.get("quantization_config"):
        raise ValueError("GGUF export needs an unquantised base model (float weights); this one is quantised")
    return getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch])


# ----------------------------------------------------------------------------- tensors

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection (weight or bias) from Hugging Face's rotary layout (each head's two
    halves) to the interleaved pairs llama.cpp's Llama RoPE rotates."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qtype_of(name: str, shape: tuple[int, ...], quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if qtype == Q.Q4_0 and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def plan_tensors(model_dir: Path, cfg: dict, arch, lora: Lora | None, quant: str) -> list[Planned]:
    """Every tensor of the GGUF file, in the model's order, with the adapter merged into its weights."""
    import gguf

    stored = model_tensors(model_dir)
    tied = cfg.get("tie_word_embeddings", False)
    names = [n for n in stored if not n.endswith(".rotary_emb.inv_freq") and not (tied and n == "lm_head.weight")]
    name_map = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    adapted = set(lora.weights) if lora else set()
    unknown = [n for n in names if name_map.get_name(n, try_suffixes=(".weight", ".bias")) is None]
    stray = sorted(adapted - {n.removesuffix(".weight") for n in names})
    if unknown or stray:
        raise AdapterError("; ".join(filter(None, [
            unknown and f"tensors llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} has no name for: {', '.join(unknown)}",
            stray and f"adapter modules with no weight in the base model: {', '.join(stray)}"])))

    def compute(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            w = np.asarray(stored[name](), dtype=np.float32)
            delta = lora.delta(name.removesuffix(".weight")) if lora and name.endswith(".weight") else None
            if delta is not None:
                w = w + delta
            if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
                w = permute_qk(w, heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
                w = permute_qk(w, kv_heads)
            return w
        return load

    plan = []
    for name in names:
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        shape = stored[name].shape
        plan.append(Planned(new, shape, qtype_of(new, shape, quant), compute(name)))
    if (freqs := llama3_rope_factors(cfg)) is not None:
        plan.insert(0, Planned("rope_freqs.weight", freqs.shape, gguf.GGMLQuantizationType.F32, lambda: freqs))
    return plan


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """Llama 3.1+'s RoPE frequency factors (rope_type llama3), which llama.cpp reads as a tensor; else None."""
    rope = _rope(cfg)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:  # between the two: a smooth blend of the scaled and unscaled frequency
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope(cfg: dict) -> dict:
    """The RoPE settings wherever the config keeps them (rope_parameters in transformers 5, rope_scaling before)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and cfg.get("rope_theta") is not None:
        rope["rope_theta"] = cfg["rope_theta"]
    return rope


# ----------------------------------------------------------------------------- metadata

def add_hparams(writer, cfg: dict, arch, ftype) -> None:
    """The model's shape, as the converter's TextModel/LlamaModel.set_gguf_parameters write it."""
    import gguf

    heads = cfg["num_attention_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 4096))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = _rope(cfg)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind not in (None, "default", "llama3"):  # llama3: the rope_freqs tensor
        raise ValueError(f"RoPE type {kind!r} is not one GGUF export writes (default, linear, yarn, llama3)")
    if cfg.get("head_dim") is not None:
        writer.add_key_length(cfg["head_dim"])
        writer.add_value_length(cfg["head_dim"])
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    writer.add_file_type(ftype)


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a tokenizer.json's byte-level pre-tokenizer (PRE_TOKENIZERS), or ValueError."""
    steps = []
    pre = spec.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]:
        if step.get("type") == "Split":
            steps.append(("Split", step["pattern"].get("Regex", step["pattern"].get("String"))))
        elif step.get("type") == "ByteLevel":
            steps.append(("ByteLevel", step.get("use_regex", True)))
        elif step.get("type") == "Digits":
            steps.append(("Digits", step.get("individual_digits", False)))
        else:
            steps.append((step.get("type"), None))
    found = PRE_TOKENIZERS.get(tuple(steps))
    if found is None:
        raise ValueError(f"this tokenizer's pre-tokenizer ({', '.join(s for s, _ in steps)}) is not one GGUF export knows "
                         f"how llama.cpp splits ({', '.join(PRE_TOKENIZERS.values())})")
    return found


def add_vocab(writer, model_dir: Path, tokenizer, cfg: dict) -> int:
    """Tokens, types, merges or scores and the special ids (the converter's _set_vocab_gpt2 and
    _set_vocab_sentencepiece); returns the number of tokens."""
    import gguf

    n_vocab = cfg.get("vocab_size", len(tokenizer))
    if (model_dir / "tokenizer.model").exists():
        tokens, scores, types = _sentencepiece_tokens(model_dir, tokenizer, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(space_after_special(tokenizer))
    else:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
            raise ValueError(f"{model_dir}: GGUF export reads SentencePiece (tokenizer.model) or byte-level BPE tokenizers; "
                             f"this one is {spec['model']['type']} with byte fallback")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(spec))
        tokens, types = _bpe_tokens(tokenizer, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=not (model_dir / "tokenizer.model").exists(), n_vocab=len(tokens))
    # what the Hugging Face tokenizer really does when it encodes text, which training and chat relied on
    special.add_special_token = {"bos": adds_bos(tokenizer), "eos": adds_eos(tokenizer)}
    special.chat_template = None  # the run's own template is written instead
    special.add_to_gguf(writer, quiet=True)
    return len(tokens)


def adds_bos(tokenizer) -> bool:
    """Whether encoding text puts the tokenizer's BOS in front (Llama 2, Llama 3 and Mistral do; SmolLM2 and Qwen2 do not)."""
    return tokenizer.bos_token_id is not None and list(tokenizer("a")["input_ids"])[:1] == [tokenizer.bos_token_id]


def adds_eos(tokenizer) -> bool:
    return tokenizer.eos_token_id is not None and list(tokenizer("a")["input_ids"])[-1:] == [tokenizer.eos_token_id]


def space_after_special(tokenizer) -> bool:
    """Whether a SentencePiece tokenizer starts the text after a special token with a space ("▁"), as Llama 2's
    and Mistral's do. llama.cpp's add_space_prefix does it at the start and after every special token; a chat
    prompt is all text after special tokens (BOS, the turn markers), so this is the case to match."""
    ids = tokenizer(f"{tokenizer.eos_token}a", add_special_tokens=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids[1:2]) in (["\u2581a"], ["\u2581"])


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (the converter's does_token_look_special)."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _bpe_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens in their normalised form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = gguf.TokenType.CONTROL if decoder[i].special or _looks_special(token) else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _sentencepiece_tokens(model_dir: Path, tokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """The pieces, scores and types of tokenizer.model, then the tokenizer's added tokens over them (control
    tokens as they are, user-defined ones with their spaces as spaces), padded to the model's vocabulary."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise ValueError(f"this model's tokenizer is SentencePiece (tokenizer.model): pip install sentencepiece ({e})") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    T = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [T.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                    else T.BYTE if sp.IsByte(i) else T.NORMAL)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= n_vocab:
            continue
        special = added.special or _looks_special(added.content)
        text = added.content if special else added.content.replace("\u2581", " ")
        tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, T.CONTROL if special else T.USER_DEFINED
    return tokens, scores, types


def stop_strings(tokenizer, rendered: str) -> list[str]:
    """The end-of-turn tokens a rendered conversation contains (what a chat client must stop at), EOS first."""
    from .tokenization import ChatEncoder

    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    stops = [vocab[i] for i in sorted(ChatEncoder(tokenizer).stop_ids, key=lambda i: i != tokenizer.eos_token_id)]
    return [s for s in stops if s in rendered] or stops[:1]


# ----------------------------------------------------------------------------- the file

def write_gguf(model_dir: str | Path, lora: Lora | None, out_file: str | Path, template: str, quant: str = "f16",
               name: str = "", progress: Callable[[str], None] = print) -> Path:
    """Merge `lora` into the model in `model_dir` and write `out_file` with its tokenizer and `template`
    (a chat template's text) as tokenizer.chat_template. Returns out_file."""
    import gguf
    from transformers import AutoTokenizer

    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}; use one of {', '.join(QUANTS)}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    cfg = model_config(model_dir)
    arch = gguf_arch(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    plan = plan_tensors(model_dir, cfg, arch, lora, quant)

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    add_hparams(writer, cfg, arch, ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, model_dir, tokenizer, cfg)
    writer.add_chat_template(template)
    for t in plan:
        block, size = gguf.GGML_QUANT_SIZES[t.qtype]
        nbytes = math.prod(t.shape[:-1]) * t.shape[-1] // block * size
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    step = max(1, len(plan) // 10)
    for i, t in enumerate(plan, 1):
        writer.write_tensor_data(gguf.quants.quantize(t.data(), t.qtype))
        if i % step == 0 or i == len(plan):
            progress(f"GGUF {quant}: {i}/{len(plan)} tensors written")
    writer.close()
    return out_file


# ----------------------------------------------------------------------------- Ollama

@dataclass(frozen=True)
class ChatFormat:
    """A chat format both Jinja (what the run trained with) and Ollama's Go templates can write."""

    name: str
    turn: Callable[[str, str], str]  # (role, content) -> the text of one turn
    generation: str  # what opens the assistant's answer
    go: str  # the same format as an Ollama TEMPLATE (Go text/template over .System and .Messages)


_CHATML_GO = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
              '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{- end }}'
              '<|im_start|>assistant\n')
_LLAMA3_GO = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
              '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
              '{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n')


def chat_formats(eos: str) -> list[ChatFormat]:
    zephyr_go = ('{{- if .System }}<|system|>\n{{ .System }}' + eos + '\n{{ end }}'
                 '{{- range .Messages }}{{- if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}' + eos + '\n{{ end }}{{- end }}'
                 '<|assistant|>\n')
    plain_go = ('{{- if .System }}{{ .System }}\n\n{{ end }}{{- range .Messages }}'
                '{{- if eq .Role "user" }}Human: {{ .Content }}\n\n{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}'
                + eos + '\n\n{{ end }}{{- end }}Assistant:')
    plain = {"system": "{}\n\n", "user": "Human: {}\n\n", "assistant": "Assistant: {}" + eos + "\n\n"}
    return [
        ChatFormat("chatml", lambda r, c: f"<|im_start|>{r}\n{c}<|im_end|>\n", "<|im_start|>assistant\n", _CHATML_GO),
        ChatFormat("llama3", lambda r, c: f"<|start_header_id|>{r}<|end_header_id|>\n\n{c.strip()}<|eot_id|>",
                   "<|start_header_id|>assistant<|end_header_id|>\n\n", _LLAMA3_GO),
        ChatFormat("zephyr", lambda r, c: f"<|{r}|>\n{c}{eos}\n", "<|assistant|>\n", zephyr_go),
        ChatFormat("plain", lambda r, c: plain[r].format(c), "Assistant:", plain_go),
    ]


_PROBE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
          {"role": "user", "content": "And 3 + 3?"}]
_SYSTEM = {"role": "system", "content": "Answer briefly."}


def ollama_format(template: str, tokenizer) -> tuple[ChatFormat, str] | None:
    """(the ChatFormat `template` renders, its default system prompt or "") when the template, as transformers
    renders it, writes the probe conversations exactly as that format does; None when it is none of them.
    A leading BOS is left out of the comparison where the tokenizer adds one itself: Ollama's does too, as the
    GGUF's add_bos_token says."""
    bos = tokenizer.bos_token if adds_bos(tokenizer) else None

    def render(messages):
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        return text.removeprefix(bos) if bos else text

    with_system, without = render([_SYSTEM, *_PROBE]), render(_PROBE)
    for fmt in chat_formats(tokenizer.eos_token or ""):
        def expected(messages):
            return "".join(fmt.turn(m["role"], m["content"]) for m in messages) + fmt.generation
        if with_system != expected([_SYSTEM, *_PROBE]) or not without.endswith(expected(_PROBE)):
            continue
        head = without.removesuffix(expected(_PROBE))
        if not head:
            return fmt, ""
        default = re.fullmatch("(.*)".join(map(re.escape, fmt.turn("system", "\x00").split("\x00"))), head, re.S)
        if default:
            return fmt, default.group(1)
    return None


def modelfile(gguf_name: str, template: str, tokenizer) -> str:
    """An Ollama Modelfile: FROM the file, the template's stop tokens, and the template as Ollama's Go
    TEMPLATE (with its default system prompt as SYSTEM) where it is one of chat_formats."""
    found = ollama_format(template, tokenizer)
    rendered = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
    lines = [f"FROM ./{gguf_name}", ""]
    if found is None:
        lines += ["# The run's chat template is in the GGUF file (tokenizer.chat_template); it is none of the formats",
                  "# written here as an Ollama TEMPLATE, so Ollama uses what it makes of the file's template.", ""]
    else:
        fmt, system = found
        lines += [f"# The run's chat template, in Ollama's template language ({fmt.name} format)", f'TEMPLATE """{fmt.go}"""']
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append("")
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings(tokenizer, rendered)]
    return "\n".join(lines) + "\n"
