"""neoedge.kernels::Attention against onnxruntime's GroupQueryAttention, one node each, on the calls a
gpt-neo-125m layer makes (12 heads of 64, int8 per-channel cache updated in place).

    python benchmarks/attention_op.py [--threads 2] [--runs 30]

Cases: a decode step at several context lengths (batch 1 and batch 8), a 32-token chat message over
a 600-token history, and 128-token prefill chunks (first, and over 896 positions; global and with
the 256-position local window). Both ops run the same one-node graphs the tests compare
(tests/test_kernel_attention.py), interleaved, each on its own cache bound in place as the runtime
binds it; medians of `runs` calls after warm-up. Writes benchmarks/results/attention-op-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_kernel_attention import run_in_place, sessions  # noqa: E402

HEADS, HEAD_SIZE, CAPACITY = 12, 64, 2048
# (label, batch, new tokens, past positions, local window)
CASES = [
    ("decode, context 128", 1, 1, 128, -1),
    ("decode, context 512", 1, 1, 512, -1),
    ("decode, context 1,024", 1, 1, 1024, -1),
    ("decode, context 1,900", 1, 1, 1900, -1),
    ("decode, local window, context 1,900", 1, 1, 1900, 256),
    ("decode, batch 8, context 256", 8, 1, 256, -1),
    ("chat message: 32 tokens over 600", 1, 32, 600, -1),
    ("prefill chunk: 128 tokens, first", 1, 128, 0, -1),
    ("prefill chunk: 128 tokens over 896", 1, 128, 896, -1),
    ("prefill chunk: 128 tokens over 896, local window", 1, 128, 896, 256),
]


def time_case(batch: int, new: int, past: int, window: int, runs: int, seed: int) -> dict[str, float]:
    stock, ours = sessions(HEADS, HEAD_SIZE, CAPACITY, window, seed)
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((batch, new, 3 * HEADS * HEAD_SIZE)).astype(np.float32)
    caches = {name: [rng.integers(-100, 100, (batch, HEADS, CAPACITY, HEAD_SIZE), dtype=np.int8) for _ in range(2)]
              for name in ("stock", "ours")}
    seqlens = np.full(batch, past + new - 1, np.int32)
    total = new if past == 0 else past + new
    times: dict[str, list[float]] = {"stock": [], "ours": []}
    for run in range(runs + 3):
        for name, session in (("stock", stock), ("ours", ours)) if run % 2 == 0 else (("ours", ours), ("stock", stock)):
            start = time.perf_counter()
            run_in_place(session, qkv, *caches[name], seqlens, total)
            if run >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    tool = Path("/work/shared/tools/quiet-check")
    machine = " ".join(subprocess.run([str(tool)], capture_output=True, text=True).stdout.split()) \
        if tool.exists() else "not checked"
    rows = []
    for i, (label, batch, new, past, window) in enumerate(CASES):
        result = time_case(batch, new, past, window, args.runs, i)
        rows.append({"case": label, "batch": batch, "new": new, "past": past, "window": window, **result,
                     "speedup": result["stock"] / result["ours"]})
        print(f"{label}: stock {result['stock']:.3f} ms, neoedge {result['ours']:.3f} ms", flush=True)
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"attention-op-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine_before": machine, "threads": 2,
                                                     "runs": args.runs, "rows": rows}, indent=2) + "\n")
    lines = [f"# Attention, one node: onnxruntime GroupQueryAttention vs neoedge.kernels::Attention ({date})", "",
             f"12 heads of 64, int8 per-channel cache of {CAPACITY} positions updated in place, 2 threads, median of "
             f"{args.runs} interleaved calls. Machine before the run: {machine}.", "",
             "| call | stock ms | neoedge ms | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['stock']:.3f} | {r['ours']:.3f} | {r['speedup']:.2f}× |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
