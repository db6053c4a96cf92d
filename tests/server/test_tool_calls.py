import json

import pytest

from zizhu.server.tool_calls import ToolCallParser, detect_tool_call_format, parse_tool_calls

V3_CALL = (
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris"}\n```<｜tool▁call▁end｜>'
)
V3_CALL_2 = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>"
V31_CALL = '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
V31_CALL_2 = "<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜>"


def dsml(block: str, params: str) -> str:
    return (
        f'<｜DSML｜{block}>\n<｜DSML｜invoke name="get_weather">\n{params}\n</｜DSML｜invoke>\n'
        f'<｜DSML｜invoke name="get_time">\n</｜DSML｜invoke>\n</｜DSML｜{block}>'
    )


DSML_PARAMS = (
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>'
)

VALID = [
    ("deepseek_v3", f"Let me check.\n\n<｜tool▁calls▁begin｜>{V3_CALL}\n{V3_CALL_2}<｜tool▁calls▁end｜>"),
    ("deepseek_v31", f"Let me check.<｜tool▁calls▁begin｜>{V31_CALL}{V31_CALL_2}<｜tool▁calls▁end｜>"),
    ("deepseek_v32", "Let me check.\n\n" + dsml("function_calls", DSML_PARAMS)),
    ("deepseek_v4", "Let me check.\n\n" + dsml("tool_calls", DSML_PARAMS)),
]


@pytest.mark.parametrize("fmt, text", VALID)
def test_valid_blocks(fmt, text):
    content, calls = parse_tool_calls(text, fmt)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    expected = {"city": "Paris", "days": 3} if "DSML" in text else {"city": "Paris"}
    assert json.loads(calls[0].arguments) == expected
    assert json.loads(calls[1].arguments) == {}
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def streamed(text: str, fmt: str, cuts: list[int]):
    parser = ToolCallParser(fmt)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    return "".join(d.content for d in deltas), [(c.name, c.arguments) for d in deltas for c in d.calls]


MALFORMED = [
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": \n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    ("deepseek_v3", "<｜tool▁calls▁begin｜>" + V3_CALL),  # never closed
    ("deepseek_v31", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"a": 1<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>[1, 2]<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    ("deepseek_v31", "<｜tool▁calls▁begin｜>junk" + V31_CALL + "<｜tool▁calls▁end｜>"),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>"),  # empty block
    ("deepseek_v32", dsml("function_calls", '<｜DSML｜parameter name="days" string="false">three</｜DSML｜parameter>')),
    ("deepseek_v32", dsml("function_calls", '<｜DSML｜parameter name="x" string="maybe">1</｜DSML｜parameter>')),
    ("deepseek_v32", dsml("function_calls", DSML_PARAMS)[:-30]),  # cut off
    ("deepseek_v4", dsml("tool_calls", DSML_PARAMS + "\n" + DSML_PARAMS)),  # duplicate parameter
]


@pytest.mark.parametrize("fmt, text", MALFORMED)
def test_malformed_blocks_come_back_as_content(fmt, text):
    text = "Answer: " + text
    content, calls = parse_tool_calls(text, fmt)
    assert calls == []
    assert content == text


@pytest.mark.parametrize("fmt, text", VALID + MALFORMED)
def test_every_split_gives_the_same_answer(fmt, text):
    whole_content, whole_calls = parse_tool_calls(text, fmt)
    whole = (whole_content, [(c.name, c.arguments) for c in whole_calls])
    for cut in range(len(text) + 1):
        assert streamed(text, fmt, [cut]) == whole, cut
    assert streamed(text, fmt, list(range(1, len(text)))) == whole


def test_content_streams_before_the_block_and_calls_arrive_when_it_closes():
    parser = ToolCallParser("deepseek_v31")
    assert parser.feed("Sure, ").content == "Sure,"  # trailing space held: it may precede a block
    assert parser.feed("checking.<｜tool▁calls▁begin｜>").content == " checking."
    delta = parser.feed(V31_CALL)
    assert delta.content == "" and delta.calls == []
    delta = parser.feed("<｜tool▁calls▁end｜>")
    assert [c.name for c in delta.calls] == ["get_weather"]
    assert parser.finish().content == ""


def test_text_without_calls_passes_through():
    assert parse_tool_calls("no tools here, <｜tool not a marker", "deepseek_v3") == ("no tools here, <｜tool not a marker", [])


def test_format_detection():
    v3_template = "{{'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + name + '\\n```json\\n'}}"
    v31_template = "{{'<｜tool▁call▁begin｜>' + name + '<｜tool▁sep｜>' + arguments}}"
    assert detect_tool_call_format("deepseek_v3", v3_template) == "deepseek_v3"
    assert detect_tool_call_format("deepseek_v3", v31_template) == "deepseek_v31"
    assert detect_tool_call_format("deepseek_v32", None) == "deepseek_v32"
    assert detect_tool_call_format("deepseek_v4", None) == "deepseek_v4"
    assert detect_tool_call_format("deepseek_v2", None) is None
