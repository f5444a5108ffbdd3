"""backend/bench.py on tiny random models: rows, ratios, the JSON keys, the table; padding is not
counted as tokens. No timing is asserted beyond "positive"."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend import bench

ROOT = Path(__file__).resolve().parents[1]
TINY_LORA = {"target_modules": "all-linear", "lora_dropout": 0.0}


def test_each_method_gets_a_reference_and_an_ours_row_with_ratios_json_and_table(
        tmp_path, tiny_model_dir, tiny_data):
    lines, out = [], tmp_path / "bench.json"
    result = bench.run_bench(methods="lora,full", data=str(tiny_data), model=str(tiny_model_dir), steps=3,
                             batch=4, device="cpu", overrides=TINY_LORA, json_path=str(out), echo=lines.append,
                             rounds=1)

    rows = result["rows"]
    assert [(r["method"], r["variant"]) for r in rows] == [
        ("lora", "reference"), ("lora", "ours"), ("full", "reference"), ("full", "ours")]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["steps_timed"] == 2 and r["tokens_timed"] > 0
        assert r["tokens_per_second"] > 0 and r["step_time_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["flops_per_token"] > 0 and r["mfu"] > 0
        assert r["matmul_peak_flops"] >= result["matmul_peak_flops"]  # the larger of the run's and its own
        # abs: mfu is stored to 4 decimals, which is more than 1 % of it on a slow (loaded) machine
        assert r["mfu"] == pytest.approx(r["tokens_per_second"] * r["flops_per_token"] / r["matmul_peak_flops"],
                                         rel=0.01, abs=5e-5)
    ours = [r for r in rows if r["variant"] == "ours"]
    refs = [r for r in rows if r["variant"] == "reference"]
    for o, ref in zip(ours, refs):
        assert o["ratio_tokens_per_second"] == round(o["tokens_per_second"] / ref["tokens_per_second"], 3)
        assert o["ratio_peak_memory"] == round(o["peak_memory_mb"] / ref["peak_memory_mb"], 3)
        assert o["estimate_mb"] > 0 and o["estimate_error"] is not None
        assert o["padding_share"] == 0 and ref["padding_share"] > 0  # rows differ in length: padding
        assert o["logged_tokens_per_second"] > 0
        assert ref["estimate_mb"] is None and ref["ratio_tokens_per_second"] is None
    full = ours[1]
    assert full["flops_per_token"] > ours[0]["flops_per_token"]  # 6N against 4N

    saved = json.loads(out.read_text())
    assert set(bench.TOP_KEYS) <= set(saved)
    assert saved["matmul_peak_flops"] > 0 and saved["batch"] == 4 and saved["steps"] == 3
    assert [set(r) for r in saved["rows"]] == [set(bench.ROW_KEYS)] * 4
    assert saved["rows"] == rows

    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == bench.table_header().splitlines()[0]
    body = [line.split(" | ") for line in table[1:]]
    assert [(cells[1], cells[2]) for cells in body] == [(r["method"], r["variant"]) for r in rows]


def test_rounds_alternate_the_variants_and_report_the_median_ratio(tmp_path, tiny_model_dir, tiny_data):
    lines = []
    result = bench.run_bench(methods="lora", data=str(tiny_data), model=str(tiny_model_dir), steps=2, batch=4,
                             device="cpu", overrides=TINY_LORA, echo=lines.append, rounds=2)
    assert [(r["variant"], r["round"]) for r in result["rows"]] == [  # in the order they ran
        ("reference", 0), ("ours", 0), ("ours", 1), ("reference", 1)]
    ratios = sorted(r["ratio_tokens_per_second"] for r in result["rows"] if r["variant"] == "ours")
    (summary,) = result["summary"]
    assert set(summary) == set(bench.SUMMARY_KEYS) and summary["rounds"] == 2
    assert summary["ratio_tokens_per_second"] == round((ratios[0] + ratios[1]) / 2, 3)  # the median of two
    assert (summary["ratio_tokens_per_second_min"], summary["ratio_tokens_per_second_max"]) == tuple(ratios)
    assert any("median of 2 rounds" in line for line in lines)


def test_rounds_that_disagree_are_flagged():
    calm = bench.summarise("m", "lora", [(1.8, 0.5), (1.9, 0.5), (1.85, 0.5)])
    busy = bench.summarise("m", "full", [(2.06, 0.6), (0.54, 0.6), (2.0, 0.6)])  # one round under load
    assert not calm["rounds_disagree"] and calm["ratio_tokens_per_second"] == 1.85
    assert busy["rounds_disagree"] and busy["ratio_tokens_per_second"] == 2.0
    assert "disagree" in bench.summary_line(busy) and "disagree" not in bench.summary_line(calm)


def test_matmul_peak_is_whole_flops_as_rows_store_it():
    """A row's peak is the larger of the run's and its own, both from ``matmul_peak``: stored as whole
    FLOP/s alike, or a row's rounded peak fell below the run's unrounded one (97083454539 <
    97083454539.28) whenever the run's measurement was the larger."""
    peak, dtype = bench.matmul_peak("cpu", n=64, repeats=2)
    assert type(peak) is int and peak > 0 and dtype == "float32"


