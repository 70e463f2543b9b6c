"""lm-eval log-likelihood throughput: neoedge's backend against lm-eval's own Hugging Face backend.

    python benchmarks/random_checkpoint.py 125M benchmarks/work/neo125m-ckpt
    neoedge export benchmarks/work/neo125m-ckpt benchmarks/work/neo125m-int4 --quantize int4
    python benchmarks/lm_eval_throughput.py --checkpoint benchmarks/work/neo125m-ckpt \\
        --package benchmarks/work/neo125m-int4

Same requests for both: lm-eval builds them from neoedge's offline tasks (text; each backend tokenizes
them itself), the first DOCS documents of each task, plus "endings": HellaSwag-shaped requests (a
context and four 12-word endings) built here from the same held-out text. Each measurement runs in a fresh process with
the same threads and batch size, the backends alternating round by round; what is timed is the
backend's own call (`lm.loglikelihood(...)` / `lm.loglikelihood_rolling(...)`: tokenization, forward
passes, log-softmax), after a short warm-up. Medians over the rounds, min-max beside them.
Writes benchmarks/results/lm-eval-throughput-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["stdlib_cloze", "endings", "stdlib_nextword", "stdlib_perplexity"]
WARMUP = 4


def endings_task(count: int) -> list:
    """HellaSwag-shaped requests built from the held-out text: a paragraph's first 24 words, then
    four 12-word endings (its own next 12 words, and 12 words from each of three other paragraphs).
    Unlike the cloze words, endings span many tokens, so no backend can score them from the
    context's logits alone."""
    import random

    from lm_eval.api.instance import Instance

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_eval_tasks import HELDOUT, paragraphs

    words = [p.split() for p in paragraphs(HELDOUT.read_text(encoding="utf-8"))]
    long = [w for w in words if len(w) >= 36]
    rng = random.Random(0)
    instances = []
    for doc_id, para in enumerate(long[:count]):
        context = " ".join(para[:24])
        others = rng.sample([w for w in long if w is not para], 3)
        endings = [" ".join(para[24:36])] + [" ".join(w[12:24]) for w in others]
        for ending in endings:
            instances.append(Instance("loglikelihood", {}, (context, " " + ending), len(instances),
                                      metadata=("endings", doc_id, 1)))
    return instances


def worker(args: argparse.Namespace) -> None:
    """One backend, one fresh process: time each task's requests, print JSON."""
    from lm_eval.tasks import get_task_dict

    from neoedge import lm_eval_backend as backend

    if args.worker == "hf":
        import torch
        from lm_eval.api.registry import get_model

        torch.set_num_threads(args.threads)
        lm = get_model("hf")(pretrained=str(args.checkpoint), dtype="float32", device="cpu",
                             batch_size=args.batch_size)
    else:
        lm = backend.NeoedgeLM(args.worker_package, threads=args.threads, batch_size=args.batch_size)
    tasks = get_task_dict([t for t in args.tasks if t != "endings"], backend.task_manager(include_defaults=False))
    out = {}
    for name in args.tasks:
        if name == "endings":
            instances = endings_task(args.docs)
        else:
            task = tasks[name]
            task.build_all_requests(limit=args.docs if name != "stdlib_perplexity" else args.documents)
            instances = task.instances
        method = getattr(lm, instances[0].request_type)
        method(instances[:WARMUP], disable_tqdm=True)
        start = time.perf_counter()
        responses = method(instances, disable_tqdm=True)
        seconds = time.perf_counter() - start
        values = [r[0] if isinstance(r, tuple) else r for r in responses]
        out[name] = {"requests": len(instances), "documents": len({i.doc_id for i in instances}),
                     "seconds": seconds, "requests_per_s": len(instances) / seconds,
                     "mean_loglikelihood": statistics.fmean(values)}
    print(json.dumps(out))


def run_worker(args: argparse.Namespace, which: str, package: Path | None) -> dict:
    command = [sys.executable, __file__, "--worker", which, "--checkpoint", str(args.checkpoint),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--docs", str(args.docs),
               "--documents", str(args.documents), "--tasks", ",".join(args.tasks)]
    if package is not None:
        command += ["--worker-package", str(package)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{which} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def quiet() -> str:
    check = Path("/work/shared/tools/quiet-check")
    if not check.exists():
        return "unknown"
    result = subprocess.run([str(check)], capture_output=True, text=True)
    return " / ".join(line.strip() for line in result.stdout.splitlines() if line.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="GPT-Neo checkpoint for --model hf.")
    parser.add_argument("--package", type=Path, action="append", default=[],
                        help="neoedge package(s) exported from it (repeatable; e.g. int4 and fp32).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--docs", type=int, default=100, help="Questions per multiple-choice / next-word task.")
    parser.add_argument("--documents", type=int, default=8, help="Documents of the rolling perplexity task.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=TASKS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-package", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.package:
        parser.error("give at least one --package")

    backends = [("hf", None)] + [(f"neoedge {p.name}", p) for p in args.package]
    runs: dict[str, list[dict]] = {name: [] for name, _ in backends}
    before = quiet()
    for round_ in range(args.rounds):
        order = backends if round_ % 2 == 0 else backends[::-1]
        for name, package in order:
            print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_worker(args, "hf" if package is None else "neoedge", package))
    after = quiet()

    summary: dict[str, dict[str, dict]] = {}
    for name, measured in runs.items():
        summary[name] = {}
        for task in args.tasks:
            rates = [m[task]["requests_per_s"] for m in measured]
            summary[name][task] = {"requests": measured[0][task]["requests"],
                                   "documents": measured[0][task]["documents"],
                                   "requests_per_s_median": statistics.median(rates),
                                   "requests_per_s": rates,
                                   "mean_loglikelihood": measured[0][task]["mean_loglikelihood"]}
    date = datetime.date.today().isoformat()
    info = {"date": date, "checkpoint": str(args.checkpoint), "packages": [str(p) for p in args.package],
            "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "quiet_before": before, "quiet_after": after}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lm-eval-throughput-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "results": summary, "runs": runs}, indent=2) + "\n")
    lines = [f"lm-eval log-likelihood throughput, {date}: checkpoint {args.checkpoint}; {args.threads} threads, "
             f"batch size {args.batch_size}; {args.rounds} rounds of fresh processes, medians [min-max]. "
             f"Machine before: {before}; after: {after}.", "",
             "| backend | " + " | ".join(f"{t} req/s" for t in args.tasks) + " |",
             "| --- | " + " | ".join("---" for _ in args.tasks) + " |"]
    hf = summary["hf"]
    for name in summary:
        cells = []
        for task in args.tasks:
            s = summary[name][task]
            ratio = s["requests_per_s_median"] / hf[task]["requests_per_s_median"]
            cells.append(f"{s['requests_per_s_median']:.2f} [{min(s['requests_per_s']):.2f}-"
                         f"{max(s['requests_per_s']):.2f}] ({ratio:.1f}× hf)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Requests per task: " + ", ".join(f"{t} {hf[t]['requests']} ({hf[t]['documents']} documents)"
                                                    for t in args.tasks)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
