"""First token and decode against the physical floor, neoedge's kernels against onnxruntime's stock ones.

    python benchmarks/decode_floor.py benchmarks/work/random125m-neoedge-int4 PKG2 ... \
        [--contexts 128,512,1024,2000] [--rounds 3] [--threads 2]

For every package and both kernel settings (`kernels="auto"`: neoedge's native kernels where this
CPU runs them faster; `"off"`: the stock graph on onnxruntime's MatMulNBits), in a fresh process per
round, in rotating order: for each context length C, a random prompt of C tokens (its prefill is the
first-token time), then `--steps` decode steps (median ms/token).

The floor of a decode step is the bytes it must read divided by the memory read bandwidth (2
threads, best of numpy streaming reads), read just before each fresh process: a run's ratio to the
floor uses the reading taken next to it, and the report gives the median of those ratios. On a
shared VM the readings move by 10-40% within minutes (one machine read 36-56 GB/s in one run), so
a floor from readings taken minutes away from the decode says more about the neighbours than about
the kernels. The strict ratio, at the highest reading of the whole run, is reported beside it. The
bytes are every weight the step multiplies
by (position and token tables only gathered from excluded; the tied table is read whole, as the
lm_head) plus the KV cache it attends over at C (global layers: C positions; local layers: the
window), in the cache's element type.

The floor of a first token is compute: the multiply-accumulates of the prompt's MatMulNBits
GEMMs (K x N per prompt position; the lm_head's for the last position only) at the int8 VNNI rate
this CPU sustains (neoedge.kernels' neoedge_vnni_peak: independent vpdpbusd chains on `--threads`
threads), read before each run as the bandwidth is. Attention, the elementwise ops and the
activations' quantization are not counted, so it is a lower bound; it is reported only where the
kernels' AVX-512 VNNI path runs.

Writes benchmarks/results/decode-floor-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def worker(package: str, kernels: str, contexts: list[int], steps: int, threads: int) -> dict[str, Any]:
    from neoedge import Model, SessionSettings
    from neoedge.bench import peak_rss_mb

    model = Model(package, settings=SessionSettings(intra_threads=threads, kernels=kernels))
    rng = np.random.default_rng(0)
    vocab = model.info.vocab_size

    def run(length: int, count: int) -> tuple[float, list[float]]:
        ids = rng.integers(0, vocab, size=length).tolist()
        stamps = [time.perf_counter()]
        for event in model.sequence(tokens=ids).stream(max_new_tokens=count, stop_at_eos=False):
            if event.token is not None:
                stamps.append(time.perf_counter())
        gaps = np.diff(stamps) * 1e3
        return float(gaps[0]), gaps[1:].tolist()

    run(32, 4)  # warm-up
    points = []
    for context in contexts:
        first, decode = run(context, steps)
        points.append({"context": context, "first_token_ms": first, "decode_ms": float(np.median(decode))})
    return {"kernels": model.kernels.describe(), "points": points, "peak_rss_mb": peak_rss_mb()}


@lru_cache(maxsize=None)
def stock_graph(package: Path) -> tuple[Any, Any]:
    """(manifest, stock graph without its weights) of a package, read once for every context."""
    import onnx

    from neoedge.manifest import Manifest

    manifest = Manifest.read(package)
    return manifest, onnx.load(str(package / manifest.graph.file), load_external_data=False)


def bytes_per_step(package: Path, context: int) -> tuple[float, float]:
    """(weight bytes, KV cache bytes) a decode step at `context` reads."""
    import onnx

    manifest, model = stock_graph(package)
    gather_only: dict[str, bool] = {}
    for node in model.graph.node:
        for name in node.input:
            gather_only[name] = gather_only.get(name, True) and node.op_type == "Gather" and node.input[0] == name
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1,
             onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4, onnx.TensorProto.FLOAT16: 2}
    weights = 0
    for tensor in model.graph.initializer:
        if not gather_only.get(tensor.name, False):
            weights += int(np.prod(tensor.dims)) * sizes.get(tensor.data_type, 4)
    info = manifest.model
    element = 1 if manifest.graph.kv_cache == "int8" else 4
    positions = sum(context if kind == "global" else min(context, info.window_size) for kind in info.attention_layers)
    cache = 2 * positions * info.hidden_size * element
    return float(weights), float(cache)


def prompt_gemm_macs(package: Path, tokens: int) -> float:
    """Multiply-accumulates of the MatMulNBits GEMMs of a `tokens`-token prompt (0 if it has none)."""
    from onnx import helper

    manifest, model = stock_graph(package)
    macs = 0.0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rows = 1 if attrs["N"] == manifest.model.vocab_size else tokens  # the lm_head sees the last position
        macs += float(attrs["K"]) * attrs["N"] * rows
    return macs


def vnni_peak(threads: int) -> float | None:
    """int8 multiply-accumulates per second this CPU sustains on `threads` threads (best of three
    0.3 s runs), or None where neoedge's AVX-512 VNNI kernels do not run."""
    import ctypes

    from neoedge.kernels import avx512_function

    function, _ = avx512_function("neoedge_vnni_peak", ctypes.c_double, [ctypes.c_int, ctypes.c_double])
    if function is None:
        return None
    best = max(function(threads, 0.3) for _ in range(3))
    return best if best > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="*", type=Path)
    parser.add_argument("--contexts", default="128,512,1024,2000")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed at each context")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], contexts, args.steps, args.threads)))
        return
    from suite import memory_read_bandwidth

    from neoedge.bench import machine_info

    quiet = _quiet_check()
    bandwidth: list[float] = []
    peaks: list[float | None] = []
    configs = [(str(p), k) for p in args.packages for k in ("off", "auto")]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for package, kernels in configs[r % len(configs):] + configs[: r % len(configs)]:
            bandwidth.append(memory_read_bandwidth(args.threads))
            peaks.append(vnni_peak(args.threads))
            out = subprocess.run([sys.executable, __file__, "--worker", package, kernels, "--contexts", args.contexts,
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            runs[(package, kernels)].append(json.loads(out.stdout.strip().splitlines()[-1]) |
                                            {"bandwidth_gb_s": bandwidth[-1], "vnni_mac_s": peaks[-1]})
            print(f"round {r + 1}: {Path(package).name} kernels={kernels} done", file=sys.stderr)
    report = summarize(runs, contexts, bandwidth, peaks)
    report.update({"date": datetime.date.today().isoformat(), "machine": machine_info(), "quiet_check": quiet,
                   "threads": args.threads, "rounds": args.rounds, "steps": args.steps})
    write(report, args.out, args.tag)


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]], contexts: list[int],
              bandwidth: list[float], peaks: list[float | None]) -> dict[str, Any]:
    gb_s = max(bandwidth)
    measured_peaks = [p for p in peaks if p]
    peak = max(measured_peaks) if measured_peaks else None
    rows = []
    for (package, kernels), results in runs.items():
        points = []
        for i, context in enumerate(contexts):
            weights, cache = bytes_per_step(Path(package), context)
            floor_ms = (weights + cache) / (gb_s * 1e9) * 1e3
            decode = float(np.median([r["points"][i]["decode_ms"] for r in results]))
            first = float(np.median([r["points"][i]["first_token_ms"] for r in results]))
            # Each run against the floor at the bandwidth read just before it.
            ratios = [r["points"][i]["decode_ms"] * r["bandwidth_gb_s"] * 1e6 / (weights + cache) for r in results]
            macs = prompt_gemm_macs(Path(package), context)
            compute_ms = macs / peak * 1e3 if peak and macs else None
            # Each run's first token against the compute floor at the VNNI rate read just before it.
            compute_ratios = [r["points"][i]["first_token_ms"] * r["vnni_mac_s"] / 1e3 / macs
                              for r in results if r.get("vnni_mac_s") and macs]
            points.append({"context": context, "decode_ms": decode, "first_token_ms": first, "floor_ms": floor_ms,
                           "prompt_gemm_gmacs": macs / 1e9, "compute_floor_ms": compute_ms,
                           "over_compute_floor": float(np.median(compute_ratios)) if compute_ratios else None,
                           "over_strict_compute_floor": first / compute_ms if compute_ms else None,
                           "over_floor": float(np.median(ratios)), "over_floor_runs": ratios,
                           "over_strict_floor": decode / floor_ms, "weights_mb": weights / 1e6,
                           "cache_mb": cache / 1e6})
        rows.append({"package": package, "kernels_setting": kernels, "kernels": results[0]["kernels"],
                     "points": points, "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in results])),
                     "runs": results})
    return {"bandwidth_gb_s": bandwidth, "vnni_mac_s": peaks, "contexts": contexts, "rows": rows}


