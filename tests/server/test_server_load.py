"""Many clients at once, and clients that go away: every request completes or is aborted, and the KV pages
come back (all that stays used afterwards is what the prefix cache keeps), as /metrics reports."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

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
    grew = {k: after[k] - before[k] for k in after if k.endswith(("_count", "_sum"))}
    assert grew["kiln_time_to_first_token_seconds_count"] == NUM_CLIENTS
    assert grew["kiln_e2e_request_latency_seconds_count"] == NUM_CLIENTS
    # one output per token (n=1), so each request's later tokens are an inter-token gap each
    assert grew["kiln_inter_token_latency_seconds_count"] == sum(u["completion_tokens"] - 1 for _, u, _ in results)
    # per request, first token + gaps = arrival to last output <= arrival to the end (e2e)
    assert 0 < grew["kiln_time_to_first_token_seconds_sum"] + grew["kiln_inter_token_latency_seconds_sum"] \
        <= grew["kiln_e2e_request_latency_seconds_sum"]

    # idle: the pages in use are exactly the prefix cache's (wait_for_idle), and dropping it frees them all
    assert after["kiln_prefix_cache_sequences"] > 0 and after["kiln_kv_pages_cached"] > 0
    cleared = server.engine.clear_prefix_cache().result(timeout=30)
    assert cleared.kv_pages_free - after["kiln_kv_pages_free"] == after["kiln_kv_pages_cached"]
    m = metrics(server.url)
    assert m["kiln_kv_pages_free"] == m["kiln_kv_pages_total"] and m["kiln_kv_pages_cached"] == 0
    assert m["kiln_kv_sequences"] == 0 and m["kiln_prefix_cache_sequences"] == 0


def abort_count(server) -> float:
    return metrics(server.url)['kiln_requests_finished_total{reason="abort"}']


@dataclass
class Abort:
    applied: int  # engine steps run when the engine applied the abort
    pages: int  # KV pages the request held that no other sequence held
    freed: int  # free pages the abort gave back
    left: list  # the request's sequences still in the KV cache afterwards


@dataclass
class Aborts:
    asked: dict[str, int] = field(default_factory=dict)  # request id -> engine steps run when the server asked
    applied: dict[str, Abort] = field(default_factory=dict)


@pytest.fixture
def aborts(server, monkeypatch) -> Aborts:
    """Every abort, watched on both sides of the engine's command queue. The server is in-process, so the
    test wraps the AsyncEngine's ``_abort`` (called on the event loop once the server has noticed the
    client is gone) and the Engine's ``abort_request`` (called on the engine thread)."""
    front, core = server.engine, server.engine.engine
    seen = Aborts()
    ask, apply = front._abort, core.abort_request

    def _abort(request_id):
        ask(request_id)
        seen.asked[request_id] = core.num_steps  # read after queueing: the bound below is exact

    def abort_request(request_id):
        live = core._live.get(request_id)
        mine = [q.seq_id for q in live.seqs if q.seq_id in core.kv.live] if live else []
        pages = core.kv.num_pages_of({q: core.kv.sequence_len(q) for q in mine}, set(core.kv.live) - set(mine))
        free = core.kv.num_free_pages
        apply(request_id)
        seen.applied[request_id] = Abort(core.num_steps, pages, core.kv.num_free_pages - free,
                                         [q for q in mine if q in core.kv.live])

    monkeypatch.setattr(front, "_abort", _abort)
    monkeypatch.setattr(core, "abort_request", abort_request)
    return seen


def assert_aborted_within_a_step(aborts: Aborts) -> None:
    """The one request aborted was running with KV pages of its own; the engine applied the abort before
    the step after the one in flight when the server asked (steps between: 0 or 1), and that freed
    exactly the pages only the request held. How soon the server notices a client leave is the HTTP
    stack's business (uvicorn); from then on it is this bound."""
    deadline = time.monotonic() + 20
    while not aborts.asked or set(aborts.applied) != set(aborts.asked):
        assert time.monotonic() < deadline, f"the request of a client that went away was not aborted: {aborts}"
        time.sleep(0.02)
    ((rid, asked),) = aborts.asked.items()
    a = aborts.applied[rid]
    assert a.applied - asked <= 1, f"the abort waited {a.applied - asked} engine steps"
    assert a.pages > 0 and a.freed == a.pages and a.left == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_mid_stream_aborts_the_request(server, aborts, path):
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
    assert_aborted_within_a_step(aborts)
    idle = wait_for_idle(server.url)
    assert abort_count(server) == aborted + 1
    assert idle["kiln_kv_pages_used"] == idle["kiln_kv_pages_cached"]


def test_client_disconnect_while_waiting_for_a_whole_response(server, aborts):
    wait_for_idle(server.url)
    aborted = abort_count(server)
    body = {"model": server.model, "prompt": "class Config:", "ignore_eos": True, "temperature": 0.0}
    with pytest.raises(httpx2.ReadTimeout):  # the client gives up long before the 500 tokens are ready
        httpx2.post(f"{server.url}/v1/completions", json=body, timeout=httpx2.Timeout(10, read=0.05))
    assert_aborted_within_a_step(aborts)
    wait_for_idle(server.url)
    assert abort_count(server) == aborted + 1
