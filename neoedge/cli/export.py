"""`neoedge export`: a checkpoint becomes a model package (needs the [export] extra)."""

from __future__ import annotations

from pathlib import Path

import click

from ..manifest import worst_validation_error
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
@click.option("--attention", type=click.Choice(["gqa", "plain"]), default="gqa", show_default=True,
              help="gqa: fused attention, in-place KV cache (fast); plain: standard ONNX ops.")
@click.option("--kv-cache", type=click.Choice(["auto", "float32", "int8"]), default="auto", show_default=True,
              help="KV cache precision; int8 uses per-channel scales calibrated at export (gqa only). "
                   "auto: int8 for int8/int4 packages, float32 for fp32.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a neoedge package.")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against transformers.")
@friendly_errors
def export(source: str, output: Path, quantize: str, block_size: int | None, lm_head_bits: str | None,
           symmetric: bool | None, attention: str, kv_cache: str, force: bool, no_validate: bool) -> None:
    """Export SOURCE (a hub id such as EleutherAI/gpt-neo-125m, or a checkpoint directory) to a
    model package at OUTPUT."""
    manifest = export_module().export_package(
        source, output, quantize=quantize, attention=attention, kv_cache=kv_cache, force=force,
        validate=not no_validate,
        block_size=block_size, lm_head_bits=int(lm_head_bits) if lm_head_bits else None, symmetric=symmetric)
    report = manifest.validation
    if report:
        click.echo(f"validated against transformers over {report['positions']} positions: max |Δlogit| "
                   f"prefill {report['max_abs_logit_diff_prefill']:.2e}, "
                   f"step-wise {report['max_abs_logit_diff_stepwise']:.2e}; top-1 agreement "
                   f"{report['top1_agreement']:.1%}", err=True)
        if "float64" in report:
            f = report["float64"]
            click.echo(f"beyond the {report['tolerance']:g} tolerance, so checked against float64 logits: "
                       f"max error {worst_validation_error(f, 'max_abs_error'):.2e}, "
                       f"transformers' own fp32 {f['max_abs_error_transformers']:.2e} (fp32 rounding)", err=True)
    click.echo(f"wrote {output}", err=True)
