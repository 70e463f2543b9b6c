"""Running the application with uvicorn: in the foreground (`neoedge serve`) or in a background
thread of the calling process (tests, benchmarks, an app embedding the server)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from ..engine import Engine
from ..model import Model
from .app import Service, create_app
from .settings import ServeSettings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, telling its owner the address it got once it listens (port 0 picks one)."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str, int], None] | None) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self.address: tuple[str, int] | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.address = (host, port)
            if self._on_ready is not None:
                self._on_ready(host, port)


def _config(model: Model, settings: ServeSettings) -> uvicorn.Config:
    if settings.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    # log_config=None: uvicorn logs through the standard logging set up by the caller (the CLI's
    # stderr handler), instead of replacing it with its own configuration.
    return uvicorn.Config(create_app(model, settings), host=settings.host, port=settings.port, log_config=None,
                          access_log=settings.access_log, lifespan="on", server_header=False,
                          timeout_graceful_shutdown=int(round(settings.graceful_shutdown_s)) or None)


def run(model: Model, settings: ServeSettings, *, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until interrupted (SIGINT/SIGTERM: running requests get `graceful_shutdown_s` to finish)."""
    server = _Server(_config(model, settings), on_ready)
    server.run()
    if not server.started:
        raise OSError(f"the server could not start on {settings.host}:{settings.port} (see the log above)")


class BackgroundServer:
    """The server in a thread of this process, for as long as the `with` block lasts.

        with BackgroundServer(model, ServeSettings(port=0)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(...)
    """

    def __init__(self, model: Model, settings: ServeSettings | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.settings = settings or ServeSettings(port=0)
        self._config = _config(model, self.settings)
        self._server = _Server(self._config, None)
        self._thread = threading.Thread(target=self._run, name="neoedge-serve", daemon=True)
        self._failure: BaseException | None = None
        self._timeout = start_timeout_s

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as exc:  # uvicorn exits with SystemExit when the app cannot start
            self._failure = exc

    @property
    def service(self) -> Service:
        return self._config.app.state.service

    @property
    def engine(self) -> Engine:
        engine = self.service.engine
        assert engine is not None, "the server is not running"
        return engine

    @property
    def url(self) -> str:
        assert self._server.address is not None, "the server is not running"
        host, port = self._server.address
        return f"http://{host}:{port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        while not self._server.started:
            self._thread.join(0.02)
            if not self._thread.is_alive():
                raise OSError(f"the server did not start: {self._failure!r}")
            self._timeout -= 0.02
            if self._timeout <= 0:
                self.stop()
                raise TimeoutError("the server did not start in time")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
