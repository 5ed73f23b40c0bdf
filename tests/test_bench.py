"""bench/compare.py and bench/gpu_bench.py: the FLOP count worked out by hand, the pieces of the report,
the long-prompt rows, and compare.py end to end on a tiny model (slow); gpu.sh is checked for syntax."""

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import need

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import compare  # noqa: E402

# 1 block, hidden 2, intermediate 3, one head of 2, vocab 5
SHAPE = {"layers": 1, "hidden": 2, "intermediate": 3, "heads": 1, "kv_heads": 1, "head_dim": 2, "vocab": 5}


def test_matmul_params_by_hand():
    # q 2x2, k 2x2, v 2x2, o 2x2, gate/up/down 3 x (2x3), head 2x5
    assert compare.matmul_params(SHAPE) == 4 + 4 + 4 + 4 + 18 + 10


def test_pair_flops_by_hand():
    # prompt 2, answers 1 and 1. plain: two sequences of 3 -> 6 tokens, 2 x (3*4/2) = 12 causal (q, k) pairs
    assert compare.pair_flops(2, 1, 1, SHAPE) == 4 * 44 * 6 + 12 * 2 * 12
    # shared: 4 tokens; prompt 3 pairs, each answer 2 (prompt) + 1 (itself) -> 9
    assert compare.pair_flops(2, 1, 1, SHAPE, shared=True) == 4 * 44 * 4 + 12 * 2 * 9
    # without a prompt there is nothing to share
    assert compare.pair_flops(0, 3, 2, SHAPE, shared=True) == compare.pair_flops(0, 3, 2, SHAPE)


def test_model_shape_reads_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                                                      "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}))
    assert compare.model_shape(tmp_path) == {"layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3,
                                             "head_dim": 64, "vocab": 49152}


def test_step_times_spread_the_rest_of_the_call():
    # call at 0, steps end at 5, 6, 7, the call returns at 9: first 5 s, the other 4 s over 2 steps
    assert compare.step_times(0.0, [5.0, 6.0, 7.0], 9.0) == [5.0, 2.0, 2.0]
    assert compare.step_times(0.0, [5.0], 6.0) == [6.0]
    assert compare.mean_batch(20, 8) == pytest.approx(20 / 3)  # batches of 8, 8, 4


def test_median_spread_and_format():
    assert compare.median_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert compare.median_spread([4.0]) == (4.0, 0.0)
    assert compare.fmt(2.0, 1.0) == "2 ±100%"
    assert compare.fmt(12345.6) == "12346"


def test_summary_counts_pairs_tokens_and_flops():
    res = {"times": [9.0, 2.0, 2.0], "shape": SHAPE, "layout": "plain",
           "step_lengths": [[[5, 5, 5]], [[2, 1, 1]], [[2, 1, 1], [2, 1, 1]]]}
    s = compare.summary(res, warmup=1)  # the first step is not timed
    assert s["s_step"] == 2.0
    assert s["pairs_s"] == 3 / 4
    assert s["tokens_s"] == 3 * 6 / 4
    assert s["tokens_pair"] == 6
    assert s["flops"] == 3 * compare.pair_flops(2, 1, 1, SHAPE) / 4
    trainer = {"times": [9.0, 2.0, 2.0], "shape": SHAPE, "layout": "plain", "pair_lengths": [[2, 1, 1], [2, 3, 3]], "pairs_per_step": 2}
    t = compare.summary(trainer, warmup=1)  # 4 pairs of the mean length 8 in 4 s
    assert (t["pairs_s"], t["tokens_s"]) == (1.0, 8.0)


