"""`neoedge serve`: an OpenAI-compatible HTTP API for one package (needs the [serve] extra)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import click

from ..session import SessionSettings
from .chat import chat_format_from_options
from .common import friendly_errors, session_options

log = logging.getLogger(__name__)


def server_module() -> ModuleType:
    """neoedge.serve.server, or a one-line error naming the extra when its libraries are missing."""
    from ..serve import SERVE_DEPENDENCIES

    try:
        from ..serve import server
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in SERVE_DEPENDENCIES:
            raise
        raise click.ClickException(f"serve needs the [serve] extra ({missing} is missing): "
                                   "pip install 'neoedge[serve]'") from exc
    return server


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--api-key", envvar="NEOEDGE_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1 requests.")
@click.option("--model-name", help="The model's id in /v1/models and responses [default: the package's directory name].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most generations running at once (each holds a KV cache).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most generations waiting for a row; beyond it requests get 503 with Retry-After.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1_000_000, show_default=True,
              help="Largest request body (413 beyond).")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1),
              help="Longest prompt or chat transcript in tokens [default: the context minus one].")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(min=1),
              help="Largest max_tokens a request may ask for [default: the model's context].")
@click.option("--max-n", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most generations per request (n x the number of prompts).")
@click.option("--system", default=None, help="Chat: text placed before the first turn (besides system messages).")
@click.option("--user", "user_name", default=None, help="Chat: the user's name in the transcript [default: User].")
@click.option("--assistant", "assistant_name", default=None,
              help="Chat: the assistant's name in the transcript [default: Assistant].")
@click.option("--format", "format_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Chat: JSON file with the transcript format (system, user, assistant, separator).")
@click.option("--access-log", is_flag=True, help="Log one line per HTTP request on stderr.")
@session_options
@friendly_errors
def serve(package: Path, host: str, port: int, api_key: str | None, model_name: str | None, max_batch: int,
          max_queue: int, max_body_bytes: int, max_prompt_tokens: int | None, max_tokens_limit: int | None,
          max_n: int, system: str | None, user_name: str | None, assistant_name: str | None,
          format_file: Path | None, access_log: bool, settings: SessionSettings) -> None:
    """Serve PACKAGE over HTTP with OpenAI's API: /v1/completions, /v1/chat/completions (with
    streaming), /v1/models and /health. Requests are batched together by one engine."""
    from ..engine import EngineSettings
    from ..model import Model
    from ..serve import Limits, ServeSettings

    server = server_module()
    chat_format = chat_format_from_options(format_file, system, user_name, assistant_name)
    serve_settings = ServeSettings(
        host=host, port=port, api_key=api_key, model_name=model_name, access_log=access_log,
        engine=EngineSettings(max_batch=max_batch, max_queue=max_queue), chat_format=chat_format,
        limits=Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                      max_tokens=max_tokens_limit, max_choices=max_n))
    if not serve_settings.loopback and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine "
                   "can use the model", err=True)
    model = Model(package, settings=settings)

    def ready(bound_host: str, bound_port: int) -> None:
        click.echo(f"serving {package} on http://{bound_host}:{bound_port}/v1 (max batch {max_batch}, "
                   f"queue {max_queue}{', API key required' if api_key else ''}; Ctrl-C stops)", err=True)

    try:
        server.run(model, serve_settings, on_ready=ready)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    click.echo("stopped", err=True)
