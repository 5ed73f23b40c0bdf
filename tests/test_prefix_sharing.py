"""Prefix sharing (orpo_local.batching "shared" layout) and the chunked vocabulary projection: the same
objective as the plain layout. The layout is checked as data; on a float64 tiny Llama the loss, every
metric and every LoRA gradient equal the plain path's and the float64 reference's, in both NLL modes, with
padding, multi-turn prompts and gradient accumulation; chunked log-probs equal unchunked ones."""

import numpy as np
import pytest

from orpo_local.backend import real_tokens, window_sizes
from orpo_local.batching import collate, iterate_batches, prefix_targets, shared_attention, target_masks
from orpo_local.tokenization import TokenizedPair

import reference as ref
from batches import random_batch

PAIRS = [TokenizedPair([1, 5, 9], [40, 50], [60, 70, 8]), TokenizedPair([1, 11], [13, 14, 7], [15])]


def test_the_shared_layout_is_one_row_per_pair_with_restarting_positions():
    b = collate(PAIRS, pad_id=0, pad_to=4, layout="shared")
    assert b["input_ids"].tolist() == [[1, 5, 9, 40, 50, 60, 70, 8], [1, 11, 13, 14, 7, 15, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 4, 2, 0, 0]]
    assert b["segment"].tolist() == [[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 2, 2, 2, 3, 0, 0]]
    # the rejected answer's first token is predicted where the prompt ends, like the chosen one's
    assert b["prev"].tolist() == [[-1, 0, 1, 2, 3, 2, 5, 6], [-1, 0, 1, 2, 3, 1, 5, 6]]
    chosen, rejected, nll = target_masks(b, nll_on_prompt=True)
    assert chosen[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0] and rejected[1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert nll[0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]  # the prompt from its second token, then the chosen answer
    assert real_tokens(b) == 8 + 6 and real_tokens(collate(PAIRS, 0, 4)) == (3 + 2) + (2 + 3) + (3 + 3) + (2 + 1)  # prompts once vs twice


def test_the_rejected_answer_sees_the_prompt_but_not_the_chosen_answer():
    seg = collate(PAIRS[:1], pad_id=0, pad_to=1, layout="shared")["segment"]
    allowed = shared_attention(seg)[0].astype(int)
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen: the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, never the chosen answer
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    padded = shared_attention(collate(PAIRS, 0, pad_to=4, layout="shared")["segment"])[1]
    assert padded[6].tolist() == [0] * 6 + [1, 0] and padded.any(-1).all()  # padding sees padding only, never nothing


def test_the_prefix_layout_holds_each_prompt_once_and_both_answers_beside_it():
    b = collate(PAIRS, pad_id=0, pad_to=4, layout="prefix")
    assert b["prompt_ids"].tolist() == [[1, 5, 9, 0], [1, 11, 0, 0]] and b["prompt_len"].tolist() == [3, 2]
    assert b["answer_ids"].tolist() == [[40, 50, 0, 0], [13, 14, 7, 0], [60, 70, 8, 0], [15, 0, 0, 0]]
    assert b["answer_len"].tolist() == [2, 3, 3, 1]
    t = prefix_targets(b, nll_on_prompt=True)
    # hidden states: the prompts' 2 x 4 first (0-7), then the answers' 4 x 4 (8-23); an answer's first token is
    # predicted by its prompt's last state (3 - 1 = 2 for pair 0, 4 + 2 - 1 = 5 for pair 1), the rest by the answer's own
    assert t["src"].tolist() == [2, 8, 5, 12, 13, 2, 16, 17, 5, 0, 1, 4]
    assert t["token"].tolist() == [40, 50, 13, 14, 7, 60, 70, 8, 15, 5, 9, 11]
    assert t["row"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 0, 0, 1]
    assert t["segment"].tolist() == [2, 2, 2, 2, 2, 3, 3, 3, 3, 1, 1, 1]  # chosen, rejected, then the prompts' NLL
    assert len(prefix_targets(b, nll_on_prompt=False)["src"]) == 9  # the answers' tokens only
    assert real_tokens(b) == real_tokens(collate(PAIRS, 0, 4, "shared")) == 8 + 6


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_window_sizes_are_the_same_in_every_layout(nll_on_prompt):
    _, _, pairs = random_batch(n_pairs=5, vocab=50, seed=3, max_prompt=9, max_resp=7)
    for part in (pairs, pairs[:2]):
        want = window_sizes([collate(part, 0, 8)], nll_on_prompt)
        assert want == window_sizes([collate(part, 0, 8, "shared")], nll_on_prompt) == window_sizes([collate(part, 0, 8, "prefix")], nll_on_prompt)
        # and the prefix targets are exactly the NLL targets plus the rejected answers
        t = prefix_targets(collate(part, 0, 8, "prefix"), nll_on_prompt)
        assert int(((t["segment"] == 1) | (t["segment"] == 2)).sum()) == want[0]


def test_iterate_batches_yields_the_same_pairs_in_either_layout():
    _, _, pairs = random_batch(n_pairs=7, vocab=50, seed=5)

    def chosen_rows(layout):
        for _, (_, b) in zip(range(4), iterate_batches(pairs, 3, 0, seed=1, layout=layout)):
            if layout == "plain":
                half = len(b["input_ids"]) // 2
                yield [row[m == 1].tolist() for row, m in zip(b["input_ids"][:half], b["attention_mask"][:half])]
            else:
                yield [row[(s == 1) | (s == 2)].tolist() for row, s in zip(b["input_ids"], b["segment"])]

    def prefix_rows():
        for _, (_, b) in zip(range(4), iterate_batches(pairs, 3, 0, seed=1, layout="prefix")):
            half = len(b["prompt_ids"])
            yield [p[:m].tolist() + a[:n].tolist() for p, m, a, n in zip(b["prompt_ids"], b["prompt_len"], b["answer_ids"][:half], b["answer_len"])]

    assert list(chosen_rows("plain")) == list(chosen_rows("shared")) == list(prefix_rows())


# ------------------------------------------------------------------ torch: the same objective

torch = pytest.importorskip("torch")
from orpo_local.backends.torch_backend import (backward_window, head_logps, orpo_loss_from_token_logps,  # noqa: E402
                                               pick_layout, shared_orpo_loss, shared_token_logps, to_device)


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tiny import tiny_llama

    base = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path_factory.mktemp("m")), dtype=torch.float64)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    assert pick_layout(model, True) == "shared" and pick_layout(model, False) == "plain"
    return model


