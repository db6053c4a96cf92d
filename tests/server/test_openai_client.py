"""The official openai client against a real `zizhu serve` process on the tiny checkpoint."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.servers import SERVED_NAMES

MODEL = SERVED_NAMES[0]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]
EXACT = {"ignore_eos": True}  # random weights may emit EOS anywhere; these tests want exact lengths


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_text(message) -> tuple[str | None, str | None]:
    return (message.model_extra or {}).get("reasoning_content"), message.content


def stream_chat(client, **kwargs) -> tuple[str | None, str, str, object]:
    reasoning, content, finish, usage = None, "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = (choice.delta.model_extra or {}).get("reasoning_content")
            if piece is not None:
                reasoning = (reasoning or "") + piece
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish, usage


def test_models(client):
    assert [m.id for m in client.models.list().data] == SERVED_NAMES


def test_chat_usage_matches_the_tokenizer(client, tiny_tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=EXACT)
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt, add_special_tokens=False))
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12
    assert response.choices[0].finish_reason == "length"
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == MODEL


def test_chat_stream_equals_whole(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, extra_body=EXACT)
    whole = client.chat.completions.create(**kwargs)
    reasoning, content, finish, usage = stream_chat(client, **kwargs)
    assert (reasoning, content) == chat_text(whole.choices[0].message)
    assert finish == whole.choices[0].finish_reason == "length"
    assert usage.completion_tokens == whole.usage.completion_tokens == 16
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_thinking_prompt_streams_reasoning(client):
    kwargs = dict(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={**EXACT, "chat_template_kwargs": {"thinking": True}}
    )
    whole = client.chat.completions.create(**kwargs)
    reasoning, content = chat_text(whole.choices[0].message)
    assert reasoning is not None  # the prompt opened <think>: output is reasoning until </think>
    assert stream_chat(client, **kwargs)[:2] == (reasoning, content or "")


def test_completions_usage_and_stream(client, tiny_tokenizer):
    prompt = "The quick brown fox"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body=EXACT)
    whole = client.completions.create(**kwargs)
    assert whole.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    pieces, finish = [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        pieces += [c.text for c in chunk.choices]
        finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
    assert "".join(pieces) == whole.choices[0].text and finish == "length"


def test_n_and_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2, extra_body=EXACT)
    first = client.completions.create(seed=1234, **kwargs)
    again = client.completions.create(seed=1234, **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24
    others = [client.completions.create(seed=seed, **kwargs).choices[0].text for seed in (1, 2, 3)]
    assert any(text != first.choices[0].text for text in others)

    chat = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0.9, seed=7, n=2, extra_body=EXACT)
    a, b = client.chat.completions.create(**chat), client.chat.completions.create(**chat)
    assert [chat_text(c.message) for c in a.choices] == [chat_text(c.message) for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_stop_string(client):
    kwargs = dict(model=MODEL, prompt="Hello, how are you?", max_tokens=24, temperature=0, extra_body=EXACT)
    full = client.completions.create(**kwargs).choices[0].text
    start = next(i for i in range(len(full) // 3, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isprintable())
    stop = full[start : start + 3]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body=EXACT
    )
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 6
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs(client):
    response = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, temperature=0, logprobs=2, extra_body=EXACT)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0


def test_token_id_prompt_and_batch_of_prompts(client, tiny_tokenizer):
    ids = tiny_tokenizer.encode("Paris is")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, extra_body=EXACT)
    by_text = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, temperature=0, extra_body=EXACT)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["Paris is", "Tokyo is"], max_tokens=5, temperature=0, extra_body=EXACT)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text


def test_metrics_count_tokens(server):
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values["zizhu_generation_tokens_total"] > 0 and values["zizhu_prompt_tokens_total"] > 0
    assert values["zizhu_time_to_first_token_seconds_count"] > 0
    assert values["zizhu_kv_cache_blocks_total"] > 0


def test_raw_error_body_from_the_process(server):
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "n": "two"})
    assert response.status_code == 400
    assert json.loads(response.text)["error"]["param"] == "n"
