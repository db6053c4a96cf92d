"""The benchmark harness's arithmetic and report writer (fast: no engine, no peer, no checkpoint)."""

import pytest

from benchmarks import checkpoints, report
from benchmarks.model_math import (
    MLAShape,
    decode_bytes_per_token,
    kv_bytes_expanded,
    kv_bytes_latent,
    roofline_tokens_per_s,
)
from benchmarks.roofline import bounds
from benchmarks.workload import EngineResult, Workload, emit, parse_result

# DeepSeek-V3's released config.json (the fields the arithmetic reads).
V3 = dict(
    hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, intermediate_size=18432,
    moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=3,
)


def test_kv_bytes_per_token_matches_the_spec_for_deepseek_v3():
    shape = MLAShape.from_config(V3)
    assert kv_bytes_latent(shape, 2) == 70_272  # spec section 4: (512 + 64) x 61 x 2
    assert kv_bytes_latent(shape, 4) == 140_544
    # Per-head K (192) and V (128) for all 128 heads: 4.9 MB per token in bf16, 71x the latent.
    assert kv_bytes_expanded(shape, 2) == 128 * (192 + 128) * 61 * 2


def test_parameter_counts_match_the_released_and_benchmark_models():
    assert MLAShape.from_config(V3).total_params() == pytest.approx(671e9, rel=2e-3)  # "671B" without MTP
    small = MLAShape.from_config(checkpoints.SPECS["small"])
    assert 0.85e9 < small.total_params() < 0.95e9
    assert small.qk_head_dim == 96


def test_decode_bytes_count_only_the_selected_experts():
    shape = MLAShape.from_config(V3)
    bf16 = decode_bytes_per_token(shape, "bfloat16")
    # DeepSeek-V3 activates ~37B parameters per token.
    assert 36e9 < bf16.weights / 2 < 38e9
    expert = 3 * 7168 * 2048 * 2
    assert bf16.routed_experts == 58 * 8 * expert
    assert bf16.shared_experts == 58 * 1 * expert
    assert bf16.lm_head == 129280 * 7168 * 2
    assert bf16.router == 58 * (256 * 7168 + 256) * 4  # the router stays fp32


def test_int8_halves_bf16_weights_plus_row_scales():
    shape = MLAShape.from_config(checkpoints.SPECS["tiny"])
    bf16 = decode_bytes_per_token(shape, "bfloat16")
    int8 = decode_bytes_per_token(shape, "int8")
    rows = 129280  # lm_head: one fp32 scale per output row
    assert int8.lm_head == bf16.lm_head / 2 + 4 * rows
    assert int8.router == bf16.router


def test_roofline_bound_is_bandwidth_over_bytes():
    shape = MLAShape.from_config(checkpoints.SPECS["small"])
    kv = kv_bytes_latent(shape, 4)
    parts = decode_bytes_per_token(shape, "float32", context_tokens=100, kv_bytes_per_token=kv)
    assert parts.kv_cache == 100 * kv
    assert roofline_tokens_per_s(20e9, parts) == pytest.approx(20e9 / parts.total)
    b = bounds(checkpoints.SPECS["small"], 20.0, 100)
    assert b["fp32"]["bound_tok_s"] == pytest.approx(20e9 / parts.total)
    assert b["bf16"]["bound_tok_s"] > b["fp32"]["bound_tok_s"] and b["int8"]["bound_tok_s"] > b["bf16"]["bound_tok_s"]


def test_worker_result_line_round_trips():
    r = EngineResult("hf", "fp32", decode_b1_tok_s=7.5, concurrent_tok_s={"8": 15.0})
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print("some log line")
        emit(r)
    assert parse_result(buf.getvalue()) == r
    assert parse_result("no result here\n") is None
    assert Workload.from_json(Workload.quick().to_json()) == Workload.quick()


def _run(results):
    wl = Workload.full()
    run = {"model": "small", "timestamp": "t", "params": 880e6, "seed": 0,
           "workload": {**Workload.full().__dict__, "concurrency": list(wl.concurrency)},
           "bandwidth": {"bytes": 2**30, "copy_gb_s": 20.0, "read_gb_s": 18.0},
           "roofline": bounds(checkpoints.SPECS["small"], 20.0, 192),
           "kv_formula": {"zizhu": 36864.0}, "results": [r.to_dict() for r in results]}
    run["ratios"] = report.ratios(results, list(wl.concurrency))
    run["targets"] = report.targets(run, results)
    return run


