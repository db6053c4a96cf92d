"""The HTTP layer over a scripted engine: reasoning and tool-call parsing through real SSE streams,
every error body, and abort on disconnect. Fast: no model runs."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.fake_engine import FakeAsyncEngine, FakeTokenizer
from tests.server.servers import ThreadedServer
from zizhu.server.app import build_app
from zizhu.server.serving import ServingConfig

V31_CALL = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def engine():
    return FakeAsyncEngine(max_model_len=256, step_delay=0.001)


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, ServingConfig(["scripted"], tool_call_format="deepseek_v31", reasoning=True))
    with ThreadedServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def say(text: str) -> list[dict]:
    return [{"role": "user", "content": "REPLY:" + text}]


def collect_stream(stream) -> dict:
    """Rebuild a message from chat chunks the way OpenAI clients do."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"reasoning": reasoning, "content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def test_reasoning_and_tool_call_streamed_and_whole(client):
    reply = "<think>weather needs a tool</think>Checking." + V31_CALL
    whole = client.chat.completions.create(model="scripted", messages=say(reply), tools=TOOLS)
    message = whole.choices[0].message
    assert message.model_extra["reasoning_content"] == "weather needs a tool"
    assert message.content == "Checking."
    assert whole.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather", {"city": "Paris"})

    streamed = collect_stream(client.chat.completions.create(model="scripted", messages=say(reply), tools=TOOLS, stream=True))
    assert streamed["reasoning"] == "weather needs a tool"
    assert streamed["content"] == "Checking."
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == [("get_weather", {"city": "Paris"})]
    assert streamed["calls"][0]["id"].startswith("call_")
    assert streamed["finish"] == "tool_calls"


def test_prompt_that_opened_think(client):
    kwargs = dict(model="scripted", messages=say("still pondering</think>42"), extra_body={"chat_template_kwargs": {"thinking": True}})
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("still pondering", "42")
    streamed = collect_stream(client.chat.completions.create(stream=True, **kwargs))
    assert (streamed["reasoning"], streamed["content"]) == ("still pondering", "42")


def test_missing_end_of_thinking_keeps_everything_as_reasoning(client):
    kwargs = dict(model="scripted", messages=say("never finished"), extra_body={"chat_template_kwargs": {"thinking": True}})
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("never finished", "")


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_tool_call_is_content_with_stop(client, stream):
    reply = 'Trying.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": <｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    response = client.chat.completions.create(model="scripted", messages=say(reply), tools=TOOLS, stream=stream)
    if stream:
        result = collect_stream(response)
    else:
        choice = response.choices[0]
        result = {"content": choice.message.content, "calls": choice.message.tool_calls or [], "finish": choice.finish_reason}
    assert result["content"] == reply
    assert result["calls"] == []
    assert result["finish"] == "stop"


def test_unterminated_tool_call_cut_by_max_tokens(client):
    reply = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{}"
    response = client.chat.completions.create(model="scripted", messages=say(reply), tools=TOOLS, max_tokens=4)
    choice = response.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content == reply[: len(choice.message.content)] and choice.message.content
    assert choice.finish_reason == "length"


def test_tools_are_not_parsed_without_tools_in_the_request(client):
    response = client.chat.completions.create(model="scripted", messages=say("x" + V31_CALL))
    assert response.choices[0].message.content == "x" + V31_CALL
    assert response.choices[0].finish_reason == "stop"


def test_stream_shape_and_usage(server):
    body = {"model": "scripted", "messages": say("ab"), "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["a", "b"]
    assert events[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3  # a, b, EOS
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)


def test_models_health_docs_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["scripted"]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json").json()["paths"]
    metrics = httpx.get(server.url + "/metrics").text
    for name in (
        "zizhu_requests_total",
        "zizhu_prompt_tokens_total",
        "zizhu_generation_tokens_total",
        "zizhu_num_requests_running",
        "zizhu_num_requests_waiting",
        "zizhu_kv_cache_usage_ratio",
        "zizhu_time_to_first_token_seconds_bucket",
        "zizhu_inter_token_latency_seconds_bucket",
    ):
        assert name in metrics


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": say("x"), "temperature": "hot"}, "temperature"),
        ({"messages": say("x"), "temperature": 3.5}, "temperature"),
        ({"messages": say("x"), "top_p": 0}, "top_p"),
        ({"messages": say("x"), "n": 0}, "n"),
        ({"messages": say("x"), "max_tokens": -1}, "max_tokens"),
        ({"messages": say("x"), "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({}, "messages"),
        ({"messages": say("x"), "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"messages": say("x"), "logit_bias": {"5": 1.0}}, "logit_bias"),
    ],
)
def test_invalid_requests_are_400(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_fields_are_ignored(server):
    body = {"messages": say("ok"), "some_future_field": {"x": 1}, "user": "u1"}
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200


def test_malformed_json_is_400(server):
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_unknown_model_is_404(server):
    response = httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert response.status_code == 404
    error = error_of(response)
    assert (error["param"], error["code"]) == ("model", "model_not_found") and "gpt-9" in error["message"]


def test_context_too_long_is_400_with_counts(server):
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "y" * 300, "max_tokens": 5})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "256" in error["message"] and "301" in error["message"]


def test_queue_full_is_503():
    app = build_app(FakeAsyncEngine(max_active=0), ServingConfig(["scripted"]))
    with ThreadedServer(app) as server:
        for stream in (False, True):
            response = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "stream": stream})
            assert response.status_code == 503
            assert error_of(response)["type"] == "server_error"


def test_api_key():
    app = build_app(FakeAsyncEngine(), ServingConfig(["scripted"]), api_key="sesame")
    with ThreadedServer(app) as server:
        body = {"prompt": "REPLY:x"}
        missing = httpx.post(server.url + "/v1/completions", json=body)
        wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        for response in (missing, wrong):
            assert response.status_code == 401
            assert error_of(response)["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="scripted", prompt="REPLY:x").choices[0].text == "x"


def test_disconnect_aborts_the_request(server, engine):
    body = {"prompt": "REPLY:" + "z" * 120, "max_tokens": 120}  # over 0.1 s of scripted decoding
    aborted_before = len(engine.aborted)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines), next(lines)  # leave mid-stream
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.03)
    deadline = time.monotonic() + 5
    while (engine.engine.active or len(engine.aborted) < aborted_before + 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.engine.active
    assert len(engine.aborted) == aborted_before + 2


def test_completions_echo_n_and_multiple_prompts(client):
    response = client.completions.create(model="scripted", prompt=["REPLY:ab", "REPLY:c"], n=2, echo=True)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == ["REPLY:abab", "REPLY:abab", "REPLY:cc", "REPLY:cc"]
    assert response.usage.completion_tokens == 2 * 3 + 2 * 2


def test_completions_token_prompt_and_logprobs(client):
    ids = FakeTokenizer().encode("REPLY:hey")
    response = client.completions.create(model="scripted", prompt=ids, logprobs=2, max_tokens=2)
    choice = response.choices[0]
    assert choice.text == "he" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["h", "e"]
    assert choice.logprobs.text_offset == [0, 1]
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert response.usage.prompt_tokens == len(ids)
