"""Serving converted models: an HTTP server with micro-batching, and Triton model repositories.

The server needs the `serve` extra (`pip install 'dconnx[serve]'`: FastAPI, uvicorn,
python-multipart, prometheus-client); nothing here imports it until a server is made, so
`import dconnx` and `dconnx export-triton` work without it.
"""
from __future__ import annotations

from .config import ServeConfig  # noqa: F401
from .triton import export_triton  # noqa: F401


def create_app(model, config: ServeConfig | None = None):
    """The ASGI app serving one converted model (path or Explainer): FastAPI routes inside a
    middleware for body limits, request ids, metrics and logs. Run it with any ASGI server."""
    from .app import create_app as _create
    return _create(model, config or ServeConfig())


def serve(model, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    """Run the server in this process until interrupted (SIGINT/SIGTERM)."""
    from .app import run
    run(model, host, port, config or ServeConfig())
