"""Sampling controls, seeds, stop conditions and text output through the engine."""

import pytest
import torch

from zizhu import LLM, SamplingParams
from zizhu.engine.request import Request
from zizhu.engine.sampler import Sampler
from zizhu.platforms import cpu_kernels


@pytest.fixture(scope="module")
def llm(text_checkpoint):
    path, _ = text_checkpoint
    return LLM(path, dtype="float32", block_size=4, kv_cache_memory=1 << 21)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(10, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _assert_idle(llm):
    assert llm.engine.stats().num_blocks_used == 0


def test_seeded_sampling_is_batch_invariant(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    target = _prompt(11, 0)
    alone = llm.generate([target], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True), SamplingParams(temperature=0, max_tokens=5)]
    batch = llm.generate([_prompt(7, 1), target, _prompt(19, 2)], [others[0], seeded, others[1]])
    assert batch[1].outputs[0].token_ids == alone
    again = llm.generate([_prompt(3, 5), _prompt(4, 6), target], [others[1], others[1], seeded])
    assert again[2].outputs[0].token_ids == alone
    different = llm.generate([target], SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True))
    assert different[0].outputs[0].token_ids != alone
    _assert_idle(llm)


def test_n_samples_differ_and_reproduce(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    first = llm.generate([_prompt(9, 3)], params)[0]
    second = llm.generate([_prompt(9, 3)], params)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    seqs = [tuple(o.token_ids) for o in first.outputs]
    assert len(set(seqs)) == 3
    assert seqs == [tuple(o.token_ids) for o in second.outputs]
    _assert_idle(llm)


def test_greedy_rows_take_the_screened_head(llm, monkeypatch):
    """Plain greedy rows get their tokens from model.greedy_tokens (on the CPU the screened head,
    greedy_head.c), rows that need logits (logprobs, a penalty) from the full logits; the tokens are
    the same either way, alone or mixed in one batch."""
    model = llm.engine.model
    if llm.engine.platform.name == "cpu" and cpu_kernels.load() is not None:
        assert model.head_screen is not None
    rows = []
    screened = model.greedy_tokens
    monkeypatch.setattr(model, "greedy_tokens", lambda hidden: rows.append(hidden.shape[0]) or screened(hidden))
    prompts = [_prompt(n, 20 + n) for n in (5, 9, 14, 3)]
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    assert rows and max(rows) == 4
    rows.clear()
    slow = [o.outputs[0].token_ids for o in llm.generate(prompts, full)]
    assert not rows and slow == fast
    mixed = llm.generate(prompts, [plain, full, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, presence_penalty=0.0), full])
    assert [o.outputs[0].token_ids for o in mixed] == fast and max(rows) == 2
    _assert_idle(llm)


def test_restrictive_filters_reduce_to_greedy(llm):
    prompt = _prompt(13, 4)
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    for params in (
        SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12, ignore_eos=True),
    ):
        assert llm.generate([prompt], params)[0].outputs[0].token_ids == greedy


def test_stop_string_is_excluded_and_reported(llm):
    prompt = _prompt(8, 5)
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) > 12
    stop = text[6:9]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.find(stop)]
    kept = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert kept.text == text[: text.find(stop) + len(stop)]
    _assert_idle(llm)


def test_stop_token_ids_and_eos(llm):
    prompt = _prompt(8, 6)
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop_token = free.token_ids[5]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token]))[0].outputs[0]
    first = free.token_ids.index(stop_token)
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token


def test_min_tokens_blocks_eos():
    sampler = Sampler(eos_token_ids=(1,))
    logits = torch.full((1, 8), -5.0)
    logits[0, 1] = 10.0  # EOS is by far the most likely
    request = Request("r", "r", 0, [3, 4], SamplingParams(temperature=0, min_tokens=2), arrival=0.0)
    tokens, _ = sampler(logits.clone(), [request])
    assert tokens[0] != 1
    request.output_token_ids = [5, 6]
    tokens, _ = sampler(logits.clone(), [request])
    assert tokens[0] == 1


def test_penalties():
    sampler = Sampler(eos_token_ids=())
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    repeated = Request("r", "r", 0, [0], SamplingParams(temperature=0, repetition_penalty=2.0), arrival=0.0)
    assert sampler(logits.clone(), [repeated])[0] == [1]  # 2.0 / 2 = 1.0 < 1.9
    freq = Request("f", "f", 0, [3], SamplingParams(temperature=0, frequency_penalty=1.0), arrival=0.0)
    freq.output_token_ids = [0]
    assert sampler(logits.clone(), [freq])[0] == [1]
    # frequency scales with the count (3 x 0.04 = 0.12 pushes 2.0 below 1.9), presence does not
    counted = Request("c", "c", 0, [3], SamplingParams(temperature=0, frequency_penalty=0.04), arrival=0.0)
    counted.output_token_ids = [0, 0, 0]
    assert sampler(logits.clone(), [counted])[0] == [1]
    flat = Request("p", "p", 0, [3], SamplingParams(temperature=0, presence_penalty=0.04), arrival=0.0)
    flat.output_token_ids = [0, 0, 0]
    assert sampler(logits.clone(), [flat])[0] == [0]
    flat.params = SamplingParams(temperature=0, presence_penalty=0.2)
    assert sampler(logits.clone(), [flat])[0] == [1]


def test_temperature_sampling_follows_the_distribution():
    sampler = Sampler(eos_token_ids=(), seed=0)
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp(min=1e-30).log()[None].repeat(4000, 1)
    requests = [Request(str(i), str(i), 0, [0], SamplingParams(temperature=1.0), arrival=0.0) for i in range(4000)]
    tokens, _ = sampler(logits, requests)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)
    assert freq[3] == 0


def test_logprobs_top_n_and_rank():
    sampler = Sampler(eos_token_ids=())
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    request = Request("r", "r", 0, [0], SamplingParams(temperature=0, logprobs=2), arrival=0.0)
    tokens, lps = sampler(logits, [request])
    expected = torch.log_softmax(logits[0], dim=-1)
    assert tokens == [0] and lps[0].rank == 1
    assert lps[0].top_ids == [0, 2]
    assert lps[0].top_logprobs == pytest.approx(expected[[0, 2]].tolist())
