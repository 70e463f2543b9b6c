"""The `neoedge` command. Generated text goes to stdout; everything else to stderr.

Library errors become one-line messages with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import NeoedgeError
from .manifest import worst_validation_error

DEMO_HUB_MODEL = "EleutherAI/gpt-neo-125m"


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (NeoedgeError, ValueError, OSError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


def _export_module() -> Any:
    try:
        from neoedge import export
    except ImportError as exc:
        raise click.ClickException(
            f"export needs the [export] extra ({exc.name or exc} is missing): "
            "pip install 'neoedge[export]'") from exc
    return export


@click.group()
@click.version_option(package_name="neoedge")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """GPT-Neo on ordinary CPUs: export a model package, then generate from it."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@main.command()
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
@click.option("--attention", type=click.Choice(["gqa", "plain"]), default="gqa", show_default=True,
              help="gqa: fused attention, in-place KV cache (fast); plain: standard ONNX ops.")
@click.option("--kv-cache", type=click.Choice(["auto", "float32", "int8"]), default="auto", show_default=True,
              help="KV cache precision; int8 uses per-channel scales calibrated at export (gqa only). "
                   "auto: int8 for int8/int4 packages, float32 for fp32.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--no-validate", is_flag=True, help="Skip the parity check against transformers.")
@_friendly_errors
def export(source: str, output: Path, quantize: str, block_size: int | None, lm_head_bits: str | None,
           symmetric: bool | None, algorithm: str | None, calibration: Path | None, attention: str, kv_cache: str,
           force: bool, no_validate: bool) -> None:
    """Export SOURCE (a hub id such as EleutherAI/gpt-neo-125m, or a checkpoint directory) to a
    model package at OUTPUT."""
    manifest = _export_module().export_package(
        source, output, quantize=quantize, attention=attention, kv_cache=kv_cache, force=force,
        validate=not no_validate,
        block_size=block_size, lm_head_bits=int(lm_head_bits) if lm_head_bits else None, symmetric=symmetric,
        algorithm=algorithm, calibration=calibration)
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