def multi_turn_pairs(seed: int, n: int = 5):
    """Pairs whose prompts are several turns long (as token runs of different lengths) and answers short."""
    rng = np.random.default_rng(seed)
    return [TokenizedPair(rng.integers(3, 256, rng.integers(12, 40)).tolist(), rng.integers(3, 256, rng.integers(1, 8)).tolist(),
                          rng.integers(3, 256, rng.integers(1, 8)).tolist()) for _ in range(n)]


def assert_grads_close(got, want):
    """Gradients equal to float32 precision: Llama's RMSNorm computes in float32 even in a float64 model, so
    where prefix sharing sums the chosen and rejected answers' gradients into one prompt before that norm
    (and the plain path only after it), the two differ by float32 rounding (~1e-8 of the largest entry)."""
    for name in want:
        assert want[name].abs().max() > 0, name
        assert float((got[name] - want[name]).abs().max()) <= 1e-6 * float(want[name].abs().max()), name


def grads_and_metrics(model, micro, nll_on_prompt):
    model.zero_grad()
    metrics = backward_window(model, micro, 0.7, nll_on_prompt, "cpu")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, metrics


@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("which", ["single-turn", "multi-turn"])
def test_shared_loss_metrics_and_lora_gradients_equal_the_plain_path(model64, nll_on_prompt, which):
    pairs = random_batch(n_pairs=5, vocab=256, seed=11, max_prompt=9, max_resp=12)[2] if which == "single-turn" else multi_turn_pairs(2)
    plain_g, plain_m = grads_and_metrics(model64, [collate(pairs, 0, 8)], nll_on_prompt)
    shared_g, shared_m = grads_and_metrics(model64, [collate(pairs, 0, 8, "shared")], nll_on_prompt)
    assert set(plain_g) == set(shared_g) and len(plain_g) == 12  # 2 layers x 3 modules x (A, B)
    assert_grads_close(shared_g, plain_g)
    for k in plain_m:
        if k != "tokens":
            assert shared_m[k] == pytest.approx(plain_m[k], rel=1e-10, abs=1e-13), k
    assert shared_m["tokens"] < plain_m["tokens"]  # each prompt once


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_shared_accumulated_micro_batches_equal_one_plain_batch(model64, nll_on_prompt):
    pairs = multi_turn_pairs(7, n=6)
    plain_g, plain_m = grads_and_metrics(model64, [collate(pairs, 0, 32)], nll_on_prompt)
    acc_g, acc_m = grads_and_metrics(model64, [collate(pairs[:2], 0, 8, "shared"), collate(pairs[2:], 0, 16, "shared")], nll_on_prompt)
    assert_grads_close(acc_g, plain_g)
    for k in plain_m:
        if k != "tokens":
            assert acc_m[k] == pytest.approx(plain_m[k], rel=1e-10, abs=1e-13), k


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_shared_loss_equals_the_float64_reference(model64, nll_on_prompt):
    """The reference scores plain sequences from full logits; the shared batch reaches the same numbers."""
    _, _, pairs = random_batch(n_pairs=4, vocab=256, seed=21, max_prompt=9, max_resp=7)
    plain = collate(pairs, 0, 8)
    with torch.no_grad():
        logits = model64(input_ids=torch.from_numpy(plain["input_ids"]).long(),
                         attention_mask=torch.from_numpy(plain["attention_mask"])).logits.numpy()
        t = to_device(collate(pairs, 0, 8, "shared"), nll_on_prompt, "cpu")
        loss, metrics = shared_orpo_loss(shared_token_logps(model64, t), t, 0.7, nll_on_prompt)
    want_loss, want = ref.orpo_loss(logits, plain, 0.7, nll_on_prompt)
    assert float(loss) == pytest.approx(want_loss, rel=1e-10)
    for k, v in want.items():
        assert float(metrics[k]) == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_chunked_vocabulary_projection_equals_one_pass_on_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False, dtype=torch.float64)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    weights = torch.randn(37, dtype=torch.float64)

    def run(budget):
        hidden.grad = head.weight.grad = None
        out = head_logps(head, hidden, targets, budget=budget)
        (out * weights).sum().backward()
        return out.detach(), hidden.grad.clone(), head.weight.grad.clone()

    whole, chunked = run(1 << 30), run(4 * 1000 * 5)  # the second: 5 targets at a time, 8 chunks
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_plain_and_shared_paths_give_the_same_loss_through_the_public_loss(model64):
    """orpo_loss_from_token_logps (plain) and shared_orpo_loss read different layouts of one batch alike."""
    pairs = multi_turn_pairs(5, n=3)
    from orpo_local.backends.torch_backend import model_token_logps

    with torch.no_grad():
        p = to_device(collate(pairs, 0, 8), False, "cpu")
        s = to_device(collate(pairs, 0, 8, "shared"), False, "cpu")
        plain, _ = orpo_loss_from_token_logps(model_token_logps(model64, p, False), p, 0.3)
        shared, _ = shared_orpo_loss(shared_token_logps(model64, s), s, 0.3)
    assert float(shared) == pytest.approx(float(plain), rel=1e-12)


