"""Unset sampling fields of a request take the checkpoint's generation_config, set ones win."""

from zizhu.server.protocol import ChatCompletionRequest
from zizhu.server.serving import sampling_params


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_unset_fields_take_the_model_defaults():
    params = sampling_params(request(), 16, None, {"temperature": 0.0, "top_k": 5})
    assert (params.temperature, params.top_p, params.top_k) == (0.0, 1.0, 5)


def test_request_fields_override_the_model_defaults():
    params = sampling_params(request(temperature=0.7, top_p=0.9, top_k=3), 16, None, {"temperature": 0.0, "top_k": 5})
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 3)


def test_openai_defaults_without_a_generation_config():
    params = sampling_params(request(), 16, None)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
