"""What every `neoedge` command shares: one-line errors, session settings, output conventions.

Conventions: generated text goes to stdout, everything else to stderr. `--json` prints the
command's result as JSON on stdout instead of text; `--output FILE` also writes it to FILE.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..errors import NeoedgeError
from ..session import SessionSettings


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become one line on stderr and exit status 1, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (NeoedgeError, ValueError, OSError) as exc:
            raise click.ClickException(" ".join(str(exc).split()) or type(exc).__name__) from exc
    return wrapper


def session_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--threads, --spinning and --prepack, handed to the command as one `settings` SessionSettings."""
    @functools.wraps(func)
    def wrapper(*args: Any, threads: int, spinning: bool, prepack: bool, **kwargs: Any) -> Any:
        try:
            settings = SessionSettings(intra_threads=threads, spinning=spinning, prepack=prepack)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        return func(*args, settings=settings, **kwargs)

    wrapper = click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                           help="onnxruntime intra-op threads (0: one per physical core).")(wrapper)
    wrapper = click.option("--spinning/--no-spinning", default=True, show_default=True,
                           help="Keep worker threads spinning between ops (faster, busier CPU).")(wrapper)
    wrapper = click.option("--prepack/--no-prepack", default=True, show_default=True,
                           help="Repack weights at load (int8/int4 need it; faster 125M fp32). --no-prepack "
                                "loads a large fp32 package in under a second, without a second copy "
                                "of its weights.")(wrapper)
    return wrapper


def output_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--json (print JSON to stdout) and --output FILE (write JSON there), as `emit` argument."""
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, output: Path | None, **kwargs: Any) -> Any:
        return func(*args, emit=Emitter(as_json, output), **kwargs)

    wrapper = click.option("--output", type=click.Path(path_type=Path, dir_okay=False),
                           help="Also write the result as JSON to this file.")(wrapper)
    wrapper = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout instead of text.")(wrapper)
    return wrapper


class Emitter:
    """Prints a result as text or JSON, and writes the JSON file, once."""

    def __init__(self, as_json: bool, output: Path | None) -> None:
        self.as_json = as_json
        self.output = output

    def __call__(self, data: dict[str, Any], text: str) -> None:
        payload = json.dumps(data, indent=2)
        click.echo(payload if self.as_json else text)
        if self.output is not None:
            self.output.write_text(payload + "\n", encoding="utf-8")
            click.echo(f"wrote {self.output}", err=True)


def export_module() -> Any:
    try:
        from neoedge import export
    except ImportError as exc:
        raise click.ClickException(
            f"export needs the [export] extra ({exc.name or exc} is missing): "
            "pip install 'neoedge[export]'") from exc
    return export


def megabytes(size: int) -> str:
    """A file size a person can read: KB below a megabyte, never "0.0 MB"."""
    if size < 1_000_000:
        return f"{size / 1e3:.1f} KB"
    return f"{size / 1e6:.1f} MB"


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
