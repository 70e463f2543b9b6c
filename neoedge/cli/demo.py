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
@click.option("--prompt", default="The default value is", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float,
              help="Sampling temperature (0 = greedy) [default: the package's, from the checkpoint's "
                   "generation_config.json].")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = off) [default: the package's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for sampling (same seed, same text).")
@friendly_errors
def demo(model: str, out: Path, prompt: str, max_new_tokens: int, temperature: float | None, top_k: int | None,
         seed: int) -> None:
    """Export a model and generate from it, end to end. Offline, a small bundled GPT-Neo is used."""
    from ..model import Model
    from ..options import GenerationOptions

    given = {k: v for k, v in (("temperature", temperature), ("top_k", top_k)) if v is not None}
    GenerationOptions(max_new_tokens=max_new_tokens, seed=seed, **given)  # bad options fail before the export
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
