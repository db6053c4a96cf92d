"""DeepSeek chat formats that ship as code rather than as a Jinja template.

DeepSeek V3, R1 and V3.1 checkpoints carry a Jinja `chat_template` in tokenizer_config.json, and the
tokenizer renders those. V3.2 and V4 ship none: their prompt format is defined by a Python encoder
next to the weights. `render_chat` is the one entry point for those built-in encoders, selected by
config.json's `model_type`.
"""

from __future__ import annotations

from collections.abc import Callable

from zizhu.chat_formats import dsv32, dsv4
from zizhu.errors import ConfigError

_ENCODERS: dict[str, Callable[..., str]] = {
    "deepseek_v32": dsv32.encode,
    "deepseek_v4": dsv4.encode,
}


def has_builtin_format(model_type: str) -> bool:
    return model_type in _ENCODERS


def render_chat(
    model_type: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    thinking: bool | None = None,
    **kwargs,
) -> str:
    """Render OpenAI-style `messages` (and `tools`) as prompt text for `model_type`.

    `thinking` selects thinking mode (None: the format's default, which is non-thinking).
    Extra keyword arguments are format-specific (`drop_thinking`, `reasoning_effort`, `add_bos`)
    and ignored by formats that do not use them, as Jinja templates ignore unknown variables.
    """
    encoder = _ENCODERS.get(model_type)
    if encoder is None:
        known = ", ".join(sorted(_ENCODERS))
        raise ConfigError(
            f"no built-in chat format for model_type {model_type!r} (built-in: {known}); "
            "add a chat_template to the checkpoint's tokenizer_config.json"
        )
    return encoder(messages, tools=tools, add_generation_prompt=add_generation_prompt, thinking=bool(thinking), **kwargs)