def test_train_shares_prefixes_by_default_and_says_so_with_the_losses_of_the_plain_layout(tiny, arith, tmp_path):
    from orpo_local import TrainConfig, train
    from orpo_local.runs import read_json, read_metrics

    def run(sharing, folder):
        config = TrainConfig().with_overrides({
            "model.name": str(tiny), "model.backend": "torch", "model.dtype": "float32", "model.prefix_sharing": sharing,
            "data.path": str(arith), "run.runs_dir": str(tmp_path / folder), "optim.max_steps": 3, "optim.batch_size": 4,
            "run.eval_every": 2, "data.val_min_pairs": 4})
        result = train(config, progress=False)
        return read_json(result.run_dir / "run.json"), read_metrics(result.run_dir, "train"), read_metrics(result.run_dir, "eval")

    shared_info, shared_steps, shared_evals = run(True, "shared")
    plain_info, plain_steps, plain_evals = run(False, "plain")
    assert shared_info["batch_layout"] == "shared" and plain_info["batch_layout"] == "plain"
    for a, b in zip(shared_steps + shared_evals, plain_steps + plain_evals, strict=True):
        for k in ("loss", "nll_loss", "or_loss", "logps/chosen", "logps/rejected", "rewards/accuracies"):
            assert a[k] == pytest.approx(b[k], rel=2e-5, abs=1e-6), k
        if "tokens_per_s" in a:
            assert a["pairs_per_s"] > 0
