"""The wire-format models: unknown fields ignored, wrong types refused, OpenAI fields mapped onto
SamplingParams (each endpoint's spelling of max_tokens and logprobs), refused fields named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.errors import RequestError
from kiln.server.protocol import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_unknown_fields_are_ignored():
    r = CompletionRequest.model_validate({"model": "m", "prompt": "x", "service_tier": "auto", "metadata": {}})
    assert r.prompt == "x"


@pytest.mark.parametrize("change", [{"max_tokens": "10"}, {"temperature": "0.5"}, {"stream": "true"},
                                    {"stream": 1}, {"n": 1.5}, {"stop": 3}, {"prompt": {"text": "x"}},
                                    {"prompt": [1, "a"]}, {"seed": -1}, {"logprobs": 21}])
def test_wrong_types_are_refused(change):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", **change})


def test_defaults_map_onto_sampling_params():
    p = CompletionRequest.model_validate({"model": "m", "prompt": "x"}).sampling_params(default_max_tokens=99)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.n, p.stop, p.logprobs) == (99, 1.0, 1.0, 0, 1, (), None)


def test_fields_map_onto_sampling_params():
    r = CompletionRequest.model_validate({
        "model": "m", "prompt": "x", "max_tokens": 7, "temperature": 0, "top_p": 0.9, "top_k": -1, "min_p": 0.1,
        "seed": 3, "n": 2, "stop": "\n\n", "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "logprobs": 0, "ignore_eos": True, "stop_token_ids": [5],
        "skip_special_tokens": False})
    p = r.sampling_params(default_max_tokens=99)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.n) == (7, 0, 0.9, 0, 0.1, 3, 2)
    assert (p.stop, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (("\n\n",), 0.5, -0.5, 1.1)
    assert (p.logprobs, p.ignore_eos, p.stop_token_ids, p.skip_special_tokens) == (0, True, (5,), False)


def test_chat_spellings():
    r = ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 5, "max_completion_tokens": 9})
    assert r.sampling_params(99).max_tokens == 9  # the newer name wins
    assert ChatCompletionRequest.model_validate(CHAT).sampling_params(99).logprobs is None
    assert ChatCompletionRequest.model_validate({**CHAT, "logprobs": True}).sampling_params(99).logprobs == 0
    r = ChatCompletionRequest.model_validate({**CHAT, "logprobs": True, "top_logprobs": 4})
    assert r.sampling_params(99).logprobs == 4


def test_message_content_parts_and_roles():
    r = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert [m.for_template() for m in r.messages] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""}]


def test_out_of_range_values_raise_request_error():
    with pytest.raises(RequestError, match="temperature"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 7e3}).sampling_params(9)


@pytest.mark.parametrize("prompt, single", [("x", "x"), ([1, 2], [1, 2]), (["x"], "x"), ([[1, 2]], [1, 2]),
                                            (["x", "y"], None), ([[1], [2]], None)])
def test_single_prompt(prompt, single):
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).single_prompt() == single


@pytest.mark.parametrize("body, param", [
    ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"),
    ({"logit_bias": {"1": 2.0}}, "logit_bias"), ({"echo": False, "best_of": 1, "logit_bias": {}}, None),
])
def test_unsupported_completion_fields(body, param):
    refused = CompletionRequest.model_validate({"model": "m", "prompt": "x", **body}).unsupported()
    assert (refused[0] if refused else None) == param


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function"}]}, "tools"), ({"top_logprobs": 2}, "top_logprobs"), ({"tools": []}, None),
])
def test_unsupported_chat_fields(body, param):
    refused = ChatCompletionRequest.model_validate({**CHAT, **body}).unsupported()
    assert (refused[0] if refused else None) == param
