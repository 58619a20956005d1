"""kiln's OpenAI-compatible HTTP server: ``build_app(AsyncEngine) -> FastAPI`` (app.py), the wire format
(protocol.py) and the Prometheus metrics (metrics.py). ``kiln serve`` runs it under uvicorn."""

from .app import APIError, ServerConfig, build_app
from .metrics import ServerMetrics

__all__ = ["APIError", "ServerConfig", "ServerMetrics", "build_app"]
