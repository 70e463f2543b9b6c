"""This checkout's native kernels against an earlier commit's, or against themselves with a kernel
switch set, interleaved in one process.

    python benchmarks/kernels_paired.py PKG --baseline 1cc9475 --rounds 8 [--prompts 128,1024] [--tag T]
    python benchmarks/kernels_paired.py PKG --baseline-env NEOEDGE_KERNELS_TILED=0 --rounds 8

With --baseline-env the baseline is this checkout's library, its session created with that
environment variable set (the kernels read their switches when a session creates them).

The baseline commit's kernel library is built from `git archive` of that commit in a temporary
directory (its setup.py, the machine's compiler); this checkout's is the installed one. The package
is loaded twice, once on each library (the same runtime code, graph and weights), and each round
times on both, in alternating order: the first token of a random prompt of each length (a prefill
from an empty cache) and the median decode step of 16 new tokens after a 128-token prompt, with a
pause before each so that the other session's spinning threads have stopped. On a
shared VM whose speed drifts by tens of percent within a minute, only such pairs compare: the
report gives the median over rounds of each round's ratio, beside the medians themselves.

Writes benchmarks/results/kernels-paired-<date>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def build_baseline(commit: str, where: Path) -> Path:
    """The kernel library of `commit`, built in `where`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True,
                   capture_output=True)
    library = next((where / "neoedge" / "kernels").glob("libneoedge_kernels.*"), None)
    if library is None:
        raise SystemExit(f"the kernel library of {commit} did not build")
    return library


def load(package: str, library: Path | None, threads: int, env: dict[str, str] | None = None) -> Any:
    import os

    import neoedge.kernels as kernels
    from neoedge import Model, SessionSettings

    original = kernels.library_path
    saved = {name: os.environ.get(name) for name in env or {}}
    if library is not None:
        kernels.library_path = lambda: library  # type: ignore[assignment]
    os.environ.update(env or {})
    try:
        return Model(package, settings=SessionSettings(intra_threads=threads))
    finally:
        kernels.library_path = original  # type: ignore[assignment]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def measure(model: Any, prompts: list[list[int]], decode_prompt: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for ids in prompts:
        sequence = model.sequence(tokens=ids)
        start = time.perf_counter()
        sequence.process()
        out[f"first_token_{len(ids)}"] = (time.perf_counter() - start) * 1e3
    stamps = [time.perf_counter()]
    for event in model.sequence(tokens=decode_prompt).stream(max_new_tokens=16, stop_at_eos=False):
        if event.token is not None:
            stamps.append(time.perf_counter())
    out["decode_ms"] = float(np.median(np.diff(stamps)[2:]) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package")
    parser.add_argument("--baseline", help="commit whose kernel library is compared")
    parser.add_argument("--baseline-env", help="NAME=VALUE: the baseline is this library with that switch")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", default="128,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if (args.baseline is None) == (args.baseline_env is None):
        parser.error("give one of --baseline and --baseline-env")
    env = dict([args.baseline_env.split("=", 1)]) if args.baseline_env else None
    baseline_name = args.baseline or args.baseline_env
    sys.path.insert(0, str(HERE))
    from decode_floor import _quiet_check

    from neoedge.bench import machine_info

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    quiet = _quiet_check()
    with tempfile.TemporaryDirectory() as tmp:
        baseline_library = build_baseline(args.baseline, Path(tmp)) if args.baseline else None
        models = {"baseline": load(args.package, baseline_library, args.threads, env),
                  "this checkout": load(args.package, None, args.threads)}
        vocab = models["this checkout"].info.vocab_size
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, vocab, int(n)).tolist() for n in args.prompts.split(",")]
        decode_prompt = rng.integers(0, vocab, 128).tolist()
        for model in models.values():  # warm-up
            measure(model, prompts[:1], decode_prompt)
            time.sleep(0.2)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                # The other session's pool threads spin for a while after its runs: let them stop, or
                # they take the cores from this one (2 cores, 2 threads each).
                time.sleep(0.2)
                runs[name].append(measure(models[name], prompts, decode_prompt))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    metrics = list(runs["baseline"][0])
    summary = {m: {"baseline": statistics.median(x[m] for x in runs["baseline"]),
                   "this checkout": statistics.median(x[m] for x in runs["this checkout"]),
                   "ratio": statistics.median(b[m] / a[m] for a, b in zip(runs["baseline"], runs["this checkout"]))}
               for m in metrics}
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "quiet_check": quiet,
              "package": args.package, "baseline": baseline_name, "commit": commit, "rounds": args.rounds,
              "threads": args.threads, "summary": summary, "runs": runs,
              "kernels": models["this checkout"].kernels.describe()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-paired-{report['date']}{'-' + args.tag if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [f"# Kernels of {commit} against {baseline_name}, interleaved ({report['date']})", "",
             f"{m.get('cpu', m['machine'])}, {m['logical_cores']} cores, onnxruntime {m['onnxruntime']}; "
             f"{args.threads} threads; package `{Path(args.package).name}` ({report['kernels']}); "
             f"{args.rounds} rounds, order alternating. Machine before the run: {quiet}.", "",
             f"Command: `python benchmarks/kernels_paired.py {args.package} "
             f"{'--baseline ' + args.baseline if args.baseline else '--baseline-env ' + args.baseline_env} "
             f"--rounds {args.rounds} --prompts {args.prompts}`", "",
             "| measure | baseline (median) | this checkout (median) | this / baseline (median of rounds' ratios) |",
             "| --- | --- | --- | --- |"]
    names = {"decode_ms": "decode ms/token after a 128-token prompt"}
    for metric, s in summary.items():
        label = names.get(metric, f"first token ms, {metric.rsplit('_', 1)[1]}-token prompt")
        lines.append(f"| {label} | {s['baseline']:.2f} | {s['this checkout']:.2f} | {s['ratio']:.3f} |")
    text = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
