import json

import pytest

from zizhu.chat_formats import render_chat
from zizhu.errors import ConfigError, InvalidRequestError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
DSML_PARAMS = (
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>"
)


def test_unknown_model_type_is_a_config_error():
    with pytest.raises(ConfigError, match="deepseek_v32"):
        render_chat("deepseek_v3", [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v4"])
def test_plain_chat_and_generation_prompt(model_type):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = render_chat(model_type, messages)
    assert chat == f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜></think>"
    assert render_chat(model_type, messages, thinking=True).endswith("<｜User｜>Hi<｜Assistant｜><think>")
    assert render_chat(model_type, messages, add_generation_prompt=False) == f"{BOS}Be brief.<｜User｜>Hi"


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v4"])
def test_multi_turn_drops_old_reasoning(model_type):
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "one plus one"},
        {"role": "user", "content": "2+2?"},
    ]
    text = render_chat(model_type, messages, thinking=True)
    assert text == f"{BOS}<｜User｜>1+1?<｜Assistant｜></think>2{EOS}<｜User｜>2+2?<｜Assistant｜><think>"
    assert "one plus one" not in text


def test_v32_tool_round_trip():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = render_chat("deepseek_v32", messages, tools=TOOLS)
    assert text.startswith(BOS + "## Tools\n")
    assert json.dumps(TOOLS[0]["function"]) in text
    assert text.endswith(
        "<｜User｜>Weather in Paris?<｜Assistant｜></think>"
        f"\n\n<｜DSML｜function_calls>\n{DSML_PARAMS}\n</｜DSML｜function_calls>{EOS}"
        "\n\n<function_results>\n<result>sunny</result>\n</function_results>\n\n</think>"
    )


def test_v32_thinking_keeps_reasoning_of_the_current_turn():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
    ]
    text = render_chat("deepseek_v32", messages, tools=TOOLS, thinking=True)
    assert "<｜Assistant｜><think>use the tool</think>\n\n<｜DSML｜function_calls>" in text
    assert text.endswith("<function_results>\n<result>sunny</result>\n<result>warm</result>\n</function_results>\n\n<think>")


def test_v4_tool_results_become_a_user_turn_and_keep_reasoning():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": [CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
    ]
    text = render_chat("deepseek_v4", messages, tools=TOOLS, thinking=True)
    assert text.startswith(BOS + "sys\n\n## Tools\n\n")
    assert f"<｜Assistant｜><think>use the tool</think>\n\n<｜DSML｜tool_calls>\n{DSML_PARAMS}\n</｜DSML｜tool_calls>{EOS}" in text
    assert text.endswith("<｜User｜><tool_result>sunny</tool_result>\n\n<tool_result>warm</tool_result><｜Assistant｜><think>")


def test_v4_reasoning_effort_and_reminder():
    messages = [{"role": "user", "content": "Prove it."}, {"role": "latest_reminder", "content": "today is Monday"}]
    text = render_chat("deepseek_v4", messages, thinking=True, reasoning_effort="max")
    assert text.startswith(BOS + "Reasoning Effort: Absolute maximum")
    assert text.endswith("<｜User｜>Prove it.<｜Assistant｜><think><｜latest_reminder｜>today is Monday")
    with pytest.raises(InvalidRequestError):
        render_chat("deepseek_v4", messages, reasoning_effort="extreme")


@pytest.mark.parametrize("model_type", ["deepseek_v32", "deepseek_v4"])
def test_bad_conversations_are_request_errors(model_type):
    with pytest.raises(InvalidRequestError):
        render_chat(model_type, [{"role": "tool", "content": "orphan result"}])
    with pytest.raises(InvalidRequestError):
        render_chat(model_type, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    bad_call = {"type": "function", "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(InvalidRequestError):
        render_chat(model_type, [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [bad_call]}])


def test_content_parts_are_joined():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert render_chat("deepseek_v32", [{"role": "user", "content": parts}]).endswith("<｜User｜>Hello<｜Assistant｜></think>")
