"""Where prefill and decode time goes, per operator, with onnxruntime's own profiler.

    python benchmarks/profile_ops.py PACKAGE [--graph model.onnx] [--kernels] \
        [--prompt 128,1024] [--decode 32] [--runs 3]

For each prompt length: `runs` prefills (after one warm-up) from an empty cache, then `decode`
steps after a 128-token prompt. Reports milliseconds per prefill / per decode step by op type, and
MatMulNBits (or the neoedge kernel) split by weight shape K x N. `--kernels` registers the neoedge
kernel library (needed for a kernel graph). The profile's node times exclude the Python-side
feeding, so a prefill's sum is slightly below its wall time (also reported).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from package_driver import GqaDriver, PackageShape, session_options

MATMUL_OPS = ("MatMulNBits", "MatMulNBitsNeo")


def _events_by_run(profile: Path) -> list[list[dict]]:
    """Node events grouped by the model_run they belong to."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    grouped: list[list[dict]] = [[] for _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for i, (start, end) in enumerate(runs):
            if start <= e["ts"] <= end:
                grouped[i].append(e)
                break
    return grouped


def _summarise(runs: list[list[dict]], per: int) -> tuple[dict[str, float], dict[str, float]]:
    """(ms by op type, ms by MatMul weight shape) per `per` runs (one prefill = several chunk runs)."""
    by_op: dict[str, float] = defaultdict(float)
    by_shape: dict[str, float] = defaultdict(float)
    for run in runs:
        for e in run:
            op = e["args"].get("op_name", "?")
            by_op[op] += e["dur"] / 1e3
            if op in MATMUL_OPS:
                # "/layers.3/mlp/c_fc/MatMulNBits_kernel_time" -> "mlp/c_fc", with M and N
                name = e["name"].rsplit("/", 1)[0]
                role = name.split("/", 2)[-1] if name.startswith("/layers.") else name.lstrip("/")
                shapes = e["args"].get("input_type_shape", [])
                a = list(shapes[0].values())[0] if shapes else []
                b = list(shapes[1].values())[0] if len(shapes) > 1 else []
                m = int(np.prod(a[:-1])) if a else "?"
                by_shape[f"{role} M={m} N={b[0] if b else '?'}"] += e["dur"] / 1e3
    scale = per
    return ({k: v / scale for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            {k: v / scale for k, v in sorted(by_shape.items(), key=lambda kv: -kv[1])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--graph", default="model.onnx")
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--prompt", default="128,1024")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    library = None
    if args.kernels:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from neoedge.kernels import library_path
        library = str(library_path())
    shape = PackageShape.read(args.package)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for prompt in [int(p) for p in args.prompt.split(",")]:
            prefix = os.path.join(tmp, f"p{prompt}")
            session = ort.InferenceSession(str(args.package / args.graph),
                                           session_options(args.threads, library, prefix),
                                           providers=["CPUExecutionProvider"])
            driver = GqaDriver(session, shape, capacity=max(prompt, 128) + args.decode + 1)
            ids = rng.integers(0, shape.vocab, prompt)
            chunks = -(-prompt // driver.chunk)
            driver.prefill(ids)  # warm-up
            walls = []
            for _ in range(args.runs):
                driver.reset()
                start = time.perf_counter()
                driver.prefill(ids)
                walls.append((time.perf_counter() - start) * 1e3)
            steps = 0
            if args.decode and prompt == min(int(p) for p in args.prompt.split(",")):
                for _ in range(args.decode):
                    driver.step(int(rng.integers(0, shape.vocab)))
                steps = args.decode
            profile = Path(session.end_profiling())
            runs = _events_by_run(profile)[chunks:]  # drop the warm-up prefill
            prefill_runs = runs[: args.runs * chunks]
            by_op, by_shape = _summarise(prefill_runs, args.runs)
            print(f"\n## prefill {prompt} tokens ({chunks} chunk(s)): wall median {np.median(walls):.1f} ms, "
                  f"node sum {sum(by_op.values()):.1f} ms")
            for op, ms in by_op.items():
                if ms >= 0.05:
                    print(f"  {op:32s} {ms:9.2f} ms  {100 * ms / sum(by_op.values()):5.1f}%")
            print("  by weight shape:")
            for s, ms in by_shape.items():
                print(f"    {s:28s} {ms:9.2f} ms")
            if steps:
                decode_runs = runs[args.runs * chunks:][-steps:]
                by_op, by_shape = _summarise(decode_runs, steps)
                print(f"\n## decode after {prompt} tokens: per step node sum {sum(by_op.values()):.3f} ms")
                for op, ms in by_op.items():
                    if ms >= 0.005:
                        print(f"  {op:32s} {ms:9.3f} ms  {100 * ms / sum(by_op.values()):5.1f}%")
                print("  by weight shape:")
                for s, ms in by_shape.items():
                    print(f"    {s:28s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
