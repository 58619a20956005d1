"""The server through the official ``openai`` client, on the bundled demo model: completions and chat,
streamed and not, n=2, stop strings, logprobs, structured output, usage, the API key."""

from __future__ import annotations

import json

import httpx2
import jsonschema
import openai
import pytest

from live_server import live_server

pytestmark = pytest.mark.cpu

API_KEY = "sk-kiln-test"
PROMPT = "def read_config(path):"
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Open a file."}]


@pytest.fixture(scope="module")
def server(zoo):
    with live_server(zoo.artifact("demo"), api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_the_artifact(client, server):
    (card,) = client.models.list().data
    assert card.id == server.model and card.owned_by == "kiln"
    assert card.max_model_len == server.engine.context_len


def test_completion_stream_equals_non_stream(client, server):
    whole = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    (choice,) = whole.choices
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == server.model
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24

    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_chat_stream_equals_non_stream(client, server):
    whole = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=20, temperature=0)
    (choice,) = whole.choices
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 20

    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=20,
                                                 temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_max_completion_tokens(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n2_choices(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text  # a seeded n=2 request still gets two different samples
    again = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # the seed makes it reproducible

    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8, n=2,
                                                 temperature=1.0, seed=7, stream=True))
    finished = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert set(finished) == {0, 1}  # each choice streamed to its end


def test_stop_string_cuts_the_text(client, server):
    full = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0).choices[0].text
    # a stop string from the middle of the greedy text (several characters, so it can span tokens)
    at = len(full) // 2
    stop = full[at:at + 3]
    at = full.index(stop)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:at] and stop not in r.choices[0].text

    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=32, temperature=0,
                                            stop=stop, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == full[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(client, server):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert "".join(lp.tokens) == r.choices[0].text  # ASCII output: every token's text is whole
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token
        assert top.get(token) == pytest.approx(logprob, abs=1e-5)

    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, max_tokens=12, temperature=0,
                                            logprobs=3, stream=True))
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == lp.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset


def test_chat_logprobs(client, server):
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token

    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "size", "ok"],
    "additionalProperties": False,
}


# The grammar allows runs of at most 16 whitespace characters between JSON tokens (kiln.runtime.grammar), and
# this schema has 12 such gaps and about 20 tokens of content: 256 tokens always suffice to close the object.
MAX_JSON_TOKENS = 256


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, server, temperature):
    r = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "A widget as JSON."}], max_tokens=MAX_JSON_TOKENS,
        temperature=temperature, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "widget", "schema": SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)

    # the completions endpoint takes it too (a kiln/vLLM extension; the client passes it through)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=MAX_JSON_TOKENS,
                                  temperature=temperature, seed=1,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "w", "schema": SCHEMA}}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].text
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_token_id_prompt_equals_text_prompt(client, server):
    ids = server.engine.tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_repeated_prompt_reports_cached_tokens(client, server):
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    parser = make_parser()\n" * 3
    first = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=server.model, prompt=prompt, max_tokens=4, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens, second.usage


def test_api_key(server):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx2.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx2.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    assert httpx2.get(f"{server.url}/health", timeout=10).status_code == 200  # open without a key

    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=server.model, prompt=PROMPT, max_tokens=2)


def test_shared_prefix_is_not_recomputed(client, server):
    """A second request sharing a 200-token prefix with a finished one computes only its new tokens,
    read from /metrics."""
    from live_server import metrics

    tok = server.engine.tokenizer
    shared = tok.encode(open(__file__).read())[:200]
    first = shared + tok.encode("\nx = 1")
    second = shared + tok.encode("\nclass Settings:")
    client.completions.create(model=server.model, prompt=first, max_tokens=4, temperature=0)
    before = metrics(server.url)
    out = client.completions.create(model=server.model, prompt=second, max_tokens=4, temperature=0)
    after = metrics(server.url)
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common >= 200
    computed = after["kiln_prefill_tokens_computed_total"] - before["kiln_prefill_tokens_computed_total"]
    assert computed == len(second) - common
    assert out.usage.prompt_tokens_details.cached_tokens == common
    assert after["kiln_prefix_cache_hit_tokens_total"] - before["kiln_prefix_cache_hit_tokens_total"] == common
