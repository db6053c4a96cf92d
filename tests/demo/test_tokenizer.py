"""The shipped tokenizer: DeepSeek special tokens by name, digit and letter splitting, V3.1 chat format."""

import jinja2
import pytest
from tokenizers import Tokenizer

from zizhu.demo import DEMO_MODEL_DIR
from zizhu.demo.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    END_THINK,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    THINK,
    USER,
    prompt_text,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO_MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def test_special_tokens_keep_deepseek_ids_and_names(tok):
    assert tok.token_to_id(BOS) == 0
    assert tok.token_to_id(EOS) == 1
    assert tok.token_to_id(PAD) == 2
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids)
    assert "<｜tool▁calls▁begin｜>" in SPECIAL_TOKENS and "<｜tool▁sep｜>" in SPECIAL_TOKENS


def test_digits_and_quoted_letters_are_single_tokens(tok):
    assert tok.encode("4821").tokens == ["4", "8", "2", "1"]
    word = tok.encode("Reverse the word 'planet'.").tokens
    assert word[-7:-1] == list("planet")
    assert tok.encode("What is 12 + 3?").tokens[-5:] == ["1", "2", "Ġ+Ġ", "3", "?"]


def test_decoding_keeps_think_markers_and_drops_turn_markers(tok):
    ids = tok.encode(prompt_text("What is 1 + 2?") + "1+2</think>3" + EOS).ids
    assert tok.decode(ids, skip_special_tokens=True) == f"What is 1 + 2?{THINK}1+2{END_THINK}3"


def test_hf_tokenizer_matches_tokenizers(tok, hf_tok):
    text = prompt_text("How many times does the letter 'r' appear in 'strawberry'?")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert hf_tok.bos_token_id == 0 and hf_tok.eos_token_id == 1 and hf_tok.pad_token_id == 2


def render(messages, **kwargs) -> str:
    """The template as zizhu renders it: plain Jinja with trim_blocks and lstrip_blocks."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token=BOS, eos_token=EOS, **kwargs)


def test_generation_prompt_opens_think_by_default():
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    assert render(messages, add_generation_prompt=True) == prompt_text("What is 1 + 2?")
    assert render(messages, add_generation_prompt=True, thinking=True).endswith(f"{ASSISTANT}{THINK}")
    assert render(messages, add_generation_prompt=True, thinking=False).endswith(f"{ASSISTANT}{END_THINK}")


def test_history_keeps_only_the_answer():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "1+2</think>3"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    expected = (
        f"{BOS}Be brief.{USER}What is 1 + 2?{ASSISTANT}{END_THINK}3{EOS}{USER}What is 2 + 2?{ASSISTANT}{THINK}"
    )
    assert render(messages, add_generation_prompt=True) == expected


def test_tool_calls_use_the_v31_format():
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou"}'}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    expected = (
        f"{BOS}{USER}Weather?{ASSISTANT}{END_THINK}"
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Hangzhou"}'
        f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
    )
    assert render(messages, add_generation_prompt=True) == expected


def test_hf_chat_template_matches(hf_tok):
    messages = [{"role": "user", "content": "What is 4821 + 3957?"}]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt_text(
        "What is 4821 + 3957?"
    )
    no_think = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking=False)
    assert no_think.endswith(END_THINK)
