"""benchmarks.quality: the measure lines up with the model's own tokens, reads zero for fp32 against
itself, and sees the rounding of int8 and bf16."""

from pathlib import Path

from benchmarks import quality


def test_quality_against_fp32(tiny_checkpoints, monkeypatch):
    path, _ = tiny_checkpoints["tiny_deepseek_v3"]
    monkeypatch.setattr(quality, "LLAMACPP_PYTHON", Path("/bin/false"))  # a peer that fails is skipped
    self_agreement, results = quality.compare(path, ["fp32", "int8", "bf16"], n_prompts=3, prompt_len=9, tokens=12,
                                              peers=("q8_0",))
    # teacher-forcing fp32 on its own greedy output gives back those tokens: positions line up
    assert self_agreement >= 0.95
    assert [r.variant for r in results] == ["fp32", "int8", "bf16"]
    same, *rounded = results
    assert (same.top1_agreement, same.max_abs_logit_diff, same.max_kl) == (1.0, 0.0, 0.0)
    assert (same.greedy_token_agreement, same.identical_sequences) == (1.0, 3)
    for r in rounded:
        assert r.positions == 3 * 12
        assert 0.0 < r.mean_abs_logit_diff <= r.median_position_max_diff <= r.max_abs_logit_diff
        assert r.top1_agreement >= 0.75 and 0.0 <= r.mean_kl <= r.max_kl and r.mean_kl < 0.1
        assert 0.0 <= r.greedy_token_agreement <= 1.0 and r.identical_sequences <= 3
    setup = dict(prompts=3, prompt_len=9, tokens=12, fp32_self_agreement=self_agreement, when="now")
    text = quality.markdown("t", setup, rounded)
    assert "| int8 | " in text and "| bf16 | " in text