def test_table_writer_reports_a_missing_peer():
    zizhu = EngineResult("zizhu", "fp32", prefill_tok_s=100.0, decode_b1_tok_s=20.0,
                         concurrent_tok_s={"8": 80.0, "32": 160.0, "64": 200.0}, kv_bytes_per_token=36864.0,
                         peak_rss_bytes=2**31)
    hf = EngineResult("hf", "fp32", prefill_tok_s=50.0, decode_b1_tok_s=4.0,
                      concurrent_tok_s={"8": 16.0, "32": None, "64": None}, peak_rss_bytes=2**32)
    vllm = EngineResult("vllm", "fp32", status=report.NOT_INSTALLED)
    run = _run([zizhu, hf, vllm])
    md = report.markdown(run)
    assert "not installed (run benchmarks/setup_peers.sh)" in md
    hf_ratio = next(r for r in run["ratios"] if r["engine"] == "hf")
    assert hf_ratio["values"]["decode_b1_tok_s"] == pytest.approx(5.0)
    assert hf_ratio["values"]["concurrent:32"] is None
    assert hf_ratio["values"]["peak_rss_bytes"] == pytest.approx(0.5)
    vllm_ratio = next(r for r in run["ratios"] if r["engine"] == "vllm")
    assert all(v is None for v in vllm_ratio["values"].values())
    status = {t["target"]: t["status"] for t in run["targets"]}
    assert status["small 64 concurrent: zizhu fp32 / vLLM-CPU fp32 >= 1.5"].startswith("not measured: vllm fp32 not installed")
    assert status["small decode b1: zizhu int8 / llama.cpp Q8_0 >= 1.0"].startswith("not measured")
    kv = next(t for t in run["targets"] if t["target"].startswith("KV bytes"))
    assert kv["status"].startswith("reached")
    assert "| HF transformers | fp32 | 50.0 | 4.0 | 16.0 | – | – | 4,096 MiB | – | – | ok |" in md


def test_targets_report_reached_and_not_reached():
    z8 = EngineResult("zizhu", "int8", decode_b1_tok_s=30.0, concurrent_tok_s={"32": 300.0})
    q8 = EngineResult("llamacpp", "q8_0", decode_b1_tok_s=60.0, concurrent_tok_s={"32": 100.0})
    status = {t["target"]: t for t in _run([z8, q8])["targets"]}
    b1 = status["small decode b1: zizhu int8 / llama.cpp Q8_0 >= 1.0"]
    assert b1["status"] == "not reached" and b1["value"] == pytest.approx(0.5)
    assert status["small 32 concurrent: zizhu int8 / llama.cpp Q8_0 >= 2.0"]["status"] == "reached"


def test_runner_skips_only_levels_that_cannot_fit_the_limit():
    from benchmarks.runner import run_cases

    def fake_generate(prompts, max_tokens):  # instant: every level runs
        return [max_tokens] * len(prompts)

    wl = Workload(prefill_len=8, prompt_len=4, output_len=3, concurrency=(2, 4), repeats=1)
    r = run_cases(fake_generate, wl, EngineResult("zizhu", "fp32"))
    assert set(r.concurrent_tok_s) == {"2", "4"} and all(v for v in r.concurrent_tok_s.values())
    assert not r.notes

    import time

    def slow_generate(prompts, max_tokens):  # 10 ms per prompt token and per decode step
        time.sleep(0.01 * (len(prompts) * len(prompts[0]) + max_tokens))
        return [max_tokens] * len(prompts)

    wl = Workload(prefill_len=8, prompt_len=4, output_len=3, concurrency=(1000,), repeats=1, max_case_seconds=5)
    r = run_cases(slow_generate, wl, EngineResult("hf", "fp32"))
    assert r.concurrent_tok_s == {"1000": None}
    assert "skipped: estimated at least" in r.notes[0]
