"""A tiny random DeepSeek-V3 checkpoint (tests/configs/tiny_deepseek_v3.json, vocabulary widened)
with a trained byte-level BPE tokenizer, DeepSeek's chat and tool markers and a V3.1-style chat
template: small enough to serve on CPU in a test."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# Chat and tool markers are ordinary (non-special) added tokens, as in DeepSeek's tokenizers, so
# they survive skip_special_tokens and the server can parse them.
MARKERS = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
VOCAB_SIZE = 512  # room for a trained BPE plus the markers

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Paris is the capital of France. Tokyo is the capital of Japan. The weather today is sunny and warm.
Once upon a time there was a small model that answered questions about the weather and the time.
What is two plus two? Two plus two is four. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Hello, how are you? I am fine, thank you. Please call the function to get the weather in a city.
{"city": "Paris", "days": 3, "unit": "celsius"} def main(): return 42  # code and JSON appear too
"""

# A DeepSeek-V3.1-style template: </think> before each answer in history, <think> or </think> in
# the generation prompt depending on `thinking`, V3.1 tool-call markers.
CHAT_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for message in messages if message['role'] == 'system' -%}
{%- set ns.system = ns.system + message['content'] -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system }}
{%- if tools -%}
{{ '\\n\\n## Tools\\n' }}
{%- for tool in tools -%}
{{ '\\n### ' + tool['function']['name'] + '\\nParameters: ' + (tool['function']['parameters'] | tojson) + '\\n' }}
{%- endfor -%}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{ '<｜User｜>' + message['content'] }}
{%- elif message['role'] == 'assistant' -%}
{%- set content = message['content'] or '' -%}
{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
{{ '<｜Assistant｜></think>' + content }}
{%- if message['tool_calls'] -%}
{{ '<｜tool▁calls▁begin｜>' }}
{%- for call in message['tool_calls'] -%}
{{ '<｜tool▁call▁begin｜>' + call['function']['name'] + '<｜tool▁sep｜>' + call['function']['arguments'] + '<｜tool▁call▁end｜>' }}
{%- endfor -%}
{{ '<｜tool▁calls▁end｜>' }}
{%- endif -%}
{{ eos_token }}
{%- elif message['role'] == 'tool' -%}
{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<｜Assistant｜>' + ('<think>' if thinking else '</think>') }}
{%- endif -%}
"""


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(MARKERS),
        special_tokens=[BOS, EOS],  # ids 0 and 1, as config.json says
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    tokenizer.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "model_max_length": 640,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))


def build_model(out_dir: Path) -> None:
    from tests.checkpoints import build_hf_model, save_checkpoint

    save_checkpoint(build_hf_model("tiny_deepseek_v3", vocab_size=VOCAB_SIZE), out_dir)


def build_tiny_checkpoint(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_model(out_dir)
    build_tokenizer(out_dir)
    return out_dir
