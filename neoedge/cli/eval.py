"""`neoedge eval`: perplexity of a text (and agreement with a reference package), by the runtime;
or, with --tasks, lm-evaluation-harness tasks through neoedge's lm-eval backend ([eval] extra)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..session import SessionSettings
from .common import Emitter, friendly_errors, output_options, session_options


@click.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="UTF-8 text file to score (perplexity, agreement with --reference).")
@click.option("--window", type=int, help="Tokens per window (default: min(context, 1024)).")
@click.option("--stride", type=int, help="Tokens between window starts (default: window / 2).")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Also compare with this package (e.g. the fp32 one): top-1 agreement and KL.")
@click.option("--tasks", help="lm-eval tasks, comma-separated (e.g. stdlib,lambada_openai); needs the [eval] "
                              "extra. neoedge's offline tasks: stdlib (all of them), stdlib_cloze, "
                              "stdlib_nextword, stdlib_nextword_gen, stdlib_perplexity.")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(path_type=Path),
              help="Another directory of lm-eval task YAMLs (repeatable).")
@click.option("--limit", type=float, help="At most this many documents per task (or a fraction below 1).")
@click.option("--batch-size", default="1", show_default=True,
              help="Contexts scored in one pass and rows generated together, or 'auto' (8).")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples per prompt (default: the task's).")
@output_options
@session_options
@friendly_errors
def eval_(package: Path, text_file: Path | None, window: int | None, stride: int | None, reference: Path | None,
          tasks: str | None, include_paths: tuple[Path, ...], limit: float | None, batch_size: str,
          num_fewshot: int | None, emit: Emitter, settings: SessionSettings) -> None:
    """Quality of PACKAGE, computed by the runtime (no torch): perplexity of --text FILE, or the
    lm-evaluation-harness --tasks (the harness's results table)."""
    if (text_file is None) == (tasks is None):
        raise click.UsageError("give either --text FILE (perplexity) or --tasks TASK[,TASK] (lm-eval)")
    if tasks is not None:
        if window is not None or stride is not None or reference is not None:
            raise click.UsageError("--window, --stride and --reference go with --text, not --tasks")
        _run_tasks(package, tasks, include_paths, limit, batch_size, num_fewshot, emit, settings)
        return
    if include_paths or limit is not None or num_fewshot is not None:
        raise click.UsageError("--include-path, --limit and --num-fewshot go with --tasks, not --text")
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


def _run_tasks(package: Path, tasks: str, include_paths: tuple[Path, ...], limit: float | None, batch_size: str,
               num_fewshot: int | None, emit: Emitter, settings: SessionSettings) -> None:
    try:
        from .. import lm_eval_backend as backend
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    from lm_eval.utils import handle_non_serializable

    from ..model import Model

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None and not limit > 0:
        raise click.BadParameter(f"must be above 0, got {limit:g}", param_hint="--limit")
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise click.BadParameter("a limit of 1 or more is a number of documents: give an integer",
                                     param_hint="--limit")
        limit = int(limit)
    model = Model(package, settings=settings)
    results = backend.evaluate(model, names, include_path=include_paths, limit=limit,
                               batch_size=int(batch_size) if batch_size.isdigit() else batch_size,
                               num_fewshot=num_fewshot)
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples", "config")
    data = json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=handle_non_serializable))
    emit({"package": str(package), "tasks": names, "limit": limit, **data}, backend.results_table(results))
