"""DeepSeek-V3.2 prompt format (DeepSeek ships it as code, `encoding_dsv32`, not as Jinja).

    BOS {system}[\\n\\n{tools}] <｜User｜>{u}<｜Assistant｜>(<think> | </think>) {reasoning</think>}{a}[\\n\\n{DSML calls}] EOS
    tool results follow the assistant turn directly:
    \\n\\n<function_results>\\n<result>{r}</result>...\\n</function_results>\\n\\n(<think> | </think>)

The assistant transition opens `<think>` only for the last user turn in thinking mode; every earlier
turn, and every turn in chat mode, gets `</think>`. Reasoning of earlier turns is not rendered.
Tool calls use DSML: `<｜DSML｜function_calls>` holding `<｜DSML｜invoke name=...>` blocks.
"""

from __future__ import annotations

from zizhu.chat_formats.common import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    THINK_END,
    THINK_START,
    USER,
    dsml_block,
    last_user_index,
    message_text,
    tool_schemas,
    with_tools_in_system,
)
from zizhu.errors import InvalidRequestError

CALLS_BLOCK = "function_calls"


def tools_prompt(tools: list[dict]) -> str:
    return (
        "## Tools\n"
        f'You can call the functions listed below. To call one or more, write a "<{DSML}{CALLS_BLOCK}>" block in your reply:\n'
        f"<{DSML}{CALLS_BLOCK}>\n"
        f'<{DSML}invoke name="$FUNCTION_NAME">\n'
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
        "...\n"
        f"</{DSML}invoke>\n"
        f"</{DSML}{CALLS_BLOCK}>\n"
        'Write string values as they are and mark them string="true"; write numbers, booleans, arrays and '
        'objects as JSON and mark them string="false".\n'
        "The results come back in a <function_results> block holding one <result> per call; in thinking mode, "
        f"think about them inside {THINK_START}...{THINK_END} before answering.\n"
        "The functions, as JSON Schema:\n"
        f"<functions>\n{tool_schemas(tools)}\n</functions>\n"
    )


def encode(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool = False,
    add_bos: bool = True,
    **_unused,
) -> str:
    messages = with_tools_in_system(messages, tools)
    last_user = last_user_index(messages)
    parts = [BOS] if add_bos else []

    def transition(index: int) -> str:
        opens_thinking = thinking and index >= last_user
        return THINK_START if opens_thinking else THINK_END

    for index, message in enumerate(messages):
        role = message.get("role")
        is_last = index == len(messages) - 1
        if role == "system":
            sections = [message_text(message)]
            if message.get("tools"):
                sections.append(tools_prompt(message["tools"]))
            parts.append("\n\n".join(s for s in sections if s))
        elif role == "user":
            parts.append(USER + message_text(message))
            if not is_last or add_generation_prompt:
                parts.append(ASSISTANT + transition(index))
        elif role == "assistant":
            if thinking and index > last_user:
                parts.append(message_text(message, "reasoning_content") + THINK_END)
            parts.append(message_text(message))
            if message.get("tool_calls"):
                parts.append("\n\n" + dsml_block(CALLS_BLOCK, message["tool_calls"]))
            parts.append(EOS)
        elif role == "tool":
            previous_role = messages[index - 1].get("role") if index > 0 else None
            next_role = messages[index + 1].get("role") if not is_last else None
            if previous_role != "tool":
                if previous_role != "assistant" or not messages[index - 1].get("tool_calls"):
                    raise InvalidRequestError(
                        "a tool message must follow an assistant message with tool_calls", param="messages"
                    )
                parts.append("\n\n<function_results>")
            parts.append(f"\n<result>{message_text(message)}</result>")
            if next_role != "tool":
                parts.append("\n</function_results>")
                if not is_last or add_generation_prompt:
                    parts.append("\n\n" + transition(index))
        else:
            raise InvalidRequestError(f"unsupported message role {role!r} for DeepSeek-V3.2", param="messages")
    return "".join(parts)
