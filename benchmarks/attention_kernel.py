"""What one decode step's attention costs, alone, by context length — and what stock onnxruntime offers instead.

    python benchmarks/attention_kernel.py [--contexts 128,512,1024,1900] [--threads 2]

Six attention layers shaped like gpt-neo-125m's global layers (12 heads of 64, one new token,
no score scaling), each updating its own preallocated cache in place (the same buffer bound as
input and output). Formulations, all from stock onnxruntime 1.32 ops:

- `gqa-fp32`, `gqa-int8`: com.microsoft.GroupQueryAttention, as neoedge ships it (fp32 cache, or
  int8 with per-channel scales);
- `matmul-fp32`: ONNX TensorScatter writes the new key/value in place, keys stored transposed
  [heads, 64, positions] so that both products are plain batched MatMuls onnxruntime runs as
  matrix-vector kernels without packing, masked Softmax between them;
- `matmulinteger-int8`: int8 cache read by MatMulInteger (query and probabilities quantized
  dynamically to uint8), the cache written beforehand.

Every formulation's output is checked against numpy before it is timed. Reported per layer, median of
repeated runs: the part of a decode step that grows with the context, so it bounds how flat the
context sweep in benchmarks/suite.py can be. Writes benchmarks/results/attention-kernel-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from report import write_report

HERE = Path(__file__).resolve().parent
HEADS, HEAD_SIZE, LAYERS, SLACK = 12, 64, 6, 48
FORMULATIONS = ("gqa-fp32", "gqa-int8", "matmul-fp32", "matmulinteger-int8")


def _build(kind: str, capacity: int):
    """(model, per-layer cache inputs as (name, output name or None, shape, dtype))."""
    from onnx import TensorProto as T, helper, numpy_helper

    def value(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    nodes, inputs, outputs, initializers, caches = [], [], [], [], []
    if kind.startswith("gqa"):
        int8 = kind == "gqa-int8"
        shape = [1, HEADS, capacity, HEAD_SIZE]
        inputs += [value("qkv", T.FLOAT, [1, 1, 3 * HEADS * HEAD_SIZE]), value("seqlens_k", T.INT32, [1]),
                   value("total", T.INT32, [])]
        for layer in range(LAYERS):
            past, present = [f"past_{kv}.{layer}" for kv in "kv"], [f"present_{kv}.{layer}" for kv in "kv"]
            cache_type = T.INT8 if int8 else T.FLOAT
            inputs += [value(n, cache_type, shape) for n in past]
            outputs += [value(f"out.{layer}", T.FLOAT, None)] + [value(n, cache_type, shape) for n in present]
            caches += [(p, q, shape, np.int8 if int8 else np.float32) for p, q in zip(past, present)]
            extra, attributes = [], {}
            if int8:
                scales = [f"scale_{kv}.{layer}" for kv in "kv"]
                initializers += [numpy_helper.from_array(np.full((HEADS, 1, HEAD_SIZE), 1 / 30, np.float32), n)
                                 for n in scales]
                extra = ["", "", "", "", "", *scales]
                attributes = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
            nodes.append(helper.make_node(
                "GroupQueryAttention", ["qkv", "", "", *past, "seqlens_k", "total", *extra],
                [f"out.{layer}", *present], domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS,
                scale=1.0, **attributes))
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    else:
        int8 = kind == "matmulinteger-int8"
        inputs += [value("q", T.FLOAT, [1, HEADS, 1, HEAD_SIZE]), value("mask", T.FLOAT, [1, 1, 1, capacity])]
        if not int8:
            inputs += [value("k", T.FLOAT, [1, HEADS, HEAD_SIZE, 1]), value("v", T.FLOAT, [1, HEADS, 1, HEAD_SIZE]),
                       value("position", T.INT64, [1])]
        for layer in range(LAYERS):
            kt_shape, v_shape = [1, HEADS, HEAD_SIZE, capacity], [1, HEADS, capacity, HEAD_SIZE]
            kt, v = f"keys_t.{layer}", f"values.{layer}"
            cache_type = T.INT8 if int8 else T.FLOAT
            inputs += [value(kt, cache_type, kt_shape), value(v, cache_type, v_shape)]
            outputs.append(value(f"out.{layer}", T.FLOAT, None))
            if int8:
                caches += [(kt, None, kt_shape, np.int8), (v, None, v_shape, np.int8)]
                n = f"/{layer}"
                # Per-channel cache scales: the keys' fold into the query, the values' apply after.
                initializers += [numpy_helper.from_array(np.full((1, HEADS, 1, HEAD_SIZE), 1 / 30, np.float32), name)
                                 for name in (f"{n}/k_scale", f"{n}/v_scale")]
                nodes += [
                    helper.make_node("Mul", ["q", f"{n}/k_scale"], [f"{n}/qk"]),
                    helper.make_node("DynamicQuantizeLinear", [f"{n}/qk"], [f"{n}/qq", f"{n}/qs", f"{n}/qz"]),
                    helper.make_node("MatMulInteger", [f"{n}/qq", kt, f"{n}/qz"], [f"{n}/si"]),
                    helper.make_node("Cast", [f"{n}/si"], [f"{n}/sf"], to=T.FLOAT),
                    helper.make_node("Mul", [f"{n}/sf", f"{n}/qs"], [f"{n}/s"]),
                    helper.make_node("Add", [f"{n}/s", "mask"], [f"{n}/sm"]),
                    helper.make_node("Softmax", [f"{n}/sm"], [f"{n}/p"], axis=-1),
                    helper.make_node("DynamicQuantizeLinear", [f"{n}/p"], [f"{n}/pq", f"{n}/ps", f"{n}/pz"]),
                    helper.make_node("MatMulInteger", [f"{n}/pq", v, f"{n}/pz"], [f"{n}/oi"]),
                    helper.make_node("Cast", [f"{n}/oi"], [f"{n}/of"], to=T.FLOAT),
                    helper.make_node("Mul", [f"{n}/of", f"{n}/ps"], [f"{n}/o"]),
                    helper.make_node("Mul", [f"{n}/o", f"{n}/v_scale"], [f"out.{layer}"])]
            else:
                kt_out, v_out = f"present_keys_t.{layer}", f"present_values.{layer}"
                outputs += [value(kt_out, T.FLOAT, kt_shape), value(v_out, T.FLOAT, v_shape)]
                caches += [(kt, kt_out, kt_shape, np.float32), (v, v_out, v_shape, np.float32)]
                n = f"/{layer}"
                nodes += [helper.make_node("TensorScatter", [kt, "k", "position"], [kt_out], axis=-1),
                          helper.make_node("TensorScatter", [v, "v", "position"], [v_out], axis=-2),
                          helper.make_node("MatMul", ["q", kt_out], [f"{n}/s"]),
                          helper.make_node("Add", [f"{n}/s", "mask"], [f"{n}/sm"]),
                          helper.make_node("Softmax", [f"{n}/sm"], [f"{n}/p"], axis=-1),
                          helper.make_node("MatMul", [f"{n}/p", v_out], [f"out.{layer}"])]
        opsets = [helper.make_opsetid("", 24)]
    graph = helper.make_graph(nodes, kind, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), caches


def _reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """q [heads, 64], keys/values [heads, positions, 64] -> [heads, 64]; GPT-Neo: no scaling."""
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), keys)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("ht,htd->hd", probs, values)


class Case:
    """One formulation at one context: its graph and data, built once; timed in a fresh session."""

    def __init__(self, kind: str, context: int, threads: int) -> None:
        self.kind, self.context, self.threads = kind, context, threads
        self.capacity = context + SLACK
        model, self.caches = _build(kind, self.capacity)
        self.model = model.SerializeToString()
        rng = np.random.default_rng(0)
        self.q = rng.standard_normal((HEADS, HEAD_SIZE)).astype(np.float32) * 0.1
        self.new_k, self.new_v = (rng.standard_normal((HEADS, HEAD_SIZE)).astype(np.float32) for _ in range(2))
        self.buffers = []
        last = context - 1
        for name, _, shape, dtype in self.caches:
            values = rng.standard_normal(shape)
            buffer = (values.astype(np.float32) if dtype == np.float32
                      else np.clip(values * 30, -127, 127).astype(np.int8))
            if kind == "matmulinteger-int8":  # nothing writes this cache in the graph: put the new token in now
                new = np.clip(np.round((self.new_k if name.startswith("keys") else self.new_v) * 30),
                              -127, 127).astype(np.int8)
                if name.startswith("keys"):
                    buffer[0, :, :, last] = new
                else:
                    buffer[0, :, last] = new
            self.buffers.append(buffer)
        self.checked = False

    def _session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        last = self.context - 1
        if self.kind.startswith("gqa"):
            binding.bind_cpu_input("qkv", np.concatenate([self.q, self.new_k, self.new_v]).reshape(1, 1, -1))
            binding.bind_cpu_input("seqlens_k", np.array([last], np.int32))
            binding.bind_cpu_input("total", np.array(self.context, np.int32))
        else:
            binding.bind_cpu_input("q", self.q.reshape(1, HEADS, 1, HEAD_SIZE))
            mask = np.where(np.arange(self.capacity) <= last, 0, -np.inf).astype(np.float32)
            binding.bind_cpu_input("mask", mask.reshape(1, 1, 1, self.capacity))
            if self.kind == "matmul-fp32":
                binding.bind_cpu_input("k", self.new_k.reshape(1, HEADS, HEAD_SIZE, 1))
                binding.bind_cpu_input("v", self.new_v.reshape(1, HEADS, 1, HEAD_SIZE))
                binding.bind_cpu_input("position", np.array([last], np.int64))
        for layer in range(LAYERS):
            binding.bind_output(f"out.{layer}", "cpu")  # first: get_outputs()[0] is layer 0's attention
        for (name, output, _, _), buffer in zip(self.caches, self.buffers):
            shared = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(name, shared)
            if output:
                binding.bind_ortvalue_output(output, shared)  # in place: input and output share the buffer
        return session, binding

    def _check(self, binding) -> None:
        keys, values = self.buffers[0][0], self.buffers[1][0]
        if self.kind.startswith("matmul"):
            keys = keys.transpose(0, 2, 1)
        keys, values = keys[:, :self.context].astype(np.float64), values[:, :self.context].astype(np.float64)
        if self.kind.endswith("int8"):
            keys, values = keys / 30, values / 30
        got = binding.get_outputs()[0].numpy().reshape(HEADS, HEAD_SIZE)
        error = np.abs(got - _reference(self.q, keys, values)).max()
        # MatMulInteger quantizes its float inputs again (query, probabilities): coarser, still checked.
        if error > (5e-2 if self.kind == "matmulinteger-int8" else 1e-3):
            raise AssertionError(f"{self.kind} at context {self.context} does not compute attention: "
                                 f"max |Δ| {error:.3g}")
        self.checked = True

    def measure(self, calls: int) -> float:
        """µs per layer, from a session that is the only one alive: idle sessions' spinning worker
        threads would compete for the two cores."""
        session, binding = self._session()
        session.run_with_iobinding(binding)
        if not self.checked:
            self._check(binding)
        for _ in range(5):
            session.run_with_iobinding(binding)
        start = time.perf_counter()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        return (time.perf_counter() - start) / calls / LAYERS * 1e6


def time_per_layer(cases: list[tuple[str, int]], threads: int, repeats: int = 9, calls: int = 30
                   ) -> dict[tuple[str, int], float]:
    """Median µs per layer of each (formulation, context). The cases take turns within every repeat,
    so a slow phase of a shared machine hits them all alike."""
    prepared = {case: Case(*case, threads) for case in cases}
    samples: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case, prepared_case in prepared.items():
            samples[case].append(prepared_case.measure(calls))
    return {case: float(np.median(values)) for case, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,1024,1900")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from neoedge.bench import machine_info

    contexts = [int(c) for c in args.contexts.split(",")]
    timings = time_per_layer([(kind, c) for kind in FORMULATIONS for c in contexts], args.threads)
    rows = {kind: {str(c): timings[kind, c] for c in contexts} for kind in FORMULATIONS}
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "threads": args.threads,
              "layers": LAYERS, "heads": HEADS, "head_size": HEAD_SIZE, "capacity": f"context + {SLACK}",
              "us_per_layer": rows}
    lines = [f"One decode step's attention alone, {HEADS} heads × {HEAD_SIZE}, cache updated in place "
             f"(capacity context + {SLACK}), {args.threads} threads; µs per layer (median). "
             f"Date {report['date']}.", "",
             "| formulation | " + " | ".join(str(c) for c in contexts) + " | µs per extra position |",
             "| --- |" + " --- |" * (len(contexts) + 1)]
    for kind, values in rows.items():
        slope = (values[str(contexts[-1])] - values[str(contexts[0])]) / (contexts[-1] - contexts[0])
        lines.append(f"| {kind} | " + " | ".join(f"{values[str(c)]:.0f}" for c in contexts) + f" | {slope:.3f} |")
    write_report(args.out, f"attention-kernel-{report['date']}", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
