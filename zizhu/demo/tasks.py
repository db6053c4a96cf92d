"""The demo model's synthetic tasks: problems, step-by-step reasoning, answers.

Six families, each a single chat turn. The assistant reply is `<think>{reasoning}</think>{answer}`,
and both parts are fully determined by the problem, so greedy decoding has exactly one right output.

    add       What is 4821 + 3957?                  column sums from the units up
    sub       What is 4821 - 3957?                  column differences with borrows
    mul       What is 4821 * 7?                     digit products with carries
    sort      Sort these numbers: 52, 7, 31.        insert each number into the sorted part, marked
    reverse   Reverse the word 'planet'.            move letters one by one to the reversed part
    count     How many times does the letter 'r' appear in 'strawberry'?   compare, running count

The reasoning is written so that every step is a short, local lookup for a small model: column
arithmetic runs from the units digit up, and the partial result is rebuilt on each line (so the
answer never has to be reversed in one go); words and the rest of a word are
written one letter per token, as the prompt has them.

Train/test split: every problem has a key (its operands, its list, its word). A hash of the key puts it
in the held-out bucket or not, so a held-out problem is never generated for training, and the split
does not depend on the seed or on the order of generation.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

FAMILIES = ("add", "sub", "mul", "sort", "reverse", "count")

HELD_OUT_PERCENT = 10  # share of the key space kept for evaluation

MAX_LEVEL = 4  # problem size: operand digits; words up to 2*level letters; lists of level+1 numbers
SORT_MAX = 99  # sort values are 0..SORT_MAX, distinct


@dataclass(frozen=True)
class Problem:
    family: str
    key: str  # what the held-out split hashes: the operands, never the phrasing
    prompt: str  # the user message
    reasoning: str  # the text between <think> and </think>
    answer: str  # the text after </think>

    @property
    def completion(self) -> str:
        """The assistant turn after the generation prompt `<｜Assistant｜><think>`."""
        return f"{self.reasoning}</think>{self.answer}"


def is_held_out(family: str, key: str) -> bool:
    digest = hashlib.sha256(f"{family}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELD_OUT_PERCENT


# ---------------------------------------------------------------- reasoning for each family
#
# Every line restates what is left of the problem, so each step reads only what sits next to it:
# the digit it needs is the last one before `+` or `:` on its own line, the carry is on the line
# above, and the rest of the line is a copy of the line above with one item removed or added.


def add_reasoning(a: int, b: int) -> str:
    """`482+395: 2+5=7, 78`: remaining operands, their last digits summed with the carry, result so far."""
    lines, result, carry = [], "", 0
    while a or b or carry or not lines:
        x, y = a % 10, b % 10
        s = x + y + carry
        result = f"{s % 10}{result}"
        lines.append(f"{a}+{b}: {x}+{y}{'+1' if carry else ''}={s}, {result}")
        a, b, carry = a // 10, b // 10, s // 10
    return "\n".join(lines)


def _sub_lines(a: int, b: int) -> tuple[list[str], str, int]:
    """Column subtraction lines for a - b; returns the lines, the digits and the final borrow."""
    lines, result, borrow = [], "", 0
    while a or b or not lines:
        x, y = a % 10, b % 10
        terms = f"{x}-{y}{'-1' if borrow else ''}"
        d = x - y - borrow
        if d < 0:
            step = f"{terms}<0, 1{terms}={d + 10}"
            d, borrow = d + 10, 1
        else:
            step, borrow = f"{terms}={d}", 0
        result = f"{d}{result}"
        lines.append(f"{a}-{b}: {step}, {result}")
        a, b = a // 10, b // 10
    return lines, result, borrow


def sub_reasoning(a: int, b: int) -> str:
    """Column subtraction with borrows. A borrow left over at the end means a < b: say so and
    subtract the other way round."""
    lines, _, borrow = _sub_lines(a, b)
    if borrow:
        swapped, _, _ = _sub_lines(b, a)
        lines += [f"borrow left, so {a}<{b} and {a}-{b}=-({b}-{a})", *swapped]
    return "\n".join(lines)


def mul_reasoning(a: int, b: int) -> str:
    """`48*7: 8*7=56, 56+1=57, 47`: remaining digits, last digit times b, plus the carry as a second
    step (one table lookup and one small addition, never both at once), result so far."""
    lines, result, carry = [], "", 0
    while a or carry or not lines:
        x = a % 10
        product = x * b
        p = product + carry
        result = f"{p % 10}{result}"
        step = f"{x}*{b}={product}" + (f", {product}+{carry}={p}" if carry else "")
        lines.append(f"{a}*{b}: {step}, {result}")
        a, carry = a // 10, p // 10
    return "\n".join(lines)


def sort_reasoning(values: list[int]) -> str:
    """Insertion sort: `7, >31, 52 | 18`, the first number left is put into its place in the sorted
    part, marked with `>` on the line where it lands. Each line drops the head of the rest and copies
    the sorted part with one number slotted in.

    The mark is what makes the moved number's digits stick together. Without it most sort errors were
    a moved number's ones digit copied from the number that stood in its place on the line above
    (5, 71, 93 | 64 -> 5, 61, 74, 93): the model copies the line above position by position, and a
    slotted-in number looks like one more position. After `>` it has a token of its own to copy from
    the head of the rest (sort alone, 1,200 steps: 165/167 held-out vs 137/167 unmarked). Numbers stay
    digit by digit, as in the arithmetic traces: written as one token each (`#64`) they cost add, sub
    and mul half their learning speed in the mixed run, since those lean on the same digit copying."""
    done, lines = [], []
    for i, v in enumerate(values):
        done = sorted([*done, v])
        slotted = ", ".join(f">{x}" if i and x == v else str(x) for x in done)
        lines.append(f"{slotted} | {', '.join(map(str, values[i + 1 :]))}".rstrip())
    return "\n".join(lines)


def reverse_reasoning(word: str) -> str:
    """`plan|ten`: move the last letter of what is left to the end of the reversed part. The bar (not a
    space) keeps every letter its own token, as in the prompt."""
    lines = [word]
    for i in range(1, len(word) + 1):
        lines.append(f"{word[: len(word) - i]}|{word[::-1][:i]}")
    return "\n".join(lines)


def count_reasoning(letter: str, word: str) -> str:
    """`r=r 1 'awberry'`: the next letter compared with the one counted, the count so far, the letters
    still to look at. Writing the comparison puts both letters side by side before the count; the
    quotes keep the rest tokenized letter by letter, as in the prompt."""
    lines, n = [], 0
    for i, c in enumerate(word):
        n += c == letter
        rest = word[i + 1 :]
        lines.append(f"{c}{'=' if c == letter else '≠'}{letter} {n}" + (f" '{rest}'" if rest else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- problems

# One phrasing per family: a small model learns the tasks, not paraphrase.
PROMPTS = {
    "add": "What is {a} + {b}?",
    "sub": "What is {a} - {b}?",
    "mul": "What is {a} * {b}?",
    "sort": "Sort these numbers: {items}.",
    "reverse": "Reverse the word '{w}'.",
    "count": "How many times does the letter '{c}' appear in '{w}'?",
}


def random_operand(rng: random.Random, level: int) -> int:
    """A length drawn uniformly first, so short and long operands are equally common."""
    n = rng.randint(1, level)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def random_word(rng: random.Random, level: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 2 * level)))


def make_problem(rng: random.Random, family: str, level: int = MAX_LEVEL) -> Problem:
    """One random problem of `family` no bigger than `level` (either split; callers filter with
    is_held_out). Smaller levels only exist to start training on short problems."""
    prompt = PROMPTS[family]
    if family in ("add", "sub", "mul"):
        a = random_operand(rng, level)
        b = rng.randint(0, 9) if family == "mul" else random_operand(rng, level)
        if family == "sub" and a < b and rng.random() < 0.5:
            a, b = b, a  # a quarter of subtractions go negative; those need two passes
        value, reasoning = {
            "add": (a + b, add_reasoning),
            "sub": (a - b, sub_reasoning),
            "mul": (a * b, mul_reasoning),
        }[family]
        return Problem(family, f"{a},{b}", prompt.format(a=a, b=b), reasoning(a, b), str(value))
    if family == "sort":
        top = 9 if level == 1 else SORT_MAX
        values = rng.sample(range(top + 1), rng.randint(3, min(5, level + 2)))
        items = ", ".join(map(str, values))
        answer = ", ".join(map(str, sorted(values)))
        return Problem(family, items, prompt.format(items=items), sort_reasoning(values), answer)
    if family == "reverse":
        word = random_word(rng, level)
        return Problem(family, word, prompt.format(w=word), reverse_reasoning(word), word[::-1])
    if family == "count":
        word = random_word(rng, level)
        # Mostly a letter of the word, sometimes any letter, so that zero counts occur too.
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(string.ascii_lowercase)
        answer = str(word.count(letter))
        return Problem(family, f"{letter},{word}", prompt.format(c=letter, w=word), count_reasoning(letter, word), answer)
    raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")


def sample(rng: random.Random, family: str, held_out: bool, level: int = MAX_LEVEL) -> Problem:
    """Draw problems until one lands on the requested side of the split."""
    while True:
        problem = make_problem(rng, family, level)
        if is_held_out(family, problem.key) == held_out:
            return problem


# Training share of each family, relative: the ones with longer chains of steps get more problems.
FAMILY_WEIGHTS = {"add": 1.0, "sub": 1.5, "mul": 1.5, "sort": 2.0, "reverse": 0.75, "count": 0.75}


class TrainingStream:
    """An endless, seeded stream of training problems (never a held-out key), families drawn by
    `weights` (FAMILY_WEIGHTS unless given)."""

    def __init__(self, seed: int, families: tuple[str, ...] = FAMILIES, weights: dict[str, float] | None = None):
        self.rng = random.Random(seed)
        self.families = families
        self.weights = [(weights or FAMILY_WEIGHTS)[f] for f in families]

    def take(self, n: int, level: int = MAX_LEVEL) -> list[Problem]:
        draws = self.rng.choices(self.families, self.weights, k=n)
        return [sample(self.rng, family, held_out=False, level=level) for family in draws]


def held_out_set(n: int = 1000, seed: int = 1234) -> list[Problem]:
    """`n` held-out problems, as equal a share per family as n allows, in a fixed order."""
    rng = random.Random(seed)
    problems, seen = [], set()
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        while True:
            p = sample(rng, family, held_out=True)
            if (family, p.key) not in seen:  # small key spaces could repeat a problem
                seen.add((family, p.key))
                problems.append(p)
                break
    return problems