def test_gpu_config_mode_builds_random_models_on_synthetic_rows():
    method = "qlora" if bench.bnb_available("cpu") else "lora"  # qlora: the hand-quantised NF4 layers
    result = bench.run_bench(methods=method, gpu_configs=True, configs="tiny", steps=2, batch=2, seq_len=48,
                             device="cpu", echo=lambda line: None, rounds=1)
    assert result["mode"] == "configs" and result["seq_len"] == 48
    assert [(r["method"], r["variant"]) for r in result["rows"]] == [(method, "reference"), (method, "ours")]
    for r in result["rows"]:
        assert r["error"] is None, r["error"]
        assert r["model"] == "tiny" and r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0
    # synthetic rows are 24..48 tokens: the reference pads each row; ours trains raw text as
    # continued pretraining, rows packed into blocks of seq_len, so a row may be cut between blocks
    assert 24 <= result["rows"][0]["mean_row_tokens"] <= 48
    assert 0 < result["rows"][1]["mean_row_tokens"] <= 48
    assert result["rows"][0]["padding_share"] > 0 and result["rows"][1]["padding_share"] == 0


def test_reference_batches_mask_padding_and_tokens_exclude_it(tokenizer):
    from transformers import DataCollatorWithFlattening

    rows = [[5, 6, 7, 8], [9, 10]]
    padded = bench.reference_batch(tokenizer, rows)
    assert padded["input_ids"].shape == (2, 4)
    assert padded["labels"].tolist() == [[5, 6, 7, 8], [9, 10, -100, -100]]
    stats = {"tokens": 6, "rows": 2, "pairs": 10 + 3}
    assert bench.batch_stats(padded["input_ids"], padded["attention_mask"]) == dict(stats, positions=8)
    packed = DataCollatorWithFlattening()([{"input_ids": r, "labels": r} for r in rows])
    assert bench.batch_stats(packed["input_ids"], None, packed["position_ids"]) == dict(stats, positions=6)


def test_step_counter_counts_training_forwards_only(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    counter = bench.StepCounter()
    counter.attach(model)
    batch = bench.reference_batch(tokenizer, [[5, 6, 7], [8]])
    model.train()
    model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert counter.steps == [{"tokens": 4, "rows": 2, "pairs": 6 + 1, "positions": 6, "with_loss": 6}]
    model.train()  # ours projects only the positions with loss (StudioTrainer's logits_to_keep)
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), logits_to_keep=torch.tensor([1, 2]))
    assert counter.steps[-1]["with_loss"] == 2 and counter.steps[-1]["positions"] == 4


def test_model_flops_follow_the_documented_formula():
    from transformers import LlamaConfig

    config = LlamaConfig(**bench.GPU_CONFIGS["tiny"]["config"])
    h, i, v, L = 64, 128, 32000, 2
    n = L * (h * h + 2 * h * 32 + h * h + 3 * h * i) + v * h  # q, k+v (2 kv heads of 16), o, MLP; tied head
    d = 64
    assert bench.model_flops(config, "lora", tokens=10, pairs=0) == 4 * n * 10
    assert bench.model_flops(config, "full", tokens=10, pairs=55) == 6 * n * 10 + 12 * L * d * 55


def test_bad_settings_exit_2_with_one_error_line():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, fragment in ((["--methods", "lora,bogus"], "--methods"), (["--steps", "1"], "--steps")):
        proc = subprocess.run([sys.executable, "-m", "backend", "bench", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert fragment in lines[0]
