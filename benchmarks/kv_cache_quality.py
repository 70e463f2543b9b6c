"""What an int4 KV cache would cost in quality and gain in bytes, against neoedge's int8 cache.

    python benchmarks/kv_cache_quality.py [--fixture wide] [--divisors 7,8,10]

The fixture's default int4 package (quality.py's, exported if missing) has an int8 cache whose
scales are max|x| / 127 per (head, channel), from the calibration pass. From it, variants are
written that use onnxruntime's int4 cache instead (GroupQueryAttention `kv_cache_bit_width` 4:
uint8 arrays with two channels per byte, low nibble first, each value + 8), with scales
max|x| / d for each divisor d (7: no clipping; larger: the largest values clip, the rest get finer
steps). Every package, the fp32 reference too, runs its stock graph through package_driver, since
neoedge's runtime loads no int4 cache, and is scored by neoedge.evaluate.score on the fixture's
held-out text (windows 256, stride 128): perplexity, top-1 agreement and mean KL(fp32 || package),
as `neoedge eval` computes them.

The second table is what the cache is of the bytes a decode step reads (the floor) at gpt-neo's
shapes: int4 weights (block 128, fp32 scales, tied lm_head) plus the cache at each context, the
local layers holding their window only.

Writes benchmarks/results/kv-cache-quality-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from neoedge.evaluate import score
from neoedge.export.tiny import HELDOUT_FILE
from neoedge.tokenizer import Tokenizer
from exports import cached_export
from package_driver import GqaDriver, PackageShape, session_options
from report import write_report
from train_tiny_model import fixture_checkpoint

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
INT4_DEFAULT = "int4__default__block_128__symmetric__gptq"  # quality.py's directory name

# gpt-neo shapes: (layers, hidden, vocab, window); half the layers are local.
SHAPES = {"gpt-neo-125m": (12, 768, 50257, 256), "gpt-neo-1.3B": (24, 2048, 50257, 256),
          "gpt-neo-2.7B": (32, 2560, 50257, 256)}


def int4_cache_variant(source: Path, destination: Path, divisor: float) -> Path:
    """`source` (an int8-cache package) with an int4 cache scaled max|x| / divisor, stock graph only."""
    if (destination / "model.onnx").exists():
        return destination
    destination.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source / "model.onnx"), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        for attribute in node.attribute:
            if attribute.name == "kv_cache_bit_width":
                attribute.i = 4
        for name in node.input[12:14]:  # k_scale, v_scale: max / 127 -> max / divisor
            scale = numpy_helper.to_array(initializers[name]) * np.float32(127.0 / divisor)
            initializers[name].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), name))
    for value in list(model.graph.input) + list(model.graph.output):
        tensor = value.type.tensor_type
        if tensor.elem_type == TensorProto.INT8:
            tensor.elem_type = TensorProto.UINT8
            tensor.shape.dim[3].dim_value //= 2
    # Small constants stay inside the graph: shape inference reads them at load.
    onnx.save(model, str(destination / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    (destination / "neoedge.json").write_bytes((source / "neoedge.json").read_bytes())
    return destination


def logits_fn(package: Path, cache: str, capacity: int):
    shape = PackageShape.read(package, cache)
    session = ort.InferenceSession(str(package / "model.onnx"), session_options(2), providers=["CPUExecutionProvider"])
    driver = GqaDriver(session, shape, capacity)

    def logits(ids: np.ndarray) -> np.ndarray:
        driver.reset()
        return driver.prefill(ids, all_logits=True)

    return logits


def floor_table(contexts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name, (layers, hidden, vocab, window) in SHAPES.items():
        params = layers * 12 * hidden * hidden + vocab * hidden  # the MatMul weights; lm_head tied
        weights = params * (0.5 + 4 / 128)
        for context in contexts:
            positions = layers // 2 * (context + min(context, window))
            cache = {bits: positions * 2 * hidden * bits / 8 for bits in (8, 4)}
            rows.append({"model": name, "context": context, "weights_mb": weights / 1e6,
                         "cache_int8_mb": cache[8] / 1e6, "cache_int4_mb": cache[4] / 1e6,
                         "floor_change": (weights + cache[4]) / (weights + cache[8]) - 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", default="wide")
    parser.add_argument("--divisors", default="7,8,10")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    checkpoint = fixture_checkpoint(args.fixture)
    fixture_dir = WORK / "quality" / args.fixture
    fp32_dir = cached_export(str(checkpoint), fixture_dir / "fp32", progress=False, quantize="none")
    int4_dir = cached_export(str(checkpoint), fixture_dir / INT4_DEFAULT, progress=False, quantize="int4")
    tokenizer = Tokenizer(fp32_dir / "tokenizer.json")
    bos = int(json.loads((fp32_dir / "neoedge.json").read_text())["model"]["bos_token_id"])
    text = (checkpoint / HELDOUT_FILE).read_text(encoding="utf-8")
    ids = np.concatenate([np.array([bos], np.int64), np.asarray(tokenizer.encode_long(text), np.int64)])
    reference = logits_fn(fp32_dir, "float32", args.window)
    packages = [("int8 (neoedge's)", int4_dir, "int8", None)]
    for divisor in (float(d) for d in args.divisors.split(",")):
        variant = int4_cache_variant(int4_dir, WORK / "kv-cache-quality" / f"{args.fixture}-int4-kv-d{divisor:g}", divisor)
        packages.append((f"int4, max / {divisor:g}", variant, "int4", divisor))
    rows = []
    for label, package, cache, divisor in packages:
        print(f"{label} ...", file=sys.stderr)
        report = score(logits_fn(package, cache, args.window), ids, window=args.window, stride=args.stride,
                       reference=reference)
        rows.append({"cache": label, "divisor": divisor, "perplexity": report.perplexity,
                     "reference_perplexity": report.reference_perplexity, "top1_agreement": report.top1_agreement,
                     "mean_kl": report.mean_kl})
    floors = floor_table([128, 1024, 2000])
    result = {"fixture": args.fixture, "weights": "int4 default (block 128, symmetric, gptq)", "window": args.window,
              "stride": args.stride, "tokens": int(len(ids) - 1), "onnxruntime": ort.__version__, "rows": rows,
              "floor": floors}
    lines = [f"# int4 against int8 KV cache: quality on the `{args.fixture}` fixture ({datetime.date.today()})", "",
             f"Weights: {result['weights']}; stock graphs through benchmarks/package_driver.py; held-out text, "
             f"{result['tokens']} tokens, windows {args.window}, stride {args.stride}; against the fp32 package "
             f"(perplexity {rows[0]['reference_perplexity']:.3f}). Command: `python benchmarks/kv_cache_quality.py "
             f"--fixture {args.fixture} --divisors {args.divisors}`.", "",
             "| KV cache | perplexity | top-1 agreement | mean KL (nats) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['cache']} | {r['perplexity']:.3f} | {100 * r['top1_agreement']:.2f}% | {r['mean_kl']:.5f} |"
              for r in rows]
    lines += ["", "What the cache is of a decode step's bytes (int4 weights, block 128; local layers hold 256 "
              "positions):", "", "| model | context | weights MB | int8 cache MB | int4 cache MB | floor with int4 |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {f['model']} | {f['context']} | {f['weights_mb']:.0f} | {f['cache_int8_mb']:.1f} | "
              f"{f['cache_int4_mb']:.1f} | {100 * f['floor_change']:+.1f}% |" for f in floors]
    write_report(args.out, f"kv-cache-quality-{datetime.date.today()}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
