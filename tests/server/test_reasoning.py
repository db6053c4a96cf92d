import pytest

from zizhu.server.reasoning import ReasoningParser, prompt_opens_thinking, split_reasoning


def stream(text: str, cuts: list[int], opened: bool) -> tuple[str | None, str]:
    parser = ReasoningParser(opened)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    return (reasoning if parser.has_reasoning else None), "".join(d.content for d in deltas)


CASES = [
    # (output text, prompt opened <think>, reasoning, content)
    ("plan it</think>The answer", True, "plan it", "The answer"),  # R1 / V3.1 thinking: prompt opened the block
    ("<think>plan it</think>The answer", False, "plan it", "The answer"),  # the model opened it
    ("\n<think>x</think>y", False, "x", "y"),
    ("still thinking", True, "still thinking", ""),  # </think> never came
    ("<think>cut off", False, "cut off", ""),
    ("plain answer", False, None, "plain answer"),
    ("a <think> in the middle", False, None, "a <think> in the middle"),
    ("</think>only content", True, "", "only content"),
    ("<thin", False, None, "<thin"),  # an unfinished tag at the end is text
    ("x</thin", True, "x</thin", ""),
    ("", True, "", ""),
]


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_whole_text(text, opened, reasoning, content):
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_every_split_gives_the_same_answer(text, opened, reasoning, content):
    for cut in range(len(text) + 1):
        assert stream(text, [cut], opened) == (reasoning, content), cut
    assert stream(text, list(range(1, len(text))), opened) == (reasoning, content)  # one character per chunk


def test_tags_are_held_back_not_leaked():
    parser = ReasoningParser(prompt_opened_thinking=True)
    assert parser.feed("abc</th").reasoning == "abc"
    delta = parser.feed("ink>Hi")
    assert (delta.reasoning, delta.content) == ("", "Hi")


def test_prompt_detection():
    assert prompt_opens_thinking("<｜User｜>q<｜Assistant｜><think>\n")
    assert prompt_opens_thinking("<｜User｜>q<｜Assistant｜><think>")
    assert not prompt_opens_thinking("<｜User｜>q<｜Assistant｜></think>")
    assert not prompt_opens_thinking("<｜User｜>q<｜Assistant｜>")
    # a <think> typed by the user in an earlier turn does not count
    assert not prompt_opens_thinking("<｜User｜>what is <think>?<｜Assistant｜></think>")
    assert not prompt_opens_thinking("<｜User｜>what is <think>?<｜Assistant｜>")
