"""The `neoedge` command. Generated text goes to stdout; everything else to stderr.

Library errors become one-line messages with a non-zero exit, never a traceback. One module per
command; `common` holds what they share.
"""

from __future__ import annotations

import logging
import sys

import click

from .bench import bench
from .chat import chat
from .demo import demo
from .eval import eval_
from .export import export
from .generate import generate
from .info import info
from .serve import serve


@click.group()
@click.version_option(package_name="neoedge")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """GPT-Neo on ordinary CPUs: export a model package, then generate from it."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


for command in (export, generate, chat, info, eval_, bench, demo, serve):
    main.add_command(command)

__all__ = ["main"]
