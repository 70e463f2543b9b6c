"""One batched decode step, by batch size: stock onnxruntime, neoedge's kernels without and with the
batched GEMV, in one process and interleaved.

    python benchmarks/batch_decode.py benchmarks/work/random125m-neoedge-int4 --batches 1,2,4,8,16

For each batch size B, each configuration gets a pool of B rows (the engine's `GqaPool`), B random
128-token prompts prefilled, then `--steps` timed decode steps after a warm-up; rounds alternate the
configurations' order. Reported: the median step in ms, ms per token (step / B) and tokens/s over
batch 1's of the same configuration. With `--profile B` the step is also broken down by operator
(onnxruntime's profiler) for that batch size. The configurations: `stock` (kernels="off"),
`gemv` (neoedge's kernels, NEOEDGE_KERNELS_BATCHED=0 and _TILED=0: the one-row GEMV in passes of up
to 4 rows), `untiled` (NEOEDGE_KERNELS_TILED=0: the batched GEMV transposing 16 weight rows per
block) and `batched` (as shipped: tiled weights where the package allows them).

Writes benchmarks/results/batch-decode-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from neoedge import Model  # noqa: E402
from neoedge.batch import make_pool  # noqa: E402
from neoedge.session import SessionSettings  # noqa: E402

CONFIGS = ("stock", "gemv", "untiled", "batched")


def load(package: Path, config: str, threads: int, profile: bool) -> Model:
    # The kernel library reads NEOEDGE_KERNELS_BATCHED and _TILED when a session creates its kernels.
    os.environ["NEOEDGE_KERNELS_BATCHED"] = "0" if config == "gemv" else "1"
    os.environ["NEOEDGE_KERNELS_TILED"] = "1" if config == "batched" else "0"
    settings = SessionSettings(intra_threads=threads, kernels="off" if config == "stock" else "auto")
    if not profile:
        return Model(package, settings=settings)
    import onnxruntime as ort

    original = ort.SessionOptions
    (HERE / "work").mkdir(exist_ok=True)

    class Profiled(original):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(HERE / "work" / f"batch-decode-{config}")

    ort.SessionOptions = Profiled
    try:
        return Model(package, settings=settings)
    finally:
        ort.SessionOptions = original


def step_times(model: Model, batch: int, steps: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    vocab = model.info.vocab_size
    pool = make_pool(model.runner, batch, 128 + steps + 16)
    for _ in range(batch):
        pool.prefill(pool.add(), rng.integers(0, vocab, 128))
    tokens = rng.integers(0, vocab, batch)
    advance = np.ones(batch, bool)
    for _ in range(4):
        pool.decode(tokens, advance)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pool.decode(tokens, advance)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_by_op(model: Model, batch: int, steps: int) -> dict[str, float]:
    step_times(model, batch, steps, 7)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-steps:]
    start = runs[0][0]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / steps
    by_op["(model_run)"] = statistics.median(b - a for a, b in runs) / 1e3
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def quiet() -> str:
    tool = Path("/work/shared/tools/quiet-check")
    if not tool.exists():
        return "not checked"
    result = subprocess.run([str(tool)], capture_output=True, text=True)
    return " ".join(result.stdout.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="also profile this batch size by operator")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    machine = quiet()
    print(f"machine: {machine}", flush=True)
    models = {c: load(args.package, c, args.threads, False) for c in CONFIGS}
    kernels = {c: models[c].kernels.isa for c in CONFIGS}
    steps: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
        for batch in batches:
            for config in order:
                # The previous configuration's pool threads spin for a while after its steps: let
                # them stop, or they take the cores from this one (2 cores, 2 threads each).
                time.sleep(0.2)
                times = step_times(models[config], batch, args.steps, 1000 * r + batch)
                steps[config][batch].append(statistics.median(times))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for config in CONFIGS:
        one = statistics.median(steps[config][1]) if 1 in batches else None
        for batch in batches:
            ms = statistics.median(steps[config][batch])
            rows.append({"config": config, "batch": batch, "step_ms": ms, "ms_per_token": ms / batch,
                         "rounds_ms": steps[config][batch],
                         "tokens_per_s_over_batch_1": (batch / ms) / (1 / one) if one else None})
    profiles = {}
    if args.profile:
        del models
        for config in CONFIGS:
            profiles[config] = profile_by_op(load(args.package, config, args.threads, True), args.profile, args.steps)
    date = datetime.date.today().isoformat()
    report = {"date": date, "package": str(args.package), "threads": args.threads, "steps": args.steps,
              "rounds": args.rounds, "machine_before": machine, "kernels": kernels, "rows": rows,
              "profile_batch": args.profile or None, "profiles": profiles}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"batch-decode-{date}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# One batched decode step by batch size ({date})", "",
             f"Package `{args.package.name}`, {args.threads} threads, 128-token prompts, median of {args.rounds} "
             f"interleaved rounds of {args.steps} steps each. Kernels: {kernels}. Machine before the run: {machine}.",
             "", "| batch | " + " | ".join(f"{c} step ms (ms/token, x batch 1)" for c in CONFIGS) + " |",
             "| --- | " + " | ".join("---" for _ in CONFIGS) + " |"]
    for batch in batches:
        cells = []
        for config in CONFIGS:
            row = next(r for r in rows if r["config"] == config and r["batch"] == batch)
            ratio = row["tokens_per_s_over_batch_1"]
            cells.append(f"{row['step_ms']:.2f} ({row['ms_per_token']:.2f}; {ratio:.2f}x)" if ratio
                         else f"{row['step_ms']:.2f} ({row['ms_per_token']:.2f})")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    if profiles:
        ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -profiles["batched"].get(op, 0))
        lines += ["", f"Batch {args.profile}, ms per step by operator (onnxruntime's profiler, which adds its own "
                  "overhead):", "", "| op | " + " | ".join(CONFIGS) + " |", "| --- | " + " | ".join("---" for _ in CONFIGS) + " |"]
        for op in ops[:10]:
            lines.append(f"| {op} | " + " | ".join(f"{profiles[c].get(op, 0):.2f}" for c in CONFIGS) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