def test_run_all_alternates_sides_and_notes_failures(monkeypatch):
    calls = []

    def fake_worker(worker, spec, env):
        calls.append((worker, spec["dtype"]))
        if worker == "mlx_lm_lora":
            raise RuntimeError("mlx_lm_lora failed (exit 1):\nTraceback\nKeyError: 'x'")
        return {"times": [1.0, 1.0], "dtype": "float32", "shape": SHAPE, "layout": "plain", "step_lengths": [[[2, 1, 1]]] * 2}

    monkeypatch.setattr(compare, "run_worker", fake_worker)
    comps = [compare.Comparison("torch", "t fast", "torch_step", "trl_step", "auto"),
             compare.Comparison("torch", "t fp32", "torch_step", "trl_step", "float32"),
             compare.Comparison("trainer", "eval", "ours_trainer_eval", None, "auto"),
             compare.Comparison("mlx", "m", "mlx_step", "mlx_lm_lora", "float32")]
    notes = compare.run_all(comps, {"warmup": 1}, repeats=3, log=lambda m: None)
    # ours first, then the peer first, then ours first; the float32 comparison is the fastest one here; one evaluation run
    assert calls[:7] == [("torch_step", "auto"), ("trl_step", "auto"), ("trl_step", "auto"), ("torch_step", "auto"),
                         ("torch_step", "auto"), ("trl_step", "auto"), ("ours_trainer_eval", "auto")]
    assert calls[7:] == [("mlx_step", "float32"), ("mlx_lm_lora", "float32")]
    assert len(comps[0].runs["torch_step"]) == 3 and comps[1].runs == {} and comps[3].runs == {}
    assert notes[0].startswith("t fp32: float32 is the fastest dtype") and notes[1] == "m: mlx_lm_lora failed (exit 1): KeyError: 'x'"


def test_mask_lengths_of_an_mlx_lm_lora_batch():
    chosen = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32)  # prompt 2, answer 2; prompt 1, answer 4
    rejected = np.array([[0, 0, 1, 0, 0], [0, 1, 0, 0, 0]], np.float32)
    assert compare.mask_lengths(chosen, rejected) == [[2, 2, 1], [1, 4, 1]]


def test_write_section_appends_then_replaces(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    compare.write_section(doc, "default", "table one\n")
    compare.write_section(doc, "long-prompt", "table two\n")
    compare.write_section(doc, "default", "table three\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "table one" not in text and text.count("table three") == 1 and text.count("table two") == 1
    assert text.index("table three") < text.index("table two")  # replaced where it was


def test_a_run_of_some_comparisons_writes_a_section_of_its_own():
    keys = [compare.section_key(compare.parse_args(a)) for a in
            ([], ["--long-prompt"], ["--only", "mlx"], ["--long-prompt", "--only", "trainer,torch"])]
    assert keys == ["default", "long-prompt", "default mlx", "long-prompt torch,trainer"]


def test_long_prompt_rows_are_multi_turn_and_fit():
    from orpo_local.models import load_tokenizer
    from orpo_local.tokenization import ChatEncoder, tokenize_pairs

    encoder = ChatEncoder(load_tokenizer("smollm2-135m-instruct", progress=lambda m: None))
    rows = compare.long_prompt_rows(compare.load_rows("zh-sample", 60), encoder, 8, 512)
    tokens, stats = tokenize_pairs(rows, encoder, 512, 256)
    assert len(tokens) == 8 and stats.truncated == 0 and stats.dropped == 0
    for row, tok in zip(rows, tokens):
        assert sum(m["role"] == "user" for m in row.prompt) >= 2
        assert len(tok.prompt) >= 3 * (len(tok.chosen) + len(tok.rejected)) / 2
        assert tok.length <= 512


def test_stub_metal_only_calls(monkeypatch):
    mx = pytest.importorskip("mlx.core")
    monkeypatch.setattr(mx, "device_info", mx.device_info)  # restored after the test
    monkeypatch.setattr(mx, "set_wired_limit", mx.set_wired_limit)
    stubbed = compare.stub_metal_only_calls()
    assert "max_recommended_working_set_size" in mx.device_info()
    mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])  # what mlx-lm-lora's trainer calls
    assert stubbed == ([] if mx.default_device() == mx.gpu else ["mx.device_info", "mx.set_wired_limit"])