def _session_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--threads, --spinning and --prepack, handed to the command as one `session` dict of
    Generator keyword arguments."""
    @functools.wraps(func)
    def wrapper(*args: Any, threads: int, spinning: bool, prepack: bool, **kwargs: Any) -> Any:
        return func(*args, session=dict(intra_threads=threads, spinning=spinning, prepack=prepack), **kwargs)

    wrapper = click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                           help="onnxruntime intra-op threads (0: one per physical core).")(wrapper)
    wrapper = click.option("--spinning/--no-spinning", default=True, show_default=True,
                           help="Keep worker threads spinning between ops.")(wrapper)
    wrapper = click.option("--prepack/--no-prepack", default=True, show_default=True,
                           help="Repack weights at load (int8/int4 need it; faster 125M fp32). --no-prepack "
                                "loads a large fp32 package in under a second, without a second copy "
                                "of its weights.")(wrapper)
    return wrapper


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="0 = greedy (the default).")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens (0 = off).")
@click.option("--top-p", type=float, help="Nucleus sampling threshold (1 = off).")
@click.option("--repetition-penalty", type=float, help="> 1 discourages repeats.")
@click.option("--seed", type=int, help="Random seed for sampling.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-text token.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is made.")
@_session_options
@_friendly_errors
def generate(package: Path, prompt: str, stream: bool, session: dict[str, Any],
             stop: tuple[str, ...], ignore_eos: bool, **options: Any) -> None:
    """Generate a continuation of PROMPT with the model PACKAGE."""
    from .generator import Generator

    generator = Generator(package, **session)
    opts = generator.options(stop=stop or None, stop_at_eos=False if ignore_eos else None, **options)
    if stream:
        for chunk in generator.stream(prompt, opts):
            click.echo(chunk, nl=False)
        click.echo()
    else:
        click.echo(generator.generate(prompt, opts))


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@_friendly_errors
def info(package: Path, as_json: bool, verify: bool) -> None:
    """Describe the model PACKAGE (its manifest)."""
    from .manifest import Manifest

    manifest = Manifest.read(package)
    manifest.check_files(package, verify_hashes=verify)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    m = manifest.model
    layers = ", ".join(f"{kind}×{m.attention_layers.count(kind)}" for kind in ("global", "local"))
    total = sum(entry.bytes for entry in manifest.files.values())
    lines = [
        f"package        {package}",
        f"format         neoedge-model-package v{manifest.format_version} ({manifest.created_by})",
        f"model          {m.architecture} from {m.source or '?'}",
        f"size           {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, vocab {m.vocab_size}",
        f"context        {m.context_length} tokens; local window {m.window_size} ({layers})",
        f"tokens         bos {m.bos_token_id}, eos {m.eos_token_id}",
        f"attention      {manifest.graph.attention}, {manifest.graph.kv_cache} KV cache",
        f"quantization   {manifest.quantization.scheme} "
        f"{manifest.quantization.settings.describe() if manifest.quantization.settings else ''}".rstrip(),
        f"files          {total / 1e6:.1f} MB: " + ", ".join(
            f"{name} ({entry.bytes / 1e6:.1f} MB)" for name, entry in manifest.files.items()),
    ]
    if manifest.validation:
        v = manifest.validation
        worst = worst_validation_error(v, "max_abs_logit_diff")
        lines.append(f"validation     max |Δlogit| vs transformers {worst:.2e} over {v['positions']} positions")
        if "float64" in v:
            f = v["float64"]
            lines.append(f"               vs float64 {worst_validation_error(f, 'max_abs_error'):.2e} "
                         f"(transformers fp32: {f['max_abs_error_transformers']:.2e})")
    if verify:
        lines.append("integrity      all sha256 match")
    click.echo("\n".join(lines))


@main.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), required=True,
              help="UTF-8 text file to score.")
@click.option("--window", type=int, help="Tokens per window (default: min(context, 1024)).")
@click.option("--stride", type=int, help="Tokens between window starts (default: window / 2).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Also compare with this package (e.g. the fp32 one): top-1 agreement and KL.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_session_options
@_friendly_errors
def eval_(package: Path, text_file: Path, window: int | None, stride: int | None, reference: Path | None,
          as_json: bool, session: dict[str, Any]) -> None:
    """Perplexity of a text under PACKAGE, computed by the runtime (no torch)."""
    from .evaluate import evaluate, read_text
    from .generator import Generator

    text = read_text(text_file)
    generator = Generator(package, **session)
    ref = Generator(reference, **session) if reference else None
    report = evaluate(generator, text, window=window, stride=stride, reference=ref, progress=True)
    if as_json:
        click.echo(json.dumps({"package": str(package), "text": str(text_file),
                               "reference": str(reference) if reference else None, **report.to_dict()}, indent=2))
        return
    click.echo(f"perplexity {report.perplexity:.4f} over {report.tokens} tokens "
               f"({report.windows} windows of {report.window}, stride {report.stride})")
    if ref is not None:
        click.echo(f"reference  perplexity {report.reference_perplexity:.4f}; top-1 agreement "
                   f"{report.top1_agreement:.2%}; mean KL {report.mean_kl:.5f} nats")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs (after warm-up).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--context", "contexts", default="", help="Context sweep, e.g. 128,512,1024,1900.")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time a fresh process from start to first token.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write results as JSON here.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Time sampled generation (0 = greedy).")
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@_session_options
@_friendly_errors
def bench(package: Path, prompt_tokens: int, new_tokens: int, runs: int, warmup: int, contexts: str,
          cold_start: bool, json_path: Path | None, temperature: float, top_k: int, top_p: float,
          session: dict[str, Any]) -> None:
    """Latency of PACKAGE on this machine: prefill, decode ms/token, load, cold start, memory."""
    from .bench import BenchSettings, format_report, run_bench, write_json

    try:
        sweep = tuple(int(c) for c in contexts.split(",") if c.strip())
    except ValueError as exc:
        raise click.BadParameter(f"--context takes comma-separated integers, got {contexts!r}") from exc
    settings = BenchSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup,
                             threads=session["intra_threads"], spinning=session["spinning"],
                             prepack=session["prepack"], contexts=sweep, cold_start=cold_start,
                             temperature=temperature, top_k=top_k, top_p=top_p)
    report = run_bench(package, settings, progress=True)
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"wrote {json_path}", err=True)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@main.command()
@click.option("--model", default=DEMO_HUB_MODEL, show_default=True,
              help="Hub id or checkpoint directory to export.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("neoedge-demo"), show_default=True,
              help="Where to write the checkpoint (if built) and the package.")
@click.option("--prompt", default="Return a new list", show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly_errors
def demo(model: str, out: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
         seed: int) -> None:
    """Export a model and generate from it, end to end. Offline, a small bundled GPT-Neo is used."""
    from .generator import Generator

    export = _export_module()
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
    generator = Generator(package)
    for chunk in generator.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, seed=seed):
        click.echo(chunk, nl=False)
    click.echo()


if __name__ == "__main__":
    main()
