"""Requests the server must refuse, each with its status code and an OpenAI error object; the server keeps
serving afterwards, including after an unexpected exception inside a request (500)."""

from __future__ import annotations

import httpx2
import pytest

import kiln.server.app as server_app
from live_server import live_server

pytestmark = pytest.mark.cpu

API_KEY = "sk-kiln-test"
MODEL = "<model>"  # replaced by the served model's name
OK_COMPLETION = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


def completion(**change):
    return {"path": "/v1/completions", "json": {**OK_COMPLETION, **change}}


def chat(**change):
    return {"path": "/v1/chat/completions", "json": {**OK_CHAT, **change}}


def without(request: dict, field: str) -> dict:
    body = dict(request["json"])
    del body[field]
    return {**request, "json": body}


# (name, request, expected status). A request is keyword arguments for httpx2.request, plus "path".
BAD_REQUESTS = [
    ("malformed JSON", {"path": "/v1/completions", "content": b'{"model": "x", "prompt": '}, 400),
    ("body not an object", {"path": "/v1/completions", "json": ["prompt"]}, 400),
    ("model missing", without(completion(), "model"), 400),
    ("prompt missing", without(completion(), "prompt"), 400),
    ("messages missing", without(chat(), "messages"), 400),
    ("unknown model", completion(model="gpt-5"), 404),
    ("temperature a string", completion(temperature="hot"), 400),
    ("max_tokens a string", completion(max_tokens="10"), 400),
    ("stream not a boolean", completion(stream="yes"), 400),
    ("temperature negative", completion(temperature=-0.5), 400),
    ("temperature too high", completion(temperature=1000), 400),
    ("top_p zero", completion(top_p=0), 400),
    ("top_k negative", completion(top_k=-5), 400),
    ("min_p above one", completion(min_p=1.5), 400),
    ("presence_penalty out of range", completion(presence_penalty=3), 400),
    ("repetition_penalty zero", chat(repetition_penalty=0), 400),
    ("seed negative", completion(seed=-1), 400),
    ("max_tokens zero", completion(max_tokens=0), 400),
    ("max_tokens negative", completion(max_tokens=-3), 400),
    ("max_tokens beyond the context window", completion(max_tokens=10**9), 400),
    ("max_completion_tokens beyond the context window", chat(max_completion_tokens=100000), 400),
    ("prompt longer than the context window", completion(prompt="x = 1\n" * 2000, max_tokens=None), 400),
    ("chat longer than the context window", chat(messages=[{"role": "user", "content": "y = 2\n" * 2000}]), 400),
    ("empty prompt", completion(prompt=""), 400),
    ("token id out of range", completion(prompt=[1, 2, 10**6]), 400),
    ("several prompts", completion(prompt=["a", "b"]), 400),
    ("stop_token_ids out of range", completion(stop_token_ids=[10**6]), 400),
    ("empty stop string", completion(stop=[""]), 400),
    ("echo=true", completion(echo=True), 400),
    ("best_of", completion(best_of=3), 400),
    ("suffix", completion(suffix="pass"), 400),
    ("logit_bias", completion(logit_bias={"5": 10}), 400),
    ("n zero", completion(n=0), 400),
    ("n too large", completion(n=1000), 400),
    ("completions logprobs above 20", completion(logprobs=21), 400),
    ("chat top_logprobs above 20", chat(logprobs=True, top_logprobs=30), 400),
    ("chat top_logprobs without logprobs", chat(top_logprobs=2), 400),
    ("chat messages empty", chat(messages=[]), 400),
    ("chat unknown role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("chat image content", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400),
    ("chat tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    ("response_format unknown type", chat(response_format={"type": "xml"}), 400),
    ("response_format invalid schema", chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}), 400),
    ("response_format schema not an object", completion(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}), 400),
    ("response_format invalid regex", completion(response_format={"type": "regex", "regex": "(ab"}), 400),
    ("response_format invalid grammar", completion(response_format={"type": "ebnf", "ebnf": "root ::= ("}), 400),
    ("no API key", {**completion(), "headers": {}}, 401),
    ("wrong API key", {**completion(), "headers": {"Authorization": "Bearer sk-wrong"}}, 401),
    ("wrong method", {"path": "/v1/completions", "method": "GET"}, 405),
    ("unknown path", {"path": "/v1/engines/davinci/completions", "json": OK_COMPLETION}, 404),
    ("body too large", {"path": "/v1/completions", "content": b"{" + b" " * (5 << 20) + b"}"}, 413),
    ("body too large, sent without a length", {"path": "/v1/completions",
                                               "content": iter([b"{" + b" " * (3 << 20), b" " * (3 << 20) + b"}"])},
     413),
]


@pytest.fixture(scope="module")
def server(zoo):
    with live_server(zoo.artifact("demo"), api_key=API_KEY) as s:
        yield s


def send(server, request: dict) -> httpx2.Response:
    request = dict(request)
    path, method = request.pop("path"), request.pop("method", "POST")
    request.setdefault("headers", server.headers)
    if isinstance(request.get("json"), dict):  # None drops a field; MODEL is the served model
        body = {k: v for k, v in request["json"].items() if v is not None}
        request["json"] = {**body, "model": server.model} if body.get("model") == MODEL else body
    elif "content" in request:
        request["headers"] = {**request["headers"], "Content-Type": "application/json"}
    return httpx2.request(method, f"{server.url}{path}", timeout=60, **request)


def assert_error_object(r: httpx2.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


@pytest.mark.parametrize("name, request_, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, name, request_, status):
    error = assert_error_object(send(server, request_), status)
    assert "Traceback" not in error["message"]


def test_error_messages_name_the_problem(server):
    error = assert_error_object(send(server, completion(temperature="hot")), 400)
    assert error["param"] == "temperature"
    error = assert_error_object(send(server, completion(model="gpt-5")), 404)
    assert error["code"] == "model_not_found" and "gpt-5" in error["message"]
    error = assert_error_object(send(server, completion(prompt="x = 1\n" * 2000)), 400)
    assert "context window" in error["message"]
    error = assert_error_object(send(server, completion(echo=True)), 400)
    assert error["param"] == "echo"
    error = assert_error_object(send(server, completion(top_p=0)), 400)  # a SamplingParams check
    assert error["param"] == "top_p" and "top_p" in error["message"]


def test_unexpected_exception_is_a_500_and_the_server_keeps_running(server, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(server_app, "render_chat", broken)  # the server runs in this process, in a thread
    error = assert_error_object(send(server, chat()), 500)
    assert error["type"] == "server_error"
    monkeypatch.undo()
    assert send(server, chat()).status_code == 200


def test_still_serves_after_the_bad_requests(server):
    for request in (completion(), chat(), completion(stream=True)):
        r = send(server, request)
        assert r.status_code == 200, r.text
    r = send(server, completion(max_tokens=None, prompt="x"))  # no max_tokens: the rest of the context window
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] <= server.engine.context_len - usage["prompt_tokens"]
