"""Tiny random Llama models (made in the test, no download) sharing the bundled tokenizer's vocabulary size."""

from pathlib import Path


def tiny_llama(folder: Path, vocab_size: int = 256, seed: int = 0, tokenizer=None) -> Path:
    """Save a 2-layer random Llama (hidden 64) to `folder`, with `tokenizer` if given; return the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def base_tokenizer():
    """A base model's tokenizer, built offline: SentencePiece-style BPE with byte fallback, <s> added in front
    of every encoding (as Llama 2 / Mistral), </s> as EOS, and no chat template and no chat control tokens."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Human: What is two plus two? Assistant: It is four.", "The quick brown fox jumps over the lazy dog.",
              "user assistant system: answer the question, please. 1 + 1 = 2, 2 + 3 = 5"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    spec["model"]["byte_fallback"] = True
    spec["model"]["vocab"].update({f"<0x{b:02X}>": len(spec["model"]["vocab"]) + i for i, b in enumerate(range(256))})
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
