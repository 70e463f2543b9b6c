"""neoedge.kernels::Attention against onnxruntime's GroupQueryAttention, one node each, on the calls a
gpt-neo-125m layer makes (12 heads of 64, int8 per-channel cache updated in place), and prompt chunks of
a gpt-neo-1.3B layer (16 heads of 128).

    python benchmarks/attention_op.py [--runs 30] [--paths amx,avx512vnni]

Each of --paths (kernel paths this CPU runs; by default every one of amx and avx512vnni it has) is a
session of its own, created with NEOEDGE_KERNELS_ISA set to it: on a CPU with AMX-BF16, "amx" runs
prompt attention on tiles and "avx512vnni" the AVX-512 path, so one run compares the two.

Cases: a decode step at several context lengths (batch 1 and batch 8), a 32-token chat message over
a 600-token history, and 128-token prefill chunks (first, and over 896 positions; global and with
the 256-position local window). Both ops run the same one-node graphs the tests compare
(tests/test_kernel_attention.py), interleaved, each on its own cache bound in place as the runtime
binds it; medians of `runs` calls after warm-up. `--baseline-library PATH` adds a session on another
build of the kernel library (say, the last commit's), on the first of --paths, timed in the same
rotation: a paired before/after of a kernel change. Writes
benchmarks/results/attention-op-<date>[-tag].{json,md}.
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
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import neoedge.kernels as kernels  # noqa: E402
from test_kernel_attention import graphs, run_in_place, sessions  # noqa: E402

CAPACITY = 2048
SHAPES = {"125M": (12, 64), "1.3B": (16, 128)}
# (label, shape, batch, new tokens, past positions, local window)
CASES = [
    ("decode, context 128", "125M", 1, 1, 128, -1),
    ("decode, context 512", "125M", 1, 1, 512, -1),
    ("decode, context 1,024", "125M", 1, 1, 1024, -1),
    ("decode, context 1,900", "125M", 1, 1, 1900, -1),
    ("decode, local window, context 1,900", "125M", 1, 1, 1900, 256),
    ("decode, batch 8, context 256", "125M", 8, 1, 256, -1),
    ("chat message: 32 tokens over 600", "125M", 1, 32, 600, -1),
    ("prefill chunk: 128 tokens, first", "125M", 1, 128, 0, -1),
    ("prefill chunk: 128 tokens over 896", "125M", 1, 128, 896, -1),
    ("prefill chunk: 128 tokens over 896, local window", "125M", 1, 128, 896, 256),
    ("1.3B prefill chunk: 128 tokens, first", "1.3B", 1, 128, 0, -1),
    ("1.3B prefill chunk: 128 tokens over 896", "1.3B", 1, 128, 896, -1),
    ("1.3B prefill chunk: 128 tokens over 1,872", "1.3B", 1, 128, 1872, -1),
]


def time_case(shape: str, batch: int, new: int, past: int, window: int, runs: int, seed: int,
              paths: list[str], baseline: Path | None = None) -> dict[str, float]:
    heads, head_size = SHAPES[shape]
    named = {}
    for path in paths:
        os.environ[kernels.ISA_VARIABLE] = path
        stock, named[path] = sessions(heads, head_size, CAPACITY, window, seed)
    if baseline is not None:
        os.environ[kernels.ISA_VARIABLE] = paths[0]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.register_custom_ops_library(str(baseline.resolve()))
        model = graphs(heads, head_size, CAPACITY, window, seed)[1]
        named["baseline"] = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
    os.environ.pop(kernels.ISA_VARIABLE, None)
    named = {"stock": stock, **named}
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((batch, new, 3 * heads * head_size)).astype(np.float32)
    caches = {name: [rng.integers(-100, 100, (batch, heads, CAPACITY, head_size), dtype=np.int8) for _ in range(2)]
              for name in named}
    seqlens = np.full(batch, past + new - 1, np.int32)
    total = new if past == 0 else past + new
    times: dict[str, list[float]] = {name: [] for name in named}
    order = list(named.items())
    for run in range(runs + 3):
        for name, session in order if run % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run_in_place(session, qkv, *caches[name], seqlens, total)
            if run >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--paths", type=lambda s: s.split(","),
                        default=[p for p in ("amx", "avx512vnni") if p in kernels.runnable_paths()])
    parser.add_argument("--baseline-library", type=Path, help="another build of the kernel library to time beside")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not args.paths:
        raise SystemExit("no kernel path to time: the native library is not built, or this CPU runs neither path")
    tool = Path("/work/shared/tools/quiet-check")
    machine = " ".join(subprocess.run([str(tool)], capture_output=True, text=True).stdout.split()) \
        if tool.exists() else "not checked"
    columns = args.paths + (["baseline"] if args.baseline_library else [])
    rows = []
    for i, (label, shape, batch, new, past, window) in enumerate(CASES):
        result = time_case(shape, batch, new, past, window, args.runs, i, args.paths, args.baseline_library)
        rows.append({"case": label, "shape": shape, "batch": batch, "new": new, "past": past, "window": window,
                     "ms": result, "speedup": {p: result["stock"] / result[p] for p in columns}})
        print(f"{label}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in result.items()), flush=True)
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"attention-op-{date}" + (f"-{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine_before": machine, "threads": 2,
                                                     "runs": args.runs, "paths": args.paths,
                                                     "baseline_library": str(args.baseline_library or ""),
                                                     "rows": rows},
                                                    indent=2) + "\n")
    lines = [f"# Attention, one node: onnxruntime GroupQueryAttention vs neoedge.kernels::Attention ({date})", "",
             f"125M: 12 heads of 64; 1.3B: 16 heads of 128; int8 per-channel cache of {CAPACITY} positions updated in "
             f"place, 2 threads, median of {args.runs} interleaved calls; neoedge on each path "
             f"({', '.join(args.paths)}: NEOEDGE_KERNELS_ISA)"
             + (f"; baseline: the library at {args.baseline_library}, on {args.paths[0]}" if args.baseline_library else "")
             + f". Machine before the run: {machine}.", "",
             "| call | stock ms | " + " | ".join(f"neoedge {p} ms (speed-up)" for p in columns)
             + (f" | {args.paths[0]} against baseline |" if args.baseline_library else " |"),
             "| --- | --- | " + " | ".join("---" for _ in columns) + (" | --- |" if args.baseline_library else " |")]
    lines += [f"| {r['case']} | {r['ms']['stock']:.3f} | " +
              " | ".join(f"{r['ms'][p]:.3f} ({r['speedup'][p]:.2f}×)" for p in columns)
              + (f" | {r['ms']['baseline'] / r['ms'][args.paths[0]]:.2f}× |" if args.baseline_library else " |")
              for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
