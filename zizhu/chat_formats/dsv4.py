"""DeepSeek-V4 prompt format (shipped as code, `encoding_dsv4`, with `thinking_mode` and `reasoning_effort`).

    BOS [effort paragraph] {system}[\\n\\n{tools}] <｜User｜>{u}<｜Assistant｜>(<think> | </think>)
        {reasoning</think>}{a}[\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>] EOS

Differences from V3.2:
- tool results are not a block of their own: consecutive tool messages (and a user message right
  after them) become one user turn, each result wrapped in `<tool_result>...</tool_result>`;
- the DSML block is called `tool_calls`;
- a `latest_reminder` role renders as `<｜latest_reminder｜>{content}`;
- reasoning of earlier turns is dropped in thinking mode unless tools are in play (or the caller
  passes drop_thinking=False), in which case every assistant turn keeps its `{reasoning}</think>`.

The effort paragraph here is a stand-in written for zizhu; production V4 deployments should check it
against the encoder file that ships with their checkpoint revision.
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
    message_text,
    tool_schemas,
    with_tools_in_system,
)
from zizhu.errors import InvalidRequestError

CALLS_BLOCK = "tool_calls"
LATEST_REMINDER = "<｜latest_reminder｜>"

EFFORT_PROMPTS = {
    None: "",
    "high": "",
    "max": (
        "Reasoning Effort: Absolute maximum. Think the problem through exhaustively before answering: "
        "break it into its parts, check every step, consider alternatives and edge cases, and verify the "
        "result before you commit to it.\n\n"
    ),
}


def tools_prompt(tools: list[dict]) -> str:
    return (
        "## Tools\n\n"
        f'You can call the tools listed below. To call one or more, write a "<{DSML}{CALLS_BLOCK}>" block:\n\n'
        f"<{DSML}{CALLS_BLOCK}>\n"
        f'<{DSML}invoke name="$TOOL_NAME">\n'
        f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>\n'
        "...\n"
        f"</{DSML}invoke>\n"
        f"</{DSML}{CALLS_BLOCK}>\n\n"
        'Write string values as they are and mark them string="true"; write numbers, booleans, arrays and '
        'objects as JSON and mark them string="false".\n\n'
        f"In thinking mode (opened by {THINK_START}), finish your reasoning inside {THINK_START}...{THINK_END} "
        f"before any tool call or answer; otherwise answer or call tools directly after {THINK_END}.\n\n"
        f"### Tool schemas\n\n{tool_schemas(tools)}\n"
    )


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Fold each run of tool messages, and a user message right after it, into one user turn."""
    merged: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_result>{message_text(message)}</tool_result>"
            if merged and merged[-1].get("role") == "user" and merged[-1].get("_tool_results"):
                merged[-1]["content"] += "\n\n" + block
            else:
                if not merged or merged[-1].get("role") != "assistant" or not merged[-1].get("tool_calls"):
                    raise InvalidRequestError(
                        "a tool message must follow an assistant message with tool_calls", param="messages"
                    )
                merged.append({"role": "user", "content": block, "_tool_results": True})
        elif role == "user" and merged and merged[-1].get("_tool_results"):
            merged[-1]["content"] += "\n\n" + message_text(message)
            merged[-1]["_tool_results"] = False
        else:
            merged.append(dict(message))
    return merged


def encode(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool = False,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
    add_bos: bool = True,
    **_unused,
) -> str:
    if reasoning_effort not in EFFORT_PROMPTS:
        raise InvalidRequestError(
            f"reasoning_effort must be one of high, max (or unset), got {reasoning_effort!r}", param="reasoning_effort"
        )
    messages = _merge_tool_results(with_tools_in_system(messages, tools))
    if any(m.get("tools") for m in messages):
        drop_thinking = False
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)

    parts = [BOS] if add_bos else []
    if thinking:
        parts.append(EFFORT_PROMPTS[reasoning_effort])
    for index, message in enumerate(messages):
        role = message.get("role")
        is_last = index == len(messages) - 1
        keeps_reasoning = thinking and (not drop_thinking or index > last_user)
        if role == "system":
            sections = [message_text(message)]
            if message.get("tools"):
                sections.append(tools_prompt(message["tools"]))
            parts.append("\n\n".join(s for s in sections if s))
        elif role == "latest_reminder":
            parts.append(LATEST_REMINDER + message_text(message))
        elif role == "user":
            parts.append(USER + message_text(message))
            next_role = None if is_last else messages[index + 1].get("role")
            if next_role in ("assistant", "latest_reminder") or (is_last and add_generation_prompt):
                opens_thinking = thinking and (not drop_thinking or index >= last_user)
                parts.append(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
        elif role == "assistant":
            if keeps_reasoning:
                parts.append(message_text(message, "reasoning_content") + THINK_END)
            parts.append(message_text(message))
            if message.get("tool_calls"):
                parts.append("\n\n" + dsml_block(CALLS_BLOCK, message["tool_calls"]))
            parts.append(EOS)
        else:
            raise InvalidRequestError(f"unsupported message role {role!r} for DeepSeek-V4", param="messages")
    return "".join(parts)
