"""neoedge's MatMulNBits kernels against stock onnxruntime: the op alone, then whole packages.

    python benchmarks/kernels.py                       # ops at the 125M and 1.3B shapes, every path
    python benchmarks/kernels.py --packages benchmarks/work/pkg125m-int4 benchmarks/work/pkg1.3b-int4
    python benchmarks/kernels.py --quick --no-ops --packages PKG

Ops: one-node graphs of com.microsoft.MatMulNBits (stock) and neoedge.kernels::MatMulNBits with
the same random weights (block 128; int4 symmetric and int8 with zero points, as neoedge exports
them), at the weight shapes of gpt-neo-125m and -1.3B (K x N) and M activation rows; every path this
CPU runs (forced with NEOEDGE_KERNELS_ISA). Each kernel's output is checked against stock before it
is timed. Reported: median ms per call over interleaved rounds, TOPS (2 M K N / t) and the weight
stream in GB/s (packed weight bytes / t, the figure that matters at M = 1).

Packages: the stock graph and the kernel graph (written beside it if missing) of each package, same
session settings as the runtime: first-token time for each prompt length (a prefill from an empty
cache, chunked as the runtime does), decode ms/token after a 128-token prompt, session creation.

Writes benchmarks/results/kernels-<date>.{json,md}. Timings taken while anything else runs on the
machine are not final: the script records /work/shared/tools/quiet-check's verdict (if present).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from package_driver import GqaDriver, PackageShape, session_options  # noqa: E402
from report import quiet_verdict, write_report  # noqa: E402

import neoedge.kernels as kernels  # noqa: E402

# (K, N) of each weight MatMul: qkv, out_proj, c_fc, c_proj, lm_head. The lm_head only ever sees the
# positions that need logits (one per sequence), so it is timed at small M only.
SHAPES = {
    "125M": [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)],
    "1.3B": [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048), (2048, 50257)],
}
LM_HEAD_MAX_ROWS = 16
ROWS = (1, 2, 4, 8, 16, 128, 1024)


def one_node(k: int, n: int, bits: int, domain: str, weights) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    packed, scales, zero_points = weights
    inputs = ["A", "B", "scales"] + (["zero_points"] if zero_points is not None else [])
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points.reshape(-1), "zero_points"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain=domain, K=k, N=n, bits=bits, block_size=128,
                            accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)],
                             ir_version=8).SerializeToString()


def op_session(model: bytes, threads: int, path: str | None) -> ort.InferenceSession:
    if path:
        os.environ[kernels.ISA_VARIABLE] = path
    options = session_options(threads, str(kernels.library_path()) if path else None)
    # Several op sessions alive and called in turn: with spinning pools, the idle sessions' threads
    # spun on both cores while the next one ran, and calls of 1-3 ms read 8-12 ms (a scheduler slice).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop(kernels.ISA_VARIABLE, None)


STATISTIC = {"median": statistics.median, "min": min}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
CLOCK = CLOCKS["wall"]


def time_calls(sessions: dict[str, ort.InferenceSession], a: np.ndarray, budget_s: float,
               statistic: str = "median") -> dict[str, float]:
    """ms per call of each session (median, or min on a busy machine), rounds interleaved so that
    drift hits all alike."""
    feeds = {"A": a}
    for s in sessions.values():
        s.run(None, feeds)
    start = time.perf_counter()
    for s in sessions.values():
        s.run(None, feeds)
    per_round = time.perf_counter() - start
    rounds = int(np.clip(budget_s / max(per_round, 1e-6), 5, 400))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t = CLOCK()
            s.run(None, feeds)
            times[name].append(CLOCK() - t)
    return {name: 1e3 * STATISTIC[statistic](v) for name, v in times.items()}


def bench_ops(shapes: list[tuple[int, int]], rows: list[int], bits_list: list[int], paths: list[str], threads: int,
              budget_s: float, statistic: str) -> list[dict]:
    from neoedge.export.blockwise import quantize_blockwise

    rng = np.random.default_rng(0)
    results = []
    for bits in bits_list:
        for k, n in shapes:
            q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32) * 0.02, bits, 128,
                                   symmetric=bits == 4)
            weights = (q.packed, q.scales, q.zero_points)
            weight_bytes = weights[0].nbytes + weights[1].nbytes + (0 if weights[2] is None else weights[2].nbytes)
            sessions = {"stock": op_session(one_node(k, n, bits, "com.microsoft", weights), threads, None)}
            model = one_node(k, n, bits, kernels.DOMAIN, weights)
            for path in paths:
                sessions[path] = op_session(model, threads, path)
            for m in rows:
                if n > 8 * k and m > LM_HEAD_MAX_ROWS:
                    continue
                a = rng.standard_normal((m, k)).astype(np.float32)
                stock = sessions["stock"].run(None, {"A": a})[0]
                for path in paths:
                    y = sessions[path].run(None, {"A": a})[0]
                    scale = float(np.abs(stock).max()) + 1e-30
                    if np.abs(y - stock).max() > 1e-4 * scale:
                        raise SystemExit(f"{path} disagrees with stock at M={m} K={k} N={n} bits={bits}")
                ms = time_calls(sessions, a, budget_s, statistic)
                row = {"bits": bits, "K": k, "N": n, "M": m, "weight_bytes": weight_bytes, "ms": ms}
                results.append(row)
                print(format_op_row(row, paths), flush=True)
    return results


def format_op_row(row: dict, paths: list[str]) -> str:
    m, k, n = row["M"], row["K"], row["N"]
    stock = row["ms"]["stock"]
    cells = [f"int{row['bits']}", f"{k}x{n}", str(m), f"{stock:.3f}"]
    for path in paths:
        t = row["ms"][path]
        cells.append(f"{t:.3f} ({stock / t:.2f}x; {2 * m * k * n / t / 1e9:.2f} TOPS; "
                     f"{row['weight_bytes'] / t / 1e6:.1f} GB/s)")
    return "| " + " | ".join(cells) + " |"


def bench_package(package: Path, prompts: list[int], decode_steps: int, runs: int, threads: int,
                  statistic: str) -> dict:
    from neoedge.export.kernel_graph import write_kernel_graph

    fast_graph = package / "model.kernels.onnx"
    if not fast_graph.exists():
        print(write_kernel_graph(package / "model.onnx", fast_graph).describe(), file=sys.stderr)
    shape = PackageShape.read(package)
    rng = np.random.default_rng(0)
    library = str(kernels.library_path())
    graphs = {"stock": ("model.onnx", None), "kernels": ("model.kernels.onnx", library)}
    drivers, created = {}, {}
    for name, (graph, lib) in graphs.items():
        start = time.perf_counter()
        session = ort.InferenceSession(str(package / graph), session_options(threads, lib),
                                       providers=["CPUExecutionProvider"])
        created[name] = time.perf_counter() - start
        drivers[name] = GqaDriver(session, shape, capacity=max(prompts) + decode_steps + 1)
    out = {"package": str(package), "isa": kernels.info().isa, "session_s": created, "first_token_ms": {},
           "decode_ms": {}}
    for prompt in prompts:
        ids = rng.integers(0, shape.vocab, prompt)
        times: dict[str, list[float]] = {name: [] for name in drivers}
        for name, driver in drivers.items():  # warm-up
            driver.reset()
            driver.prefill(ids)
        for _ in range(runs):
            for name, driver in drivers.items():
                driver.reset()
                t = time.perf_counter()
                driver.prefill(ids)
                times[name].append(time.perf_counter() - t)
        out["first_token_ms"][prompt] = {name: 1e3 * STATISTIC[statistic](v) for name, v in times.items()}
    ids = rng.integers(0, shape.vocab, 128)
    tokens = rng.integers(0, shape.vocab, decode_steps)
    steps: dict[str, list[float]] = {name: [] for name in drivers}
    for _ in range(runs):
        for name, driver in drivers.items():
            driver.reset()
            driver.prefill(ids)
            t = time.perf_counter()
            for token in tokens:
                driver.step(int(token))
            steps[name].append((time.perf_counter() - t) / decode_steps)
    out["decode_ms"] = {name: 1e3 * STATISTIC[statistic](v) for name, v in steps.items()}
    print(format_package(out), flush=True)
    return out


def format_package(r: dict) -> str:
    lines = [f"**{Path(r['package']).name}** (kernels: {r['isa']}; session creation stock "
             f"{r['session_s']['stock']:.2f} s, kernels {r['session_s']['kernels']:.2f} s)", "",
             "| | stock | kernels | speed-up |", "| --- | --- | --- | --- |"]
    for prompt, t in r["first_token_ms"].items():
        lines.append(f"| first token, {prompt}-token prompt (ms) | {t['stock']:.1f} | {t['kernels']:.1f} | "
                     f"{t['stock'] / t['kernels']:.2f}x |")
    d = r["decode_ms"]
    lines.append(f"| decode after 128 tokens (ms/token) | {d['stock']:.2f} | {d['kernels']:.2f} | "
                 f"{d['stock'] / d['kernels']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="125M,1.3B", help="which models' weight shapes (125M, 1.3B)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="activation rows M")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--paths", default="all", help="kernel paths, or 'all' this CPU runs")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per op case")
    parser.add_argument("--no-ops", action="store_true")
    parser.add_argument("--packages", nargs="*", type=Path, default=[])
    parser.add_argument("--prompts", default="128,1024")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--statistic", choices=sorted(STATISTIC), default="median",
                        help="median (a quiet machine) or min (the least disturbed run, on a busy one)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or (with --threads 1) the calling thread's CPU time: the op's own cost on a "
                             "machine so busy that a call is preempted (ops only; packages always use wall time)")
    parser.add_argument("--quick", action="store_true", help="fewer rows and runs: a smoke test, not numbers")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="appended to the results' file name")
    args = parser.parse_args()

    global CLOCK
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu measures the calling thread only: use it with --threads 1")
    CLOCK = CLOCKS[args.clock]
    info = kernels.info()
    if not info.available:
        raise SystemExit(f"the kernels are not available: {info.reason}")
    paths = list(kernels.runnable_paths()) if args.paths == "all" \
        else args.paths.split(",")
    rows = [int(r) for r in args.rows.split(",")]
    if args.quick:
        rows, args.runs, args.budget, args.decode_steps = [1, 16, 128], 2, 0.2, 16
    verdict_before = quiet_verdict()
    print(f"machine: {verdict_before}; paths: {', '.join(paths)}", file=sys.stderr)
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "onnxruntime": ort.__version__, "threads": args.threads, "paths": paths, "statistic": args.statistic,
              "clock": args.clock,
              "quiet_before": verdict_before, "ops": [], "packages": []}
    table = [f"# neoedge kernels vs stock MatMulNBits ({report['date']})", "",
             f"onnxruntime {ort.__version__}, {args.threads or 'default'} intra-op threads, kernels: "
             f"{', '.join(paths)}; {args.statistic} of interleaved runs, {args.clock} clock. Machine before the run: "
             f"{verdict_before}.", ""]
    if not args.no_ops:
        shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
        table += [f"## One MatMulNBits (block 128), {args.statistic} ms per call", "",
                  "| weights | K x N | M | stock | " + " | ".join(paths) + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in paths) + " |"]
        report["ops"] = bench_ops(shapes, rows, [int(b) for b in args.bits.split(",")], paths, args.threads,
                                  args.budget, args.statistic)
        table += [format_op_row(r, paths) for r in report["ops"]] + [""]
    if args.packages:
        table += ["## Whole packages: stock graph vs kernel graph", ""]
        for package in args.packages:
            r = bench_package(package, [int(p) for p in args.prompts.split(",")], args.decode_steps, args.runs,
                              args.threads, args.statistic)
            report["packages"].append(r)
            table.append(format_package(r))
    report["quiet_after"] = quiet_verdict()
    table.append(f"Machine after the run: {report['quiet_after']}.\n")
    write_report(args.out, f"kernels-{report['date']}" + (f"-{args.tag}" if args.tag else ""), report,
                 "\n".join(table))


if __name__ == "__main__":
    main()
