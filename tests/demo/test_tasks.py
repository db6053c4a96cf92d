import random
import re

import pytest

from zizhu.demo import tasks


def test_training_stream_is_deterministic_and_never_held_out():
    first = tasks.TrainingStream(7).take(3000)
    assert first == tasks.TrainingStream(7).take(3000)
    assert not any(tasks.is_held_out(p.family, p.key) for p in first)
    assert {p.family for p in first} == set(tasks.FAMILIES)


def test_levels_bound_problem_size():
    small = tasks.TrainingStream(1).take(600, level=1)
    for p in small:
        if p.family in ("add", "sub", "mul"):
            assert all(len(n) == 1 for n in p.key.split(","))
        elif p.family in ("reverse", "count"):
            assert len(p.key.split(",")[-1]) <= 2
        else:
            assert all(int(v) < 10 for v in p.key.split(", "))


def test_held_out_set_is_balanced_unique_and_held_out():
    problems = tasks.held_out_set(600)
    assert problems == tasks.held_out_set(600)
    assert all(tasks.is_held_out(p.family, p.key) for p in problems)
    assert len({(p.family, p.key) for p in problems}) == 600
    for family in tasks.FAMILIES:
        assert sum(p.family == family for p in problems) == 100


def test_held_out_share_is_about_ten_percent():
    rng = random.Random(5)
    keys = [tasks.make_problem(rng, "add").key for _ in range(5000)]
    share = sum(tasks.is_held_out("add", k) for k in keys) / len(keys)
    assert 0.07 < share < 0.13


def result_of(line: str) -> str:
    return line.rsplit(", ", 1)[1]


@pytest.mark.parametrize("a, b", [(4821, 3957), (9999, 1), (0, 0), (7, 58), (1000, 999)])
def test_addition_trace(a, b):
    lines = tasks.add_reasoning(a, b).split("\n")
    assert lines[0].startswith(f"{a}+{b}: ")
    assert result_of(lines[-1]) == str(a + b)
    for line in lines:
        lhs, rhs = line.split(": ")[1].split(", ")[0].split("=")
        assert sum(map(int, lhs.split("+"))) == int(rhs)


@pytest.mark.parametrize("a, b", [(4821, 3957), (3957, 4821), (1000, 1), (5, 5), (0, 9999), (3, 5)])
def test_subtraction_trace(a, b):
    reasoning = tasks.sub_reasoning(a, b)
    assert reasoning.startswith(f"{a}-{b}: ")
    assert ("borrow left" in reasoning) == (a < b)
    assert int(result_of(reasoning.split("\n")[-1])) == abs(a - b)  # may keep leading zeros


@pytest.mark.parametrize("a, b", [(4821, 7), (9999, 9), (12, 0), (5, 1), (0, 3)])
def test_multiplication_trace(a, b):
    lines = tasks.mul_reasoning(a, b).split("\n")
    assert int(result_of(lines[-1])) == a * b  # b = 0 leaves leading zeros
    for line in lines:
        *steps, _ = line.split(": ")[1].split(", ")
        for step in steps:  # the digit product, then the carry added
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)


def test_word_and_list_traces():
    assert tasks.reverse_reasoning("abc") == "abc\nab|c\na|cb\n|cba"
    assert tasks.count_reasoning("r", "rear") == "r=r 1 'ear'\ne≠r 1 'ar'\na≠r 1 'r'\nr=r 2"
    assert tasks.sort_reasoning([5, 3, 9]) == "5 | 3, 9\n>3, 5 | 9\n3, 5, >9 |"
    assert tasks.sort_reasoning([52, 7, 31, 18]) == "52 | 7, 31, 18\n>7, 52 | 31, 18\n7, >31, 52 | 18\n7, >18, 31, 52 |"


def test_every_answer_is_right_and_follows_the_reasoning():
    rng = random.Random(3)
    for family in tasks.FAMILIES:
        for _ in range(300):
            p = tasks.make_problem(rng, family)
            assert p.completion == f"{p.reasoning}</think>{p.answer}"
            if family in ("add", "sub", "mul"):
                a, op, b = re.fullmatch(r"What is (\d+) (.) (\d+)\?", p.prompt).groups()
                assert int(p.answer) == eval(f"{a}{op}{b}")
            elif family == "sort":
                values = [int(v) for v in re.findall(r"\d+", p.prompt)]
                assert p.answer == ", ".join(map(str, sorted(values)))
                lines = p.reasoning.split("\n")
                assert [int(v) for v in lines[-1].rstrip(" |").replace(">", "").split(", ")] == sorted(values)
                for line, value in zip(lines[1:], values[1:]):  # the number slotted in, and only it, is marked
                    assert re.findall(r">(\d+)", line) == [str(value)]
            elif family == "reverse":
                assert f"'{p.answer[::-1]}'" in p.prompt
                assert p.reasoning.split("\n")[-1] == "|" + p.answer
            else:
                letter, word = re.findall(r"'([a-z]+)'", p.prompt)
                assert p.answer == str(word.count(letter))
