"""A real uvicorn server (what ``kiln serve`` runs) on a free loopback port, in a background thread, over a
real engine on a compiled artifact; and /metrics read back as numbers. Imported by the server tests.

(A helper module rather than a tests/server/conftest.py: a second conftest module would shadow the
top-level one that other tests import names from.)"""

from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

# small enough for this machine, big enough for 64 concurrent short requests of the demo model (4 KiB/token)
KV_BYTES = 64 << 20


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    model: str
    api_key: str | None
    engine: object  # the AsyncEngine

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@contextmanager
def live_server(artifact, *, api_key: str | None = None, **engine_options):
    import uvicorn

    from kiln.runtime.engine import AsyncEngine, Engine, EngineConfig
    from kiln.server import build_app

    engine = AsyncEngine(Engine(artifact, EngineConfig(**{"kv_cache_memory": KV_BYTES, **engine_options})))
    app = build_app(engine, api_key=api_key)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", engine.model_name, api_key, engine)
    finally:
        server.should_exit = True  # graceful: lifespan shutdown stops the engine thread
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def metrics(base_url: str) -> dict[str, float]:
    """/metrics as {"name{labels}": value} for kiln's own series."""
    import httpx2

    text = httpx2.get(f"{base_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(kiln_\S+) (\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_for_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits, every KV sequence left is one the prefix cache keeps (a
    leaked request would stay in kiln_kv_sequences) and every used page is one of theirs:
    kiln_kv_pages_cached counts the pages of the prefix cache's entries, independently of the free count,
    so a page the KV cache lost track of would keep used above it."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        if (m["kiln_num_requests_running"] == 0 and m["kiln_num_requests_waiting"] == 0
                and m["kiln_kv_pages_used"] == m["kiln_kv_pages_cached"]
                and m["kiln_kv_sequences"] == m["kiln_prefix_cache_sequences"]):
            return m
        assert time.monotonic() < deadline, f"the engine did not go idle: {m}"
        time.sleep(0.1)
