"""Pieces shared by the coded DeepSeek formats: special-token strings, message and DSML helpers."""

from __future__ import annotations

import json

from zizhu.errors import InvalidRequestError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"


def message_text(message: dict, field: str = "content") -> str:
    """A message's text: OpenAI allows a string, None, or a list of {"type": "text"} parts."""
    content = message.get(field)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise InvalidRequestError("only text content parts are supported in messages", param="messages")
        return "".join(texts)
    raise InvalidRequestError(f"message {field} must be a string or a list of text parts", param="messages")


def tool_call_arguments(call: dict) -> dict:
    """The arguments of an OpenAI tool call in a message history, as a dict."""
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"tool call arguments are not valid JSON: {exc}", param="messages") from exc
    if not isinstance(arguments, dict):
        raise InvalidRequestError("tool call arguments must be a JSON object", param="messages")
    return arguments


def to_json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def dsml_invoke(call: dict) -> str:
    """One call in DSML: strings verbatim with string="true", everything else as JSON with string="false"."""
    name = (call.get("function") or {}).get("name")
    if not name:
        raise InvalidRequestError("an assistant tool call has no function name", param="messages")
    parameters = []
    for key, value in tool_call_arguments(call).items():
        is_string = isinstance(value, str)
        text = value if is_string else to_json(value)
        flag = "true" if is_string else "false"
        parameters.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(parameters) + f"\n</{DSML}invoke>"


def dsml_block(block_name: str, calls: list[dict]) -> str:
    invokes = "\n".join(dsml_invoke(call) for call in calls)
    return f"<{DSML}{block_name}>\n{invokes}\n</{DSML}{block_name}>"


def tool_schemas(tools: list[dict]) -> str:
    """One JSON schema per line, taken from OpenAI's {"type": "function", "function": {...}} wrappers."""
    lines = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {'name': ...}}", param="tools")
        lines.append(to_json(function))
    return "\n".join(lines)


def with_tools_in_system(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Attach request-level `tools` to the leading system message (adding one if absent).

    DeepSeek's coded formats describe tools inside the system prompt.
    """
    messages = [dict(m) for m in messages]
    for message in messages:
        if message.get("role") == "developer":
            message["role"] = "system"
    if not tools:
        return messages
    if messages and messages[0].get("role") == "system":
        messages[0]["tools"] = list(messages[0].get("tools") or []) + list(tools)
    else:
        messages.insert(0, {"role": "system", "content": "", "tools": list(tools)})
    return messages


def last_user_index(messages: list[dict]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    return -1
