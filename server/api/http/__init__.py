"""The HTTP API: OpenAI-compatible embeddings and gRPC-JSON routes, served by uvicorn on gRPC's event loop.

It calls the same servicers as gRPC (same models, batchers, limits, token table), through a
small adapter that stands in for gRPC's servicer context.
"""

from .app import create_app
from .server import HttpServer
from .services import HttpServices

__all__ = ["HttpServer", "HttpServices", "create_app"]
