"""Error paths of a real `zizhu serve` process (API key, small queue), and KV blocks after aborts."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server.servers import start_server

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_NUM_SEQS, MAX_WAITING = 2, 2
LONG = {"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    extra = ["--api-key", KEY, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING)]
    running = start_server(tiny_checkpoint, tmp_path_factory, *extra)
    yield running
    running.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def engine_gauges(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    wanted = ("zizhu_kv_cache_blocks_used", "zizhu_num_requests_running", "zizhu_num_requests_waiting")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}


def aborted_requests(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    prefix = 'zizhu_requests_total{endpoint="completions",finish_reason="abort"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def wait_until_idle(server, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        gauges = engine_gauges(server)
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.05)


def test_missing_or_wrong_key_is_401(server):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    missing = error_of(httpx.post(server.url + "/v1/chat/completions", json=body), 401)
    wrong = error_of(httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert missing["code"] == wrong["code"] == "invalid_api_key"
    error_of(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


def test_unknown_model_is_404(server):
    error = error_of(httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, headers=AUTH), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "stop": 3}, "stop"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),  # token id outside the vocabulary: refused by the engine
    ],
)
def test_invalid_request_is_400(server, body, param):
    error = error_of(httpx.post(server.url + "/v1/completions", json=body, headers=AUTH), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_context_too_long_is_400(server, tiny_tokenizer):
    prompt = "the weather in Paris " * 200
    n_prompt = len(tiny_tokenizer.encode(prompt))
    assert n_prompt > 640
    error = error_of(httpx.post(server.url + "/v1/completions", json={"prompt": prompt}, headers=AUTH), 400)
    assert error["code"] == "context_length_exceeded"
    assert str(n_prompt) in error["message"] and "640" in error["message"]
    messages = [{"role": "user", "content": "hi " * 50}]
    error = error_of(httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1000}, headers=AUTH), 400)
    assert error["code"] == "context_length_exceeded" and "640" in error["message"]


async def wait_for(client: httpx.AsyncClient, name: str, value: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get("/metrics")).text
        current = next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))
        if current == value:
            return
        assert time.monotonic() < deadline, f"{name} never reached {value}:\n{text}"
        await asyncio.sleep(0.02)


async def open_stream(client: httpx.AsyncClient, prompt: str, started: asyncio.Event | None = None):
    """Stream a long completion, read its first event, then hold the connection until cancelled."""
    body = {**LONG, "prompt": prompt, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()  # keep a reference: a finalized iterator closes the connection
        await anext(lines)
        if started is not None:
            started.set()
        await asyncio.sleep(3600)


def test_full_queue_is_503_and_aborts_free_every_block(server):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            running = [asyncio.create_task(open_stream(client, f"running {i}")) for i in range(MAX_NUM_SEQS)]
            await wait_for(client, "zizhu_num_requests_running", MAX_NUM_SEQS)
            waiting = [asyncio.create_task(open_stream(client, f"waiting {i}")) for i in range(MAX_WAITING)]
            await wait_for(client, "zizhu_num_requests_waiting", MAX_WAITING)
            for stream in (False, True):
                response = await client.post("/v1/completions", json={**LONG, "stream": stream})
                assert error_of(response, 503)["type"] == "server_error"
            for task in running + waiting:  # hang up on running and still-waiting requests alike
                task.cancel()
            await asyncio.gather(*running, *waiting, return_exceptions=True)

    asyncio.run(run())
    gauges = wait_until_idle(server)
    assert gauges == {"zizhu_kv_cache_blocks_used": 0, "zizhu_num_requests_running": 0, "zizhu_num_requests_waiting": 0}


def test_burst_of_aborted_streams_frees_every_block(server):
    async def burst() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            started = [asyncio.Event() for _ in range(MAX_NUM_SEQS)]
            tasks = [asyncio.create_task(open_stream(client, f"burst {i}", e)) for i, e in enumerate(started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    for _ in range(4):
        asyncio.run(burst())
        gauges = wait_until_idle(server)
        assert gauges["zizhu_kv_cache_blocks_used"] == 0, gauges
    aborted_before = aborted_requests(server)

    async def give_up_on_a_plain_request() -> None:  # a non-streaming client that leaves is aborted too
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            request = asyncio.create_task(client.post("/v1/completions", json=LONG))
            deadline = time.monotonic() + 30
            while not engine_gauges(server)["zizhu_num_requests_running"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not request.done(), "the request was meant to be still generating when its client left"
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)

    asyncio.run(give_up_on_a_plain_request())
    gauges = wait_until_idle(server)
    assert gauges["zizhu_kv_cache_blocks_used"] == 0, gauges
    assert aborted_requests(server) == aborted_before + 1
    body = {"prompt": "after the burst", "max_tokens": 3, "ignore_eos": True}
    response = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
