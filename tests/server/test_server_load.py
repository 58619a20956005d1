"""Many clients at once, and clients that go away: every request completes or is aborted, and the KV pages
come back (all that stays used afterwards is what the prefix cache keeps), as /metrics reports."""

from __future__ import annotations

import asyncio
import json
import time

import httpx2
import pytest

from live_server import live_server, metrics, wait_for_idle

pytestmark = pytest.mark.cpu

NUM_CLIENTS = 64


@pytest.fixture(scope="module")
def server(zoo):
    with live_server(zoo.artifact("demo")) as s:
        yield s


async def stream_one(client: httpx2.AsyncClient, server, i: int) -> tuple[str, dict, str]:
    """One streaming request (chat or completion, alternately); returns (text, usage, finish_reason)."""
    chat = i % 2 == 1
    body = {"model": server.model, "max_tokens": 8 + i % 9, "temperature": 0.8, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Write function number {i}."}]
    else:
        path = "/v1/completions"
        body["prompt"] = f"def function_{i}(x):\n    "
    text, usage, finish, done = "", None, None, False
    async with client.stream("POST", f"{server.url}{path}", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            if event["usage"]:
                usage = event["usage"]
            for c in event["choices"]:
                text += (c["delta"].get("content") or "") if chat else c["text"]
                finish = c["finish_reason"] or finish
    assert done and usage is not None and finish in ("stop", "length")
    return text, usage, finish


def test_64_concurrent_streams(server):
    before = metrics(server.url)

    async def main():
        limits = httpx2.Limits(max_connections=NUM_CLIENTS, max_keepalive_connections=NUM_CLIENTS)
        async with httpx2.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, server, i) for i in range(NUM_CLIENTS)))

    results = asyncio.run(main())
    assert len(results) == NUM_CLIENTS
    for i, (text, usage, finish) in enumerate(results):
        assert 1 <= usage["completion_tokens"] <= 8 + i % 9
        assert finish == "stop" or usage["completion_tokens"] == 8 + i % 9

    after = wait_for_idle(server.url)
    finished = sum(after[f'kiln_requests_finished_total{{reason="{r}"}}'] for r in ("stop", "length", "abort"))
    finished -= sum(before[f'kiln_requests_finished_total{{reason="{r}"}}'] for r in ("stop", "length", "abort"))
    assert finished == NUM_CLIENTS
    assert after['kiln_requests_finished_total{reason="abort"}'] == before['kiln_requests_finished_total{reason="abort"}']
    assert after["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] == \
        sum(u["completion_tokens"] for _, u, _ in results)
    assert after["kiln_time_to_first_token_seconds_count"] - before["kiln_time_to_first_token_seconds_count"] \
        == NUM_CLIENTS
    assert after["kiln_e2e_request_latency_seconds_count"] - before["kiln_e2e_request_latency_seconds_count"] \
        == NUM_CLIENTS


def abort_count(server) -> float:
    return metrics(server.url)['kiln_requests_finished_total{reason="abort"}']


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_mid_stream_aborts_the_request(server, path):
    wait_for_idle(server.url)
    aborted = abort_count(server)
    # a request that would run to the end of the context window if nobody stopped it
    body = {"model": server.model, "stream": True, "ignore_eos": True, "temperature": 0.0}
    body.update({"prompt": "def main():"} if path == "/v1/completions" else
                {"messages": [{"role": "user", "content": "Go on forever."}]})
    with httpx2.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}{path}", json=body) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break  # leaving the block closes the connection mid-stream
    m = metrics(server.url)
    assert m["kiln_num_requests_running"] + m["kiln_num_requests_waiting"] <= 1
    deadline = time.monotonic() + 20
    while abort_count(server) != aborted + 1:
        assert time.monotonic() < deadline, "the disconnected client's request was not aborted"
        time.sleep(0.05)
    idle = wait_for_idle(server.url)
    assert idle["kiln_kv_pages_used"] == idle["kiln_kv_pages_cached"]


def test_client_disconnect_while_waiting_for_a_whole_response(server):
    wait_for_idle(server.url)
    aborted = abort_count(server)
    body = {"model": server.model, "prompt": "class Config:", "ignore_eos": True, "temperature": 0.0}
    with pytest.raises(httpx2.ReadTimeout):  # the client gives up long before the 500 tokens are ready
        httpx2.post(f"{server.url}/v1/completions", json=body, timeout=httpx2.Timeout(10, read=0.05))
    deadline = time.monotonic() + 20
    while abort_count(server) != aborted + 1:
        assert time.monotonic() < deadline, "the request of a client that went away was not aborted"
        time.sleep(0.05)
    wait_for_idle(server.url)
