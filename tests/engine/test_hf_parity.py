"""zizhu against the HF transformers reference on every V2/V3 tiny config."""

import math

import pytest
import torch

from tests.checkpoints import ENGINE_CONFIGS, hf_greedy
from zizhu import LLM, SamplingParams
from zizhu.layers import mla
from zizhu.layers.batch import AttentionBatch
from zizhu.platforms import cpu_kernels, get_platform

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    """8 prompts of different lengths; several share 2-3 block prefixes so the prefix cache hits."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    base = rand(13)
    return [rand(3), base[:9], rand(17), base + rand(12), rand(5), base + rand(2), rand(30), [7]]


def _assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_blocks_used == 0, f"{stats.num_blocks_used} KV blocks still held after all requests finished"
    assert stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_prefill_logits_match_hf(tiny_checkpoints, name):
    path, hf = tiny_checkpoints[name]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    model, plat = llm.engine.model, llm.engine.platform
    cfg = llm.engine.model_config
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    caches = plat.allocate_kv_cache(cfg.num_hidden_layers, 16, 4, cfg.kv_latent_dim, torch.float32)
    n = len(ids)
    batch = AttentionBatch(torch.arange(n), torch.arange(16)[None], torch.tensor([n]), [0, n], [n], num_decodes=0)
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(n), batch, caches))
        ref = hf(ids[None]).logits[0]
    assert ref.std() > 1.0, "reference logits too flat for a sensitive comparison"
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_decode_logprobs_match_hf(tiny_checkpoints, name):
    """Each decode step's chosen-token logprob equals HF's log-softmax at that position."""
    path, hf = tiny_checkpoints[name]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    prompt = _prompts(hf.config.vocab_size)[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        expected = ref[len(prompt) - 1 + step, token].item()
        assert math.isclose(entry[token].logprob, expected, abs_tol=1e-4), (step, entry[token].logprob, expected)
        assert entry[token].rank == 1
        assert len(entry) == 3
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_batched_greedy_matches_hf_under_pressure(tiny_checkpoints, name):
    """8 prompts together, with a cache small enough to preempt, chunked prefills and prefix hits."""
    path, hf = tiny_checkpoints[name]
    cfg_width = hf.config.kv_lora_rank + hf.config.qk_rope_head_dim
    bytes_per_block = 4 * cfg_width * hf.config.num_hidden_layers * 4
    llm = LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory=24 * bytes_per_block)
    prompts = _prompts(hf.config.vocab_size)
    outputs = llm.generate(prompts, GREEDY)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the cache was meant to be small enough to force preemption"
    assert stats.prefix_cache_hit_tokens > 0, "shared prefixes were meant to hit the prefix cache"
    assert max(len(p) for p in prompts) > 16, "some prefill was meant to be split into chunks"
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
        assert output.outputs[0].finish_reason == "length"
    _assert_all_blocks_free(llm)


def test_prefix_cache_hit_gives_same_tokens(tiny_checkpoints):
    path, hf = tiny_checkpoints["tiny_deepseek_v3"]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    prompt = _prompts(hf.config.vocab_size)[3]
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("group_rows", [8192, 22])
@pytest.mark.parametrize("name", ENGINE_CONFIGS)
def test_same_length_prompts_prefilled_together_match_hf(tiny_checkpoints, name, group_rows, monkeypatch):
    """Prompts of equal length share one prefill attention call per layer (two groups here, of four
    and of two), or a few when a group's context rows are capped (22 rows: calls of 2, 2 and 2);
    each must still get its own answer."""
    monkeypatch.setattr(mla, "PREFILL_GROUP_ROWS", group_rows)
    path, hf = tiny_checkpoints[name]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, hf.config.vocab_size, (n,), generator=g).tolist() for n in (11, 7, 11, 11, 7, 11)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 8)
    _assert_all_blocks_free(llm)


@pytest.mark.parametrize("name", ["tiny_deepseek_v2_lite", "tiny_deepseek_v3"])
def test_vocab_head_in_platform_layout_matches_hf(tiny_checkpoints, name, monkeypatch):
    """The vocabulary head as the platform lays it out after loading (on the CPU, column panels;
    forced here for a head far below the size that gets them): logits at every prompt position and
    batched greedy tokens still match HF."""
    monkeypatch.setattr(type(get_platform()), "pack_min_bytes", 0, raising=False)
    path, hf = tiny_checkpoints[name]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    model = llm.engine.model
    if cpu_kernels.load() is not None and llm.engine.platform.name == "cpu":
        assert isinstance(model.lm_head.weight, cpu_kernels.PackedWeight)
    with torch.no_grad():
        hidden = torch.randn(37, hf.config.hidden_size, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model.compute_logits(hidden), hf.lm_head(hidden), atol=1e-4, rtol=0)
    prompts = _prompts(hf.config.vocab_size)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
    _assert_all_blocks_free(llm)