def write(report: dict[str, Any], out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-floor-{report['date']}{'-' + tag if tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# First token and decode against the floor ({report['date']})", "",
             f"{m.get('cpu', m['machine'])}, {m['logical_cores']} cores ({' '.join(m.get('flags', []))}), onnxruntime "
             f"{m['onnxruntime']}; {report['threads']} threads; memory read bandwidth "
             f"{' / '.join(f'{b:.1f}' for b in report['bandwidth_gb_s'])} GB/s, read before each run "
             f"(each run is compared with the floor at its own reading; the strict floor uses the highest); "
             f"{report['rounds']} rounds of fresh processes, medians; random-weight packages. "
             f"Machine before the run: {report['quiet_check']}.", "",
             "Command: `python benchmarks/decode_floor.py " + " ".join(
                 dict.fromkeys(r["package"] for r in report["rows"])) + f" --contexts "
             f"{','.join(map(str, report['contexts']))} --rounds {report['rounds']}`", ""]
    contexts = report["contexts"]
    lines += ["Decode ms/token (× the floor at each run's bandwidth, median over runs; × the strict floor):", "",
              "| package | kernels | " + " | ".join(str(c) for c in contexts) + " |",
              "| --- | --- | " + " | ".join("---" for _ in contexts) + " |"]
    for row in report["rows"]:
        lines.append(f"| {Path(row['package']).name} | {row['kernels']} | " + " | ".join(
            f"{p['decode_ms']:.2f} ({p['over_floor']:.2f}×; {p['over_strict_floor']:.2f}×)"
            for p in row["points"]) + " |")
    lines += ["", "Strict floor ms (weights + KV cache read per step / the highest bandwidth reading):", "",
              "| package | " + " | ".join(str(c) for c in contexts) + " |",
              "| --- | " + " | ".join("---" for _ in contexts) + " |"]
    for row in report["rows"]:
        if row["kernels_setting"] == "off":
            lines.append(f"| {Path(row['package']).name} | " + " | ".join(f"{p['floor_ms']:.2f}" for p in row["points"]) + " |")
    peaks = [p for p in report.get("vnni_mac_s", []) if p]
    lines += ["", "First token ms (prefill of a prompt of that many tokens"
              + ("; × the compute floor at each run's VNNI reading, median over runs; × the strict compute floor"
                 if peaks else "") + "):", "",
              "| package | kernels | " + " | ".join(str(c) for c in contexts) + " |",
              "| --- | --- | " + " | ".join("---" for _ in contexts) + " |"]

    def first_token(p: dict[str, Any]) -> str:
        if p.get("over_compute_floor") is None:
            return f"{p['first_token_ms']:.0f}"
        return f"{p['first_token_ms']:.0f} ({p['over_compute_floor']:.2f}×; {p['over_strict_compute_floor']:.2f}×)"

    for row in report["rows"]:
        lines.append(f"| {Path(row['package']).name} | {row['kernels']} | " + " | ".join(
            first_token(p) for p in row["points"]) + " |")
    if peaks:
        lines += ["", "Compute floor ms of the first token (the prompt's MatMulNBits multiply-accumulates at the "
                  "highest VNNI reading, " + " / ".join(f"{p / 1e9:.0f}" for p in peaks) + " GMAC/s read before "
                  "each run; attention and elementwise ops not counted):", "",
                  "| package | " + " | ".join(str(c) for c in contexts) + " |",
                  "| --- | " + " | ".join("---" for _ in contexts) + " |"]
        for row in report["rows"]:
            if row["kernels_setting"] == "off" and row["points"][0].get("compute_floor_ms"):
                lines.append(f"| {Path(row['package']).name} | " + " | ".join(
                    f"{p['compute_floor_ms']:.0f}" for p in row["points"]) + " |")
    return "\n".join(lines) + "\n"


def _quiet_check() -> str:
    tool = Path("/work/shared/tools/quiet-check")
    if not tool.exists():
        return "not checked"
    result = subprocess.run([str(tool)], capture_output=True, text=True)
    return " ".join((result.stdout + result.stderr).split()) or f"exit {result.returncode}"


if __name__ == "__main__":
    main()
