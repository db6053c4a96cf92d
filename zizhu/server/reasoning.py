"""Split DeepSeek output into reasoning (inside <think>...</think>) and content, chunk by chunk.

R1 and V3.1/V3.2/V4 in thinking mode open `<think>` in the prompt itself, so the output starts inside
the reasoning and only `</think>` appears; other prompts leave it to the model, which may start its
answer with `<think>`. A tag can be split across streamed chunks, so text that could still be the
start of a tag is held back until the next chunk (or the end) decides it.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
ASSISTANT = "<｜Assistant｜>"


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the prompt leaves the assistant inside an open <think> block.

    Only the text after the last assistant marker counts, so a `<think>` typed in an earlier message
    does not switch the parser on.
    """
    turn_start = prompt.rfind(ASSISTANT)
    tail = prompt[turn_start:] if turn_start >= 0 else prompt
    return tail.rfind(THINK_START) > tail.rfind(THINK_END)


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Incremental splitter; `feed` each new piece of text, then `finish` once."""

    _UNDECIDED, _REASONING, _CONTENT = "undecided", "reasoning", "content"

    def __init__(self, prompt_opened_thinking: bool = False):
        self._state = self._REASONING if prompt_opened_thinking else self._UNDECIDED
        self._pending = ""
        self.has_reasoning = prompt_opened_thinking

    def feed(self, text: str) -> ReasoningDelta:
        self._pending += text
        delta = ReasoningDelta()
        if self._state == self._UNDECIDED:
            head = self._pending.lstrip()
            if head.startswith(THINK_START):
                self._state = self._REASONING
                self.has_reasoning = True
                self._pending = head[len(THINK_START) :]
            elif THINK_START.startswith(head):
                return delta  # still could be "<think>" (or only whitespace so far)
            else:
                self._state = self._CONTENT
        if self._state == self._REASONING:
            end = self._pending.find(THINK_END)
            if end < 0:
                keep = partial_marker_len(self._pending, THINK_END)
                delta.reasoning = self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep :]
                return delta
            delta.reasoning = self._pending[:end]
            self._pending = self._pending[end + len(THINK_END) :]
            self._state = self._CONTENT
        delta.content, self._pending = self._pending, ""
        return delta

    def finish(self) -> ReasoningDelta:
        """Flush held-back text. An unclosed <think> leaves everything as reasoning."""
        rest, self._pending = self._pending, ""
        if self._state == self._REASONING:
            return ReasoningDelta(reasoning=rest)
        return ReasoningDelta(content=rest)


def split_reasoning(text: str, prompt_opened_thinking: bool = False) -> tuple[str | None, str]:
    """Whole-text version: (reasoning or None when there was no think block, content)."""
    parser = ReasoningParser(prompt_opened_thinking)
    first, last = parser.feed(text), parser.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if parser.has_reasoning else None), first.content + last.content
