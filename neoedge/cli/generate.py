"""`neoedge generate`: one continuation of a prompt, streamed to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..events import FinishReason
from ..options import ContextPolicy
from ..session import SessionSettings
from ..tokenizer import check_text
from .common import friendly_errors, session_options


def sampling_options(func: Any) -> Any:
    """The generation options shared by generate and chat (unset: the package's defaults)."""
    for option in reversed([
        click.option("--max-new-tokens", type=int, help="Most tokens to generate [default: the package's, 128]."),
        click.option("--temperature", type=float, help="0 = greedy [default: the package's, 0]."),
        click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold (1 = off)."),
        click.option("--repetition-penalty", type=float, help="> 1 discourages repeats (1 = off)."),
        click.option("--seed", type=int, help="Random seed for sampling."),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-text token."),
    ]):
        func = option(func)
    return func


def option_overrides(stop: tuple[str, ...], ignore_eos: bool, **options: Any) -> dict[str, Any]:
    for text in stop:
        check_text(text, "stop string")
    return dict(stop=stop or None, stop_at_eos=False if ignore_eos else None, **options)


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("prompt")
@sampling_options
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is made.")
@session_options
@friendly_errors
def generate(package: Path, prompt: str, stream: bool, settings: SessionSettings, stop: tuple[str, ...],
             ignore_eos: bool, **options: Any) -> None:
    """Generate a continuation of PROMPT with the model PACKAGE."""
    from ..model import Model

    check_text(prompt, "prompt")
    model = Model(package, settings=settings)
    opts = model.options(**option_overrides(stop, ignore_eos, **options))
    seq = model.sequence(policy=ContextPolicy(on_full="stop"))
    events = seq.stream(prompt, opts)
    if stream:
        for event in events:
            click.echo(event.text, nl=False)
        click.echo()
    else:
        click.echo(events.run().text)
    completion = events.completion
    if completion is not None and completion.finish_reason == FinishReason.CONTEXT:
        click.echo(f"(stopped: the model's context of {model.info.context_length} tokens is full)", err=True)
