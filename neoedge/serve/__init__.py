"""`neoedge serve`: an OpenAI-compatible HTTP API over one model (needs the [serve] extra).

    from neoedge import Model
    from neoedge.serve import ServeSettings
    from neoedge.serve.server import BackgroundServer, run

    run(Model("pkg"), ServeSettings(port=8000))              # blocking, like `neoedge serve pkg`
    with BackgroundServer(Model("pkg"), ServeSettings(port=0)) as server:
        print(server.url)                                     # in a thread of this process

Modules: `settings` (what the server may do), `schema` (request bodies, checked), `responses`
(OpenAI response bodies), `tokens` (token text and bytes for log-probs), `app` (the Starlette
application: routes, streaming, disconnects), `server` (uvicorn). Only `app` and `server` import
the HTTP libraries, so this package and its settings import without the extra.
"""

from .settings import Limits, ServeSettings

SERVE_DEPENDENCIES = ("starlette", "uvicorn", "anyio", "h11")
"""Top-level modules of the [serve] extra's libraries (an ImportError naming one means: not installed)."""

__all__ = ["SERVE_DEPENDENCIES", "Limits", "ServeSettings"]