def test_prompt_conversation_dataset_renders_like_mlx_lm_lora(tiny):
    if not __import__("importlib").util.find_spec("mlx_lm_lora"):
        pytest.skip("mlx-lm-lora is not installed (pip install 'orpo-local[bench]')")
    from mlx_lm_lora.trainer.datasets import ORPODataset
    from orpo_local.data import load_pairs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    rows = [p.to_dict() for p in load_pairs("zh-sample")[:4] if len(p.prompt) == 1 and not p.system]
    flat = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]} for r in rows]
    theirs, ours = ORPODataset(flat, tokenizer), compare.PromptConversationDataset(rows, tokenizer)
    for i in range(len(rows)):
        assert ours[i] == theirs[i]


def test_gpu_script_parses_and_gpu_bench_helps():
    subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], check=True)
    py_compile.compile(str(BENCH / "gpu_bench.py"), doraise=True)
    out = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--models", "--memory-gib", "--max-batch", "--deadline-s"):
        assert option in out


def test_largest_batch_doubles_then_bisects():
    sys.path.insert(0, str(BENCH))
    import gpu_bench

    tried = []

    def fits(n):
        tried.append(n)
        return n <= 11

    assert gpu_bench.largest_batch(fits, 4, 128, 60) == (11, True)
    assert tried == [4, 8, 16, 12, 10, 11]
    assert gpu_bench.largest_batch(lambda n: True, 4, 20, 60) == (16, True)  # the limit ends the search
    assert gpu_bench.largest_batch(lambda n: n <= 2, 4, 20, 60) == (2, True)  # the recipe's batch does not fit
    assert gpu_bench.largest_batch(lambda n: True, 4, 2, 60) == (2, True)  # a limit below the recipe's batch
    # a side whose recipe batch does not fit the cap still reports the largest that does
    line = gpu_bench.result_line({"model": "llama-3-8b", "side": "trl", "s_step": None, "max_batch": 2, "max_batch_final": True})
    assert "does not fit" in line and line.endswith(" 2")


@pytest.mark.slow  # 7 processes, each loading torch: 45 to 85 s measured on the shared 2-core machine
def test_compare_end_to_end_on_a_tiny_model(tiny, tmp_path):
    need("trl", "the TRL side needs trl (pip install 'orpo-local[bench]')")
    out = tmp_path / "benchmarks.md"
    cmd = [sys.executable, str(BENCH / "compare.py"), "--model", str(tiny), "--only", "torch,trainer", "--steps", "2",
           "--repeats", "1", "--pairs", "8", "--batch-size", "2", "--max-length", "128", "--out", str(out)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(compare.HEADER) + " |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    sides = {(r[0], r[1]) for r in rows}
    # float32 is its own comparison, or the fastest dtype's on a CPU without native bf16
    fp32 = next(r[0] for r in rows if r[0].startswith("torch step") and r[2].startswith("float32"))
    assert (fp32, "orpo_local") in sides and (fp32, "TRL ORPOTrainer") in sides
    assert ("whole trainer", "orpo-local train") in sides and ("whole trainer", "TRL ORPOTrainer.train()") in sides
    assert ("whole trainer, our default evaluation", "orpo-local train, default eval") in sides
    for r in rows:
        assert float(r[4].split()[0]) > 0 and float(r[5].split()[0]) > 0 and float(r[7]) > 0  # pairs/s, tokens/s, peak MB
        assert 0 < float(r[8].rstrip("%")) < 100  # MFU
    ours_fp32 = next(r for r in rows if r[:2] == [fp32, "orpo_local"])
    assert float(ours_fp32[9].split()[0]) > 0  # the ratio sits on our row
    # float32 with nll_on_prompt: the same objective, so the same losses on the same batches
    losses = next(line for line in text.splitlines() if line.startswith(f"- {fp32}: losses"))
    assert float(losses.rsplit("difference ", 1)[1].rstrip(")")) < 1e-4
    assert "<!-- bench/compare.py default torch,trainer -->" in out.read_text() and "| comparison |" in out.read_text()
