"""`neoedge bench`: latency and memory of one package on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from ..session import SessionSettings
from .common import friendly_errors, session_options


def _counts(value: str, what: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in value.split(",") if c.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{what} takes comma-separated integers, got {value!r}") from exc
    if any(c < 1 for c in counts):
        raise click.BadParameter(f"{what} values must be >= 1, got {value!r}")
    return counts


@click.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=128, show_default=True,
              help="Length of the (random) prompt of the timed generations.")
@click.option("--new-tokens", type=int, default=128, show_default=True,
              help="Tokens each timed generation produces (eos is ignored).")
@click.option("--runs", type=int, default=3, show_default=True, help="Timed runs (after warm-up).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Untimed generations first (the first run allocates and warms caches).")
@click.option("--context", "contexts", default="",
              help="Context sweep: decode ms/token after prompts of these lengths, e.g. 128,512,1024,1900.")
@click.option("--chat-turns", type=int, default=0, show_default=True,
              help="Also time the first token of each turn of a chat that keeps its cache (e.g. 10).")
@click.option("--sequences", default="",
              help="Also measure memory with this many sequences on one model, e.g. 1,8 (fresh processes).")
@click.option("--cancel", "cancel", is_flag=True,
              help="Also time cancel(): while decoding, and 50 ms into a ~1,900-token prompt.")
@click.option("--batch", "batches", default="",
              help="Engine batch sizes, e.g. 1,2,4,8,16: B requests at once through an engine with B rows "
                   "(aggregate tokens/s, first-token and decode percentiles, memory); with 1, also batch 1 "
                   "through the engine vs the direct API in paired runs.")
@click.option("--clients", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also N concurrent streaming clients through a `neoedge serve` process vs the same requests "
                   "one at a time (needs the [serve] extra).")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time a fresh process from start to first token.")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="",
              help="Print the results as JSON on stdout (with a FILE argument: deprecated, use --output).")
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), help="Also write the results as JSON here.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Time sampled generation (0 = greedy).")
@click.option("--top-k", type=int, default=0, show_default=True, help="With --temperature: sample among the k most likely tokens (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="With --temperature: nucleus threshold (1 = off).")
@session_options
@friendly_errors
def bench(package: Path, prompt_tokens: int, new_tokens: int, runs: int, warmup: int, contexts: str,
          chat_turns: int, sequences: str, cancel: bool, batches: str, clients: int, cold_start: bool, json_out: str | None,
          output: Path | None, temperature: float, top_k: int, top_p: float, settings: SessionSettings) -> None:
    """Latency of PACKAGE on this machine: prefill, decode ms/token, load, cold start, memory."""
    import json

    from ..bench import BenchSettings, run_bench

    if clients:
        from .serve import server_module

        server_module()  # without the [serve] extra: its one-line error now, not after the other runs

    if json_out not in (None, "-"):
        click.echo("--json FILE is deprecated: use --output FILE (and --json to print JSON)", err=True)
        output = output or Path(json_out)
        json_out = None
    if output is not None and not output.absolute().parent.is_dir():  # found out now, not after the runs
        raise click.BadParameter(f"{output.absolute().parent} is not a directory", param_hint="--output")
    bench_settings = BenchSettings(
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup, session=settings,
        contexts=_counts(contexts, "--context"), cold_start=cold_start, temperature=temperature, top_k=top_k,
        top_p=top_p, chat_turns=chat_turns, sequences=_counts(sequences, "--sequences"), cancel=cancel,
        batches=_counts(batches, "--batch"), clients=clients)
    report = run_bench(package, bench_settings, progress=True)
    click.echo(json.dumps(report.to_dict(), indent=2) if json_out == "-" else report.render())
    if output:
        report.write_json(output)
        click.echo(f"wrote {output}", err=True)
