"""`neoedge export`: a checkpoint becomes a model package (needs the [export] extra)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import export_module, friendly_errors


@click.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="Weight precision: fp32, or block-wise int8/int4 (MatMulNBits, int8 compute).")
@click.option("--block-size", type=int,
              help="Quantization block size (default 128, halved where a weight's width needs it).")
@click.option("--lm-head-bits", type=click.Choice(["4", "8"]),
              help="Precision of the tied embedding/lm_head (default: as --quantize).")
@click.option("--symmetric/--asymmetric", default=None,
              help="Zero points per block (asymmetric) or none (symmetric, faster kernels); "
                   "default: int8 asymmetric, int4 symmetric.")
@click.option("--algorithm", type=click.Choice(["rtn", "weighted-clip", "awq", "gptq"]),
              help="How int8/int4 weights are rounded: rtn (round-to-nearest, no calibration) or data-aware "
                   "from calibration text (weighted-clip, awq, gptq); default: gptq.")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False),
              help="UTF-8 text for data-aware quantization and the int8 KV cache's scales "
                   "(default: the corpus that ships with neoedge).")
@click.option("--attention", type=click.Choice(["auto", "gqa", "plain"]), default="auto", show_default=True,
              help="gqa: fused attention, in-place KV cache (fast); plain: standard ONNX ops; "
                   "auto: gqa where it can take the model's head size (a multiple of 8), else plain.")
@click.option("--kv-cache", type=click.Choice(["auto", "float32", "int8"]), default="auto", show_default=True,
              help="KV cache precision; int8 uses per-channel scales calibrated at export (gqa only). "
                   "auto: int8 for int8/int4 packages, float32 for fp32.")
@click.option("--tiled-weights", is_flag=True,
              help="Also store the weights in the layout neoedge's AVX-512 VNNI kernels read (a second weights "
                   "file, about the size of the first): a faster cold start where those kernels run.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it holds a neoedge package (nothing else is replaced).")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against transformers.")
@friendly_errors
def export(source: str, output: Path, quantize: str, block_size: int | None, lm_head_bits: str | None,
           symmetric: bool | None, algorithm: str | None, calibration: Path | None, attention: str, kv_cache: str,
           tiled_weights: bool, force: bool, no_validate: bool) -> None:
    """Export SOURCE (a hub id such as EleutherAI/gpt-neo-125m, or a checkpoint directory) to a
    model package at OUTPUT."""
    export = export_module()
    try:
        manifest = export.export_package(
            source, output, quantize=quantize, attention=attention, kv_cache=kv_cache, force=force,
            validate=not no_validate,
            block_size=block_size, lm_head_bits=int(lm_head_bits) if lm_head_bits else None, symmetric=symmetric,
            algorithm=algorithm, calibration=calibration, tiled_weights=tiled_weights)
    except export.OutputExistsError as exc:
        raise click.ClickException(f"{exc.output} already holds a neoedge package; add --force to replace it") from exc
    if manifest.validation is not None:
        for line in ["validated " + manifest.validation.lines()[0], *manifest.validation.lines()[1:]]:
            click.echo(line, err=True)
    click.echo(f"wrote {output}", err=True)
