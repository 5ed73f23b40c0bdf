"""With nll_on_prompt=True our loss is TRL's ORPOTrainer loss: same token ids, model and LoRA,
fp32, step 0 (ORPO_SPEC.md). TRL's trainer lives at trl.experimental.orpo."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from orpo_local.backends.torch_backend import model_token_logps, orpo_loss, orpo_loss_from_token_logps  # noqa: E402
from orpo_local.batching import collate  # noqa: E402
from orpo_local.data import load_pairs  # noqa: E402
from orpo_local.models import load_tokenizer  # noqa: E402
from orpo_local.tokenization import tokenize_pairs  # noqa: E402
from tiny import tiny_llama  # noqa: E402


def trl_batch(pairs, pad_id):
    """TRL's per-side layout: {chosen,rejected}_{input_ids,attention_mask,labels}, labels -100 on the prompt."""
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [(p.prompt, getattr(p, side)) for p in pairs]
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.full((len(seqs), width), pad_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (prompt, resp) in enumerate(seqs):
            n = len(prompt) + len(resp)
            ids[i, :n] = torch.tensor(prompt + resp)
            mask[i, :n] = 1
            labels[i, len(prompt):n] = torch.tensor(resp)
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_metrics_equal_trl_orpo_trainer(tmp_path, beta):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = load_tokenizer("smollm2-135m-instruct", progress=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "m", vocab_size=len(tok), tokenizer=tok), dtype=torch.float32)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # non-zero B so the adapter takes part in the forward pass
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pairs, _ = tokenize_pairs(load_pairs("zh-sample")[:6], tok, 512, 256)
    pad = tok.pad_token_id

    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], padding_value=pad, bf16=False, use_cpu=True)
    dummy = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = ORPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch(pairs, pad), "train")

    batch = {k: torch.from_numpy(v) for k, v in collate(pairs, pad, pad_to=8).items()}
    logits = model(input_ids=batch["input_ids"].long(), attention_mask=batch["attention_mask"]).logits
    loss, ours = orpo_loss(logits, batch, lambda_=beta, nll_on_prompt=True)

    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5)
    # the path training really takes (vocabulary projection only at targets) gives the same loss
    fast, _ = orpo_loss_from_token_logps(model_token_logps(model, batch, True), batch, lambda_=beta, nll_on_prompt=True)
    assert float(fast) == pytest.approx(float(trl_loss), rel=1e-5)
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected",
                "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        # differences of near-equal fp32 log-probs (log odds, margins) carry ~1e-7 absolute rounding
        assert float(ours[key]) == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    # and without prompt tokens in the NLL (our default) the two differ: the option is real
    loss_default, _ = orpo_loss(logits, batch, lambda_=beta, nll_on_prompt=False)
    assert abs(float(loss_default) - float(trl_loss)) > 1e-3
