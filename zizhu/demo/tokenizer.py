"""The demo model's tokenizer: a small byte-level BPE with DeepSeek's special tokens and V3.1 chat format.

Pre-tokenization decides what BPE may merge:
- every digit is its own piece, so numbers are read and written one digit at a time;
- a word that starts with a capital, or a lowercase word of two or more letters after a space, is
  one piece (BPE learns the prompt words);
- any other lowercase letter stands alone, so a quoted word ('planet') is always one token per
  letter and the model can spell a word it has never seen;
- a run of punctuation takes an optional space before it and one after it unless a letter follows
  (" + ", " → ", ", "), so the space before a word stays with the word.

Special tokens carry DeepSeek's names; code resolves their ids by name, never by number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)
# Order fixes the ids: BOS 0, EOS 1, pad 2, as in DeepSeek's tokenizers.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, *TOOL_TOKENS)
# Decoding with skip_special_tokens drops only these; <think>, </think> and the tool markers stay in the
# text so that reasoning and tool-call parsers can find them (DeepSeek marks them the same way).
SKIPPED_ON_DECODE = (BOS, EOS, PAD, USER, ASSISTANT)

PRE_TOKENIZE = r"\d| ?[A-Z][a-z]*| [a-z]{2,}|[a-z]| ?[^\sA-Za-z\d]+(?: (?![A-Za-z]))?|\s+"

VOCAB_SIZE = 384

# V3.1 format. Differences from DeepSeek-V3.1's template: thinking defaults to on (this model was only
# trained to reason first), and tool definitions are not rendered into the system prompt.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- if thinking is not defined %}{% set thinking = true %}{% endif %}"
    "{%- set ns = namespace(system_prompt='', is_first_sp=true, is_last_user=false, is_tool=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{{- bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set ns.is_last_user = true %}{% set ns.is_tool = false %}"
    "{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.is_last_user %}{{- '<｜Assistant｜></think>' }}{% endif %}"
    "{%- set ns.is_last_user = false %}{% set ns.is_tool = false %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>', 1)[1] %}{% endif %}"
    "{{- content }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set arguments = call['function']['arguments'] %}"
    "{%- if arguments is not string %}{% set arguments = arguments | tojson %}{% endif %}"
    "{{- '<｜tool▁call▁begin｜>' + call['function']['name'] + '<｜tool▁sep｜>' + arguments + '<｜tool▁call▁end｜>' }}"
    "{%- endfor %}"
    "{{- '<｜tool▁calls▁end｜>' }}"
    "{%- endif %}"
    "{{- '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- set ns.is_last_user = false %}{% set ns.is_tool = true %}"
    "{{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt and ns.is_last_user %}"
    "{{- '<｜Assistant｜>' }}{% if thinking %}{{- '<think>' }}{% else %}{{- '</think>' }}{% endif %}"
    "{%- endif %}"
)


def prompt_text(user_message: str) -> str:
    """The chat template's output for one user turn with the thinking generation prompt."""
    return f"{BOS}{USER}{user_message}{ASSISTANT}{THINK}"


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer adds every special token as special; only SKIPPED_ON_DECODE should be.
    state = json.loads(tokenizer.to_str())
    for token in state["added_tokens"]:
        token["special"] = token["content"] in SKIPPED_ON_DECODE
    return Tokenizer.from_str(json.dumps(state))


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json and a tokenizer_config.json that transformers and zizhu both read."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
