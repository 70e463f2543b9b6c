"""`neoedge eval`: perplexity of a text (and agreement with a reference package), by the runtime."""

from __future__ import annotations

from pathlib import Path

import click

from ..session import SessionSettings
from .common import Emitter, friendly_errors, output_options, session_options


@click.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), required=True,
              help="UTF-8 text file to score.")
@click.option("--window", type=int, help="Tokens per window (default: min(context, 1024)).")
@click.option("--stride", type=int, help="Tokens between window starts (default: window / 2).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Also compare with this package (e.g. the fp32 one): top-1 agreement and KL.")
@output_options
@session_options
@friendly_errors
def eval_(package: Path, text_file: Path, window: int | None, stride: int | None, reference: Path | None,
          emit: Emitter, settings: SessionSettings) -> None:
    """Perplexity of a text under PACKAGE, computed by the runtime (no torch)."""
    from ..evaluate import evaluate, read_text
    from ..model import Model

    text = read_text(text_file)
    model = Model(package, settings=settings)
    ref = Model(reference, settings=settings) if reference else None
    report = evaluate(model, text, window=window, stride=stride, reference=ref, progress=True)
    lines = [f"perplexity {report.perplexity:.4f} over {report.tokens} tokens "
             f"({report.windows} windows of {report.window}, stride {report.stride})"]
    if ref is not None:
        lines.append(f"reference  perplexity {report.reference_perplexity:.4f}; top-1 agreement "
                     f"{report.top1_agreement:.2%}; mean KL {report.mean_kl:.5f} nats")
    emit({"package": str(package), "text": str(text_file), "reference": str(reference) if reference else None,
          **report.to_dict()}, "\n".join(lines))
