"""What one decode step's attention costs, alone: onnxruntime's GroupQueryAttention by context length.

    python benchmarks/attention_kernel.py [--contexts 128,512,1024,1900] [--threads 2]

A graph of six GroupQueryAttention nodes shaped like gpt-neo-125m's global layers (12 heads of 64,
a preallocated 2048-position cache shared by past and present, one new token, scale 1.0), with an
fp32 and with an int8 (per-channel scales) cache. Reported per layer, median of repeated runs: this
is the part of a decode step that grows with the context, so it bounds how flat the context sweep
in benchmarks/suite.py can be. Writes benchmarks/results/attention-kernel-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from report import write_report

HERE = Path(__file__).resolve().parent
HEADS, HEAD_SIZE, CAPACITY, LAYERS = 12, 64, 2048, 6


def build(cache: str):
    from onnx import TensorProto, helper, numpy_helper

    cache_type = TensorProto.FLOAT if cache == "float32" else TensorProto.INT8
    shape = [1, HEADS, CAPACITY, HEAD_SIZE]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, 3 * HEADS * HEAD_SIZE]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs, nodes, initializers = [], [], []
    for layer in range(LAYERS):
        past, present = [f"past_{kv}.{layer}" for kv in "kv"], [f"present_{kv}.{layer}" for kv in "kv"]
        inputs += [helper.make_tensor_value_info(n, cache_type, shape) for n in past]
        outputs += [helper.make_tensor_value_info(f"out.{layer}", TensorProto.FLOAT, [1, 1, HEADS * HEAD_SIZE])]
        outputs += [helper.make_tensor_value_info(n, cache_type, shape) for n in present]
        extra, attributes = [], {}
        if cache == "int8":
            scales = [f"scale_{kv}.{layer}" for kv in "kv"]
            initializers += [numpy_helper.from_array(np.full((HEADS, 1, HEAD_SIZE), 0.05, np.float32), n)
                             for n in scales]
            extra = ["", "", "", "", "", *scales]
            attributes = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", *past, "seqlens_k", "total", *extra],
            [f"out.{layer}", *present], domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS,
            scale=1.0, **attributes))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def time_per_layer(cache: str, context: int, threads: int, repeats: int = 9, calls: int = 30) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(build(cache).SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, 3 * HEADS * HEAD_SIZE)).astype(np.float32))
    binding.bind_cpu_input("seqlens_k", np.array([context - 1], np.int32))
    binding.bind_cpu_input("total", np.array(context, np.int32))
    buffers = []
    for layer in range(LAYERS):
        for kv in "kv":
            values = rng.standard_normal((1, HEADS, CAPACITY, HEAD_SIZE))
            buffer = (values.astype(np.float32) if cache == "float32"
                      else np.clip(values * 30, -127, 127).astype(np.int8))
            buffers.append(buffer)
            shared = ort.OrtValue.ortvalue_from_numpy(buffer)  # past and present share it: in place
            binding.bind_ortvalue_input(f"past_{kv}.{layer}", shared)
            binding.bind_ortvalue_output(f"present_{kv}.{layer}", shared)
        binding.bind_output(f"out.{layer}", "cpu")
    for _ in range(10):
        session.run_with_iobinding(binding)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        samples.append((time.perf_counter() - start) / calls / LAYERS * 1e6)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,1024,1900")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from neoedge.bench import machine_info

    contexts = [int(c) for c in args.contexts.split(",")]
    rows = {cache: {str(c): time_per_layer(cache, c, args.threads) for c in contexts} for cache in ("float32", "int8")}
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "threads": args.threads,
              "layers": LAYERS, "heads": HEADS, "head_size": HEAD_SIZE, "capacity": CAPACITY,
              "us_per_layer": rows}
    lines = [f"GroupQueryAttention alone, one new token, {HEADS} heads × {HEAD_SIZE}, cache capacity {CAPACITY}, "
             f"{args.threads} threads; µs per layer (median). Date {report['date']}.", "",
             "| cache | " + " | ".join(str(c) for c in contexts) + " | per extra position |",
             "| --- |" + " --- |" * (len(contexts) + 1)]
    for cache, values in rows.items():
        slope = (values[str(contexts[-1])] - values[str(contexts[0])]) / (contexts[-1] - contexts[0])
        lines.append(f"| {cache} | " + " | ".join(f"{values[str(c)]:.0f}" for c in contexts) + f" | {slope:.3f} |")
    write_report(args.out, f"attention-kernel-{report['date']}", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
