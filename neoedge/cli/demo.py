"""`neoedge demo`: export a model and generate from it, end to end (needs the [export] extra)."""

from __future__ import annotations

import socket
from pathlib import Path

import click

from .common import export_module, friendly_errors

DEMO_HUB_MODEL = "EleutherAI/gpt-neo-125m"


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@click.command()
@click.option("--model", default=DEMO_HUB_MODEL, show_default=True,
              help="Hub id or checkpoint directory to export.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("neoedge-demo"), show_default=True,
              help="Directory to write the model package into (as OUT/package).")
@click.option("--prompt", default="Return a new list", show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def demo(model: str, out: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
         seed: int) -> None:
    """Export a model and generate from it, end to end. Offline, a small bundled GPT-Neo is used."""
    from ..model import Model

    export = export_module()
    source = model
    if not Path(model).exists() and not _hub_reachable():
        from neoedge.export.tiny import trained_checkpoint

        source = str(trained_checkpoint())
        click.echo(f"{model} is not reachable (offline?): using the small GPT-Neo that ships with "
                   f"neoedge, trained on Python's docstrings ({source})", err=True)
    package = out / "package"
    export.export_package(source, package, force=True)
    click.echo(f"package: {package}  (try: neoedge info {package})", err=True)
    click.echo(f"prompt: {prompt!r}", err=True)
    for event in Model(package).stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, seed=seed):
        click.echo(event.text, nl=False)
    click.echo()
