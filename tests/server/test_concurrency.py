"""Many clients at once share engine steps, yet each gets exactly what it would get alone."""

from __future__ import annotations

import asyncio

import openai

from tests.server.servers import SERVED_NAMES

NUM_CLIENTS = 64


def request(i: int) -> dict:
    messages = [{"role": "user", "content": f"Question {i}: what is {i} plus {i * 7 % 13}?"}]
    return dict(model=SERVED_NAMES[0], messages=messages, max_tokens=12 + i % 5, temperature=0)


def test_concurrent_streams_match_requests_run_alone(tiny_server):
    alone_client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    alone = []
    for i in range(NUM_CLIENTS):
        choice = alone_client.chat.completions.create(**request(i)).choices[0]
        alone.append(((choice.message.model_extra or {}).get("reasoning_content") or "", choice.message.content, choice.finish_reason))

    async def one(client: openai.AsyncOpenAI, i: int):
        reasoning, content, finish = "", "", None
        stream = await client.chat.completions.create(stream=True, **request(i))
        async for chunk in stream:
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return reasoning, content, finish

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(NUM_CLIENTS)))

    together = asyncio.run(all_at_once())
    mismatches = [i for i in range(NUM_CLIENTS) if together[i] != alone[i]]
    assert not mismatches, [(i, alone[i], together[i]) for i in mismatches[:3]]
    assert len({a[1] for a in alone}) > NUM_CLIENTS // 2  # the prompts really lead to different answers
