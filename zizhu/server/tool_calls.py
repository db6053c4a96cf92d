"""Parse DeepSeek tool-call blocks out of generated text into OpenAI tool calls, chunk by chunk.

Each generation writes its calls as one delimited block:

    V3    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    V3.1  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
    V3.2  <｜DSML｜function_calls>\\n<｜DSML｜invoke name="NAME">\\n<｜DSML｜parameter name="P" string="true|false">V</｜DSML｜parameter>\\n</｜DSML｜invoke>\\n</｜DSML｜function_calls>
    V4    the same DSML, with the block called tool_calls

A block is held back until it closes and only then parsed as a whole. So a streamed reply and a
non-streamed reply agree exactly, and a malformed block (bad JSON, missing pieces, never closed) is
handed back verbatim as content instead of half-emitted as calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from zizhu.server.reasoning import partial_marker_len


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ToolCallDelta:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _segments(body: str, pattern: re.Pattern) -> list[re.Match] | None:
    """All matches of `pattern` in `body`, or None if anything but whitespace lies between them."""
    matches, position = [], 0
    for match in pattern.finditer(body):
        if body[position : match.start()].strip():
            return None
        matches.append(match)
        position = match.end()
    if body[position:].strip():
        return None
    return matches


class ToolCallFormat:
    """One generation's block syntax. `parse_body` gets the text between the block markers."""

    name: str
    block_start: str
    block_end: str

    def parse_body(self, body: str) -> list[ToolCall] | None:
        raise NotImplementedError


class DeepSeekV3Format(ToolCallFormat):
    name = "deepseek_v3"
    block_start = "<｜tool▁calls▁begin｜>"
    block_end = "<｜tool▁calls▁end｜>"
    _call = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)
    _inner = re.compile(r"\s*function<｜tool▁sep｜>([^\n]+)\n```(?:json)?\n(.*)\n```\s*", re.DOTALL)

    def parse_body(self, body: str) -> list[ToolCall] | None:
        calls = []
        for segment in _segments(body, self._call) or []:
            call = self._parse_call(segment.group(1))
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _parse_call(self, text: str) -> ToolCall | None:
        match = self._inner.fullmatch(text)
        if match is None or _json_object(match.group(2)) is None:
            return None
        return ToolCall(name=match.group(1).strip(), arguments=match.group(2).strip())


class DeepSeekV31Format(DeepSeekV3Format):
    name = "deepseek_v31"
    _inner = re.compile(r"\s*([^<>\n]+?)\s*<｜tool▁sep｜>(.*)", re.DOTALL)

    def _parse_call(self, text: str) -> ToolCall | None:
        match = self._inner.fullmatch(text)
        if match is None or _json_object(match.group(2)) is None:
            return None
        return ToolCall(name=match.group(1), arguments=match.group(2).strip())


class DsmlFormat(ToolCallFormat):
    """V3.2 and V4: DSML invoke/parameter elements; parameter values are raw strings or JSON."""

    _invoke = re.compile(r'<｜DSML｜invoke name="([^"<>\n]+)">(.*?)</｜DSML｜invoke>', re.DOTALL)
    _parameter = re.compile(
        r'<｜DSML｜parameter name="([^"<>\n]+)" string="(true|false)">(.*?)</｜DSML｜parameter>', re.DOTALL
    )

    def __init__(self, name: str, block_name: str):
        self.name = name
        self.block_start = f"<｜DSML｜{block_name}>"
        self.block_end = f"</｜DSML｜{block_name}>"

    def parse_body(self, body: str) -> list[ToolCall] | None:
        calls = []
        for invoke in _segments(body, self._invoke) or []:
            arguments = {}
            parameters = _segments(invoke.group(2), self._parameter)
            if parameters is None:
                return None
            for parameter in parameters:
                key, is_string, raw = parameter.groups()
                if key in arguments:
                    return None
                if is_string == "true":
                    arguments[key] = raw
                else:
                    try:
                        arguments[key] = json.loads(raw)
                    except json.JSONDecodeError:
                        return None
            calls.append(ToolCall(name=invoke.group(1), arguments=json.dumps(arguments, ensure_ascii=False)))
        return calls or None


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    fmt.name: fmt
    for fmt in (
        DeepSeekV3Format(),
        DeepSeekV31Format(),
        DsmlFormat("deepseek_v32", "function_calls"),
        DsmlFormat("deepseek_v4", "tool_calls"),
    )
}


def detect_tool_call_format(model_type: str, chat_template: str | None) -> str | None:
    """Pick the tool-call syntax from config.json's model_type and the checkpoint's chat template."""
    if model_type in ("deepseek_v32", "deepseek_v4"):
        return model_type
    if chat_template and "<｜tool▁call▁begin｜>" in chat_template:
        return "deepseek_v3" if "```json" in chat_template else "deepseek_v31"
    if model_type == "deepseek_v3":
        return "deepseek_v3"
    return None


class ToolCallParser:
    """Incremental: `feed` new text, get back content to show and calls completed so far; then `finish`."""

    def __init__(self, fmt: ToolCallFormat | str):
        self.format = TOOL_CALL_FORMATS[fmt] if isinstance(fmt, str) else fmt
        self._pending = ""
        self._in_block = False
        self._gap = ""  # whitespace dropped before the open block, restored if the block is malformed
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> ToolCallDelta:
        self._pending += text
        delta = ToolCallDelta()
        start, end = self.format.block_start, self.format.block_end
        while True:
            if not self._in_block:
                found = self._pending.find(start)
                if found < 0:
                    # Hold back what may begin a block, and trailing whitespace that would sit
                    # between the content and a block.
                    ready = self._pending[: len(self._pending) - partial_marker_len(self._pending, start)]
                    ready = ready.rstrip()
                    delta.content += ready
                    self._pending = self._pending[len(ready) :]
                    return delta
                before = self._pending[:found].rstrip()
                delta.content += before
                self._gap = self._pending[len(before) : found]
                self._pending = self._pending[found:]
                self._in_block = True
            closed = self._pending.find(end, len(start))
            if closed < 0:
                return delta
            block = self._pending[: closed + len(end)]
            self._pending = self._pending[closed + len(end) :]
            self._in_block = False
            calls = self.format.parse_body(block[len(start) : -len(end)])
            if calls is None:
                delta.content += self._gap + block
            else:
                delta.calls.extend(calls)
                self.calls.extend(calls)

    def finish(self) -> ToolCallDelta:
        """Flush held-back text; an unclosed block is returned as content."""
        rest, self._pending = self._pending, ""
        if self._in_block:
            rest = self._gap + rest
        self._in_block = False
        return ToolCallDelta(content=rest)


def parse_tool_calls(text: str, fmt: ToolCallFormat | str) -> tuple[str, list[ToolCall]]:
    """Whole-text version: (content, calls)."""
    parser = ToolCallParser(fmt)
    first, last = parser.feed(text), parser.finish()
    return first.content + last.content, first.calls + last.calls
