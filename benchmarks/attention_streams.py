"""Decode attention from memory: the same bytes of int8 cache as many short streams or a few long ones.

    python benchmarks/attention_streams.py [--calls 100] [--tag T]

A batch-8 decode step of the 125M reads 96 (row, head) pairs of ~192 cached positions a layer; a
batch-1 step at 1,536 positions reads 12 pairs of 1,536: the same bytes. Each case is a graph of
12 neoedge.kernels::Attention nodes (the 125M's layers, local window 256 on every other one), each
over its own int8 cache of capacity max(256, context + 8) bound in place, one new query per pair,
as the runtime runs them. Before each timed call a 64 MB array is read (clean lines, as a decode
step's weights evict the caches), so the caches come from memory; the `in cache` rows run one
layer with nothing evicted. Cases of equal bytes differ only in how many pairs carry them.
Reported: median ms per call and the cache bytes read / that time. Writes
benchmarks/results/attention-streams-<date>[-tag].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from neoedge import kernels  # noqa: E402
from report import quiet_verdict  # noqa: E402

HEAD_SIZE = 64
CASES = [  # (batch, heads, context, layers, evicted)
    (8, 12, 192, 12, True), (1, 96, 192, 12, True), (1, 48, 384, 12, True), (1, 24, 768, 12, True),
    (1, 12, 1536, 12, True), (8, 12, 64, 12, True), (1, 12, 512, 12, True),
    (1, 96, 192, 1, False), (1, 12, 1536, 1, False),
]


def graph(batch: int, heads: int, capacity: int, layers: int) -> bytes:
    rng = np.random.default_rng(0)
    hd = heads * HEAD_SIZE
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", 3 * hd]),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs, nodes, initializers = [], [], []
    shape = ["B", heads, capacity, HEAD_SIZE]
    for layer in range(layers):
        inputs += [helper.make_tensor_value_info(f"past_k{layer}", TensorProto.INT8, shape),
                   helper.make_tensor_value_info(f"past_v{layer}", TensorProto.INT8, shape)]
        outputs += [helper.make_tensor_value_info(f"out{layer}", TensorProto.FLOAT, ["B", "S", hd]),
                    helper.make_tensor_value_info(f"k{layer}", TensorProto.INT8, shape),
                    helper.make_tensor_value_info(f"v{layer}", TensorProto.INT8, shape)]
        for name in (f"k_scale{layer}", f"v_scale{layer}"):
            initializers.append(numpy_helper.from_array(
                rng.uniform(0.01, 0.05, (heads, 1, HEAD_SIZE)).astype(np.float32), name))
        nodes.append(helper.make_node(
            "Attention", ["qkv", f"past_k{layer}", f"past_v{layer}", "seqlens", "total", f"k_scale{layer}",
                          f"v_scale{layer}"], [f"out{layer}", f"k{layer}", f"v{layer}"], domain=kernels.DOMAIN,
            num_heads=heads, local_window_size=256 if layer % 2 else -1))
    model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)],
                              ir_version=8)
    return model.SerializeToString()


def time_case(batch: int, heads: int, context: int, layers: int, evicted: bool, calls: int, threads: int) -> dict:
    capacity = max(256, context + 8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(kernels.library_path()))
    session = ort.InferenceSession(graph(batch, heads, capacity, layers), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    caches = [rng.integers(-100, 100, (batch, heads, capacity, HEAD_SIZE), dtype=np.int8) for _ in range(2 * layers)]
    outs = [np.zeros((batch, 1, heads * HEAD_SIZE), np.float32) for _ in range(layers)]
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((batch, 1, 3 * heads * HEAD_SIZE)).astype(np.float32) * 0.5)
    binding.bind_cpu_input("seqlens", np.full(batch, context - 1, np.int32))
    binding.bind_cpu_input("total", np.array(context, np.int32))
    for layer in range(layers):
        for i, name in enumerate(("k", "v")):
            value = ort.OrtValue.ortvalue_from_numpy(caches[2 * layer + i])
            binding.bind_ortvalue_input(f"past_{name}{layer}", value)
            binding.bind_ortvalue_output(f"{name}{layer}", value)
        binding.bind_ortvalue_output(f"out{layer}", ort.OrtValue.ortvalue_from_numpy(outs[layer]))
    evict = np.ones(64 << 20, np.uint8).view(np.uint64)
    for _ in range(10):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(calls):
        if evicted:
            evict.sum()
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    ms = 1e3 * float(np.median(times))
    read = batch * heads * context * HEAD_SIZE * 2 * layers
    return {"batch": batch, "heads": heads, "context": context, "layers": layers, "evicted": evicted,
            "pairs_per_layer": batch * heads, "ms": ms, "cache_mb": read / 1e6, "gb_per_s": read / ms / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    before = quiet_verdict()
    rows = []
    for case in CASES:
        rows.append(time_case(*case, args.calls, args.threads))
        r = rows[-1]
        print(f"B={r['batch']} heads={r['heads']} context={r['context']} layers={r['layers']} "
              f"{'evicted' if r['evicted'] else 'in cache'}: {r['ms']:.3f} ms, {r['gb_per_s']:.1f} GB/s", flush=True)
        time.sleep(0.2)
    date = datetime.date.today().isoformat()
    stem = f"attention-streams-{date}" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"threads": args.threads, "calls": args.calls,
                                                       "machine_before": before, "cases": rows}, indent=1))
    command = "python benchmarks/attention_streams.py" + (f" --calls {args.calls}" if args.calls != 100 else "")
    lines = [f"# Decode attention from memory: short streams against long ones ({date})", "",
             f"{os.cpu_count()} logical cores, onnxruntime {ort.__version__}, {args.threads} threads; median of "
             f"{args.calls} calls. Machine before the run: {before}; after: {quiet_verdict()}.", "",
             f"Command: `{command}`", "",
             "| batch x heads (pairs a layer) | context | layers | cache | ms a call | cache MB | GB/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['heads']} ({r['pairs_per_layer']}) | {r['context']} | {r['layers']} | "
                     f"{'from memory' if r['evicted'] else 'in cache'} | {r['ms']:.3f} | {r['cache_mb']:.1f} | "
                     f"{r['gb_per_s']:.1f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.md")


if __name__ == "__main__":
    main()
