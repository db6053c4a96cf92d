"""End-to-end oracle: the demo model must get held-out problems right through zizhu's engine, and say
exactly what transformers says. A wrong digit anywhere in the engine (attention, cache, router,
sampler, detokenizer) shows up here as a wrong answer."""

import pytest

from zizhu.demo import DEMO_MODEL_DIR, tasks
from zizhu.demo.evaluate import MAX_NEW_TOKENS, answer_of
from zizhu.demo.tokenizer import prompt_text

zizhu = pytest.importorskip("zizhu")
if not hasattr(zizhu, "LLM"):
    pytest.skip("zizhu.LLM is not available on this branch yet", allow_module_level=True)

SLICE = 120  # twenty problems per family
TARGET = 0.99
# Families the shipped model does not yet answer at the 99% bar, with the accuracy it measures on the
# full held-out set. They are held to that figure less a margin instead of the target: a better model
# still passes, and an engine bug, which breaks far more than a few problems, still fails.
BELOW_TARGET = {"sub": 0.982, "sort": 0.958}
MARGIN = 0.1


def allowed_misses(family: str, n: int) -> int:
    """How many of `n` problems a family may miss: none at the target, else its measured share plus
    the margin (sub and sort: 2 of 20 each)."""
    if family not in BELOW_TARGET:
        return 0
    return int(n * (1 - BELOW_TARGET[family] + MARGIN))


@pytest.fixture(scope="module")
def llm():
    return zizhu.LLM(str(DEMO_MODEL_DIR), dtype="float32")


def greedy(llm, prompts):
    params = zizhu.SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
    return [o.outputs[0].text for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def slice_answers(llm):
    problems = tasks.held_out_set(SLICE)
    return problems, greedy(llm, [prompt_text(p.prompt) for p in problems])


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_held_out_slice_is_answered_correctly(slice_answers, family):
    problems, texts = slice_answers
    rows = [(p, t) for p, t in zip(problems, texts) if p.family == family]
    wrong = [(p.prompt, p.answer, t) for p, t in rows if answer_of(t) != p.answer]
    assert len(rows) == SLICE // len(tasks.FAMILIES)
    assert len(wrong) <= allowed_misses(family, len(rows)), wrong


def test_chat_applies_the_thinking_template(llm):
    params = zizhu.SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
    out = llm.chat([[{"role": "user", "content": "What is 4821 + 3957?"}]], params)
    assert answer_of(out[0].outputs[0].text) == "8778"


def test_batched_and_one_by_one_agree(llm):
    problems = tasks.held_out_set(12)
    prompts = [prompt_text(p.prompt) for p in problems]
    assert greedy(llm, prompts) == [greedy(llm, [p])[0] for p in prompts]


def test_matches_transformers(llm):
    pytest.importorskip("transformers")
    from zizhu.demo.evaluate import generate_hf

    problems = tasks.held_out_set(SLICE)[:18]
    prompts = [prompt_text(p.prompt) for p in problems]
    assert greedy(llm, prompts) == generate_hf(DEMO_MODEL_DIR, prompts)


@pytest.mark.slow
def test_full_held_out_set():
    from zizhu.demo.evaluate import evaluate

    scores = evaluate(DEMO_MODEL_DIR, n=1000, backend="zizhu")
    for s in scores.values():
        assert s.accuracy >= BELOW_TARGET.get(s.family, TARGET), s
