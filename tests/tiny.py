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
