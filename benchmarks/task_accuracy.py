"""Task accuracy of quantized packages, measured with lm-eval: fp32, int8 and int4 beside transformers.

    python benchmarks/task_accuracy.py [--checkpoint DIR] [--limit N]

Default model: the trained tiny GPT-Neo that ships with neoedge.export. Every row runs neoedge's
offline lm-eval tasks in full (neoedge/eval_tasks: 400 next-word questions from the held-out
docstrings as 4-way cloze, lambada-style next word and greedy next-word generation, and rolling
perplexity of the 32 held-out documents): transformers fp32 through lm-eval's own `hf` backend (the
reference), then neoedge packages through neoedge's backend. "same answer as fp32" is the share of
cloze questions where the package picks the choice transformers fp32 picks (more sensitive than the
accuracy, which can stay equal while answers change). Perplexity-style columns are those of the
quality table (benchmarks/quality.py) measured the lm-eval way (documents scored separately).

Writes benchmarks/results/task-accuracy-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "work" / "task-accuracy"

from exports import cached_export  # noqa: E402

VARIANTS = {
    "neoedge fp32": dict(quantize="none"),
    "neoedge int8 (default: block 128)": dict(quantize="int8"),
    "neoedge int4 (default: block 128, symmetric)": dict(quantize="int4"),
    "neoedge int4 (default, lm_head int8)": dict(quantize="int4", lm_head_bits=8),
    "neoedge int4 (block 32, asymmetric)": dict(quantize="int4", block_size=32, symmetric=False),
}
TASKS = ["stdlib_cloze", "stdlib_nextword", "stdlib_nextword_gen", "stdlib_perplexity"]
COLUMNS = [  # (header, task, metric key, format)
    ("cloze acc", "stdlib_cloze", "acc,none", "{:.2%}"),
    ("cloze acc_norm", "stdlib_cloze", "acc_norm,none", "{:.2%}"),
    ("next-word acc", "stdlib_nextword", "acc,none", "{:.2%}"),
    ("next-word perplexity", "stdlib_nextword", "perplexity,none", "{:.2f}"),
    ("generated next word", "stdlib_nextword_gen", "exact_match,first_word", "{:.2%}"),
    ("word perplexity", "stdlib_perplexity", "word_perplexity,none", "{:.1f}"),
    ("bits per byte", "stdlib_perplexity", "bits_per_byte,none", "{:.5f}"),
]


def cloze_choices(results: dict[str, Any]) -> list[int]:
    """The choice each cloze question's answer would be (highest log-likelihood), in document order."""
    samples = sorted(results["samples"]["stdlib_cloze"], key=lambda s: s["doc_id"])
    return [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]


def run(lm: Any, limit: int | None) -> dict[str, Any]:
    import lm_eval

    from neoedge.lm_eval_backend import task_manager

    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager(include_defaults=False),
                                   limit=limit, log_samples=True, bootstrap_iters=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="GPT-Neo checkpoint (default: the trained tiny model).")
    parser.add_argument("--limit", type=int, help="Documents per task (default: all).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import torch
    from lm_eval.api.registry import get_model

    from neoedge.export.tiny import trained_checkpoint
    from neoedge.lm_eval_backend import NeoedgeLM

    checkpoint = args.checkpoint or trained_checkpoint()
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    reference_choices: list[int] | None = None
    configs: list[tuple[str, Any, float | None]] = [
        ("transformers fp32 (lm-eval hf backend, reference)",
         lambda: get_model("hf")(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=8), None)]
    for name, options in VARIANTS.items():
        package = cached_export(str(checkpoint), WORK / f"{checkpoint.name}-{_slug(name)}", progress=False, **options)
        size = sum(f.stat().st_size for f in package.iterdir() if f.is_file()) / 1e6
        configs.append((name, lambda p=package: NeoedgeLM(p, threads=args.threads, batch_size=8), size))
    for name, make, size in configs:
        print(f"{name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        results = run(make(), args.limit)
        choices = cloze_choices(results)
        if reference_choices is None:
            reference_choices = choices
        same = sum(a == b for a, b in zip(choices, reference_choices)) / len(choices)
        rows[name] = {"metrics": {f"{task}/{key}": results["results"][task][key] for _, task, key, _ in COLUMNS},
                      "stderr": {f"{task}/{key}": results["results"][task].get(key.replace(",", "_stderr,"))
                                 for _, task, key, _ in COLUMNS},
                      "same_cloze_answer_as_reference": same, "size_mb": size,
                      "seconds": time.perf_counter() - start,
                      "documents": {task: len(results["samples"][task]) for task in TASKS}}

    date = datetime.date.today().isoformat()
    documents = next(iter(rows.values()))["documents"]
    header = ["configuration"] + [c[0] for c in COLUMNS] + ["same cloze answer as transformers", "size MB"]
    lines = [f"Model: {checkpoint}; neoedge's offline lm-eval tasks ("
             + ", ".join(f"{t}: {n} documents" for t, n in documents.items())
             + f"); lm-eval {_lm_eval_version()}. Date {date}.", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for name, row in rows.items():
        cells = [fmt.format(row["metrics"][f"{task}/{key}"]) for _, task, key, fmt in COLUMNS]
        cells.append(f"{row['same_cloze_answer_as_reference']:.2%}")
        cells.append(f"{row['size_mb']:.2f}" if row["size_mb"] is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    stderr = rows[next(iter(rows))]["stderr"]
    lines += ["", "Standard errors (transformers row): "
              + ", ".join(f"{c[0]} ±{fmt.format(stderr[f'{c[1]}/{c[2]}'])}" for c in COLUMNS
                          for fmt in [c[3]] if isinstance(stderr[f"{c[1]}/{c[2]}"], float)) + "."]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"task-accuracy-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "checkpoint": str(checkpoint), "rows": rows},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


if __name__ == "__main__":
    main()
