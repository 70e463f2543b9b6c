"""`neoedge info`: what a package is, from its manifest."""

from __future__ import annotations

from pathlib import Path

import click

from ..manifest import Manifest
from ..options import GenerationOptions
from .common import Emitter, friendly_errors, megabytes, output_options


def describe_quantization(manifest: Manifest) -> str:
    q = manifest.quantization
    if q.scheme == "none" or q.settings is None:
        return "fp32 (not quantized)"
    return f"{q.scheme}, {q.settings.describe()}, accuracy level {q.settings.accuracy_level}, {q.settings.embedding}"


def describe_generation(manifest: Manifest) -> str:
    """The package's default generation options in words (what `generate` uses unless told otherwise)."""
    options = GenerationOptions.merged(manifest.generation, {})
    if options.greedy:
        parts = ["greedy"]
    else:
        parts = [f"sampling: temperature {options.temperature:g}"]
        parts += [f"top_k {options.top_k}"] if options.top_k else []
        parts += [f"top_p {options.top_p:g}"] if options.top_p < 1.0 else []
    if options.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {options.repetition_penalty:g}")
    parts.append(f"at most {options.max_new_tokens} new tokens")
    if options.stop:
        parts.append("stop at " + ", ".join(map(repr, options.stop)))
    return ", ".join(parts)


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True,
              help="Hash every file now, even those a verified stamp shows unchanged since last hashed.")
@output_options
@friendly_errors
def info(package: Path, verify: bool, emit: Emitter) -> None:
    """Describe the model PACKAGE (its manifest), after checking it as a load does."""
    from ..package import open_package

    manifest = open_package(package, verify="full" if verify else "auto").manifest
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
        f"weights        {describe_quantization(manifest)}",
        f"defaults       {describe_generation(manifest)}",
        f"files          {megabytes(total)}: " + ", ".join(
            f"{name} ({megabytes(entry.bytes)})" for name, entry in manifest.files.items()),
    ]
    if manifest.validation is not None:
        lines += [f"{'validation' if i == 0 else '':15}{line}" for i, line in enumerate(manifest.validation.lines())]
    lines += [f"{'notes' if i == 0 else '':15}{note}" for i, note in enumerate(manifest.notes)]
    if manifest.graph.kernel_file is not None:
        from .. import kernels

        here = kernels.info()
        stored = here.tiled_weights and manifest.graph.tiled_kernel_file is not None
        marked = here.tiled_weights and kernels.graph_allows_tiling(package / manifest.graph.kernel_file)
        details = [f"prompt attention on {here.attention}"] if here.attention else []
        details += ["weights stored tiled"] if stored else ["weights tiled in place"] if marked else []
        attention = f" ({', '.join(details)})" if details else ""
        runs = ("runs here on " + here.isa + attention) if here.available and here.preferred else \
            f"not used here ({here.reason})"
        graph_name = manifest.graph.tiled_kernel_file if stored and here.available and here.preferred \
            else manifest.graph.kernel_file
        lines.append(f"kernels        {graph_name}: neoedge's native kernels, {runs}")
    lines.append(f"integrity      all sha256 match{' (every file hashed now)' if verify else ''}")
    emit({**manifest.to_dict(), **({"verified": True} if verify else {})}, "\n".join(lines))
