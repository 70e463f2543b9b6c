"""How far the kernel graph's logits are from the stock graph's, on whole packages.

    python benchmarks/kernel_parity.py benchmarks/work/pkg125m-int4 [more packages]

For each package: a 300-token prompt (three chunks, all logits) and 16 decode steps through the
stock graph, the kernel graph on every path this CPU runs, and, as the yardstick, the stock graph
with fp32 activations (accuracy_level 1 instead of 4: the size of the int8-activation quantization
itself). Both graphs quantize activations identically; they differ in the order of fp32 additions,
and through the int8 KV cache and later activation quantizations such a last-bit difference can
come back as one int8 step. Reports max and mean |Δlogit|, the first position's (before any cache
re-rounding), and top-1 agreement. Writes benchmarks/results/kernel-parity-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from package_driver import GqaDriver, PackageShape, session_options  # noqa: E402
from report import write_report  # noqa: E402

import neoedge.kernels as kernels  # noqa: E402


def logits(package: Path, graph: Path, library: str | None, path: str | None) -> np.ndarray:
    if path:
        os.environ[kernels.ISA_VARIABLE] = path
    try:
        session = ort.InferenceSession(str(graph), session_options(2, library), providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop(kernels.ISA_VARIABLE, None)
    shape = PackageShape.read(package)
    rng = np.random.default_rng(0)
    driver = GqaDriver(session, shape, capacity=400)
    prompt = driver.prefill(rng.integers(0, shape.vocab, 300), all_logits=True).copy()
    steps = [driver.step(int(t)).copy() for t in rng.integers(0, shape.vocab, 16)]
    return np.concatenate([prompt, np.stack(steps)])


def level1_graph(package: Path) -> Path:
    """The stock graph with accuracy_level 1 (fp32 activations), beside the weights it reads."""
    import onnx

    model = onnx.load(str(package / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 1
    out = package / f".parity-level1-{os.getpid()}.onnx"
    onnx.save(model, str(out))
    return out


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a - b)
    return {"max": float(d.max()), "mean": float(d.mean()), "first_position_max": float(d[0].max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from neoedge.export.kernel_graph import write_kernel_graph

    info = kernels.info()
    if not info.available:
        raise SystemExit(f"the kernels are not available: {info.reason}")
    paths = list(kernels.runnable_paths())
    rows, report = [], {"date": datetime.date.today().isoformat(), "packages": {}}
    for package in args.packages:
        fast = package / "model.kernels.onnx"
        if not fast.exists():
            write_kernel_graph(package / "model.onnx", fast)
        stock = logits(package, package / "model.onnx", None, None)
        per_path = {path: logits(package, fast, info.library, path) for path in paths}
        results = {path: compare(stock, per_path[path]) for path in paths}
        if len(paths) > 1:
            # Two kernel paths compute the same integer products and differ only in fp32 order.
            results[f"{paths[0]} vs {paths[-1]} (not vs stock)"] = compare(per_path[paths[-1]], per_path[paths[0]])
        level1 = level1_graph(package)
        try:
            results["stock, fp32 activations (yardstick)"] = compare(stock, logits(package, level1, None, None))
        finally:
            level1.unlink()
        report["packages"][str(package)] = {"positions": int(stock.shape[0]), "logit_range": float(np.ptp(stock)),
                                            "against_stock": results}
        for name, r in results.items():
            rows.append(f"| {package.name} | {name} | {r['max']:.2e} | {r['mean']:.2e} | {r['first_position_max']:.2e} | "
                        f"{100 * r['top1_agreement']:.1f}% |")
    table = "\n".join([
        f"# Kernel graph vs stock graph: logits ({report['date']})", "",
        "300-token prompt (three chunks) + 16 decode steps, random token ids, against the stock graph's logits. "
        "'A vs B' compares two kernel paths (same integer products, another fp32 summation order). "
        "The last row per package is the int8 activation quantization's own size (stock graph, accuracy_level 1).", "",
        "| package | graph | max \\|Δlogit\\| | mean \\|Δlogit\\| | first position max | top-1 agreement |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])
    write_report(args.out, f"kernel-parity-{report['date']}", report, table)


if __name__ == "__main__":
    main()
