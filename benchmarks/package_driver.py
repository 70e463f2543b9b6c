"""Drive one graph of a gqa package directly, for kernel benchmarks and op profiles.

Independent of the runtime's runner on purpose: the benchmarks compare two graph files of the same
package (the stock `model.onnx` and the kernel graph) under identical session settings, and profile
them with onnxruntime's profiler, which the runtime does not expose. The cache handling mirrors the
runtime's (preallocated buffers bound as both past and present, prompts in chunks of
window_size // 2 so the local layers' bounded buffers can slide) so the timings are the runtime's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class PackageShape:
    vocab: int
    heads: int
    head_size: int
    layers: tuple[str, ...]  # "global" / "local" per layer
    window: int
    cache: str  # "float32", "int8", or "int4" (onnxruntime's: uint8, two channels per byte)

    @classmethod
    def read(cls, package: Path, cache: str | None = None) -> PackageShape:
        """The package's shape; `cache` overrides its manifest's KV cache type."""
        manifest = json.loads((package / "neoedge.json").read_text())
        model, graph = manifest["model"], manifest["graph"]
        if graph["attention"] != "gqa":
            raise SystemExit(f"{package}: only gqa packages are driven here")
        return cls(model["vocab_size"], model["num_heads"], model["hidden_size"] // model["num_heads"],
                   tuple(model["attention_layers"]), model["window_size"], cache or graph.get("kv_cache", "float32"))


def session_options(threads: int = 0, kernels_library: str | None = None,
                    profile_prefix: str | None = None) -> ort.SessionOptions:
    """The runtime's settings (neoedge/session.py), plus optionally the kernels and the profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if kernels_library:
        options.register_custom_ops_library(kernels_library)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


class GqaDriver:
    def __init__(self, session: ort.InferenceSession, shape: PackageShape, capacity: int) -> None:
        self.session, self.shape = session, shape
        self.chunk = max(16, shape.window // 2)
        self.keep = shape.window - 1
        self.capacity = capacity
        self.local_capacity = min(capacity, self.keep + self.chunk)
        dtype = {"float32": np.float32, "int8": np.int8, "int4": np.uint8}[shape.cache]
        last = shape.head_size // 2 if shape.cache == "int4" else shape.head_size
        self._caches = []
        self._local = []
        for layer, kind in enumerate(shape.layers):
            positions = self.local_capacity if kind == "local" else capacity
            for kv in ("key", "value"):
                buffer = np.zeros((1, shape.heads, positions, last), dtype)
                if kind == "local":
                    self._local.append(buffer)
                self._caches.append((f"past_{kv}.{layer}", f"present_{kv}.{layer}",
                                     ort.OrtValue.ortvalue_from_numpy(buffer)))
        self.length = self.local_length = 0
        self._logits = np.zeros((1, 1, shape.vocab), np.float32)
        self._scalars = {name: np.zeros(s, t) for name, s, t in (
            ("seqlens_k", (1,), np.int32), ("total_sequence_length", (), np.int32),
            ("local_seqlens_k", (1,), np.int32), ("local_total_sequence_length", (), np.int32))}

    def reset(self) -> None:
        self.length = self.local_length = 0

    def _run(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        count = ids.shape[0]
        if self.local_length + count > self.local_capacity:
            start = self.local_length - self.keep
            for buffer in self._local:
                buffer[:, :, : self.keep] = buffer[:, :, start: self.local_length]
            self.local_length = self.keep
        s = self._scalars
        s["seqlens_k"][0] = self.length + count - 1
        s["total_sequence_length"][...] = self.length + count
        s["local_seqlens_k"][0] = self.local_length + count - 1
        s["local_total_sequence_length"][...] = self.local_length + count
        binding = self.session.io_binding()
        feeds = {"input_ids": ids.reshape(1, count).astype(np.int64),
                 "position_ids": np.arange(self.length, self.length + count, dtype=np.int64).reshape(1, count),
                 "logits_positions": np.arange(count, dtype=np.int64) if all_logits
                 else np.array([count - 1], np.int64), **s}
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        # Logits first: get_outputs() lists the outputs in binding order.
        if all_logits:
            binding.bind_output("logits", "cpu")
        else:
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self._logits))
        for past, present, value in self._caches:
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        self.length += count
        self.local_length += count
        return binding.get_outputs()[0].numpy()[0] if all_logits else self._logits[0, 0]

    def prefill(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        parts = [self._run(ids[i: i + self.chunk], all_logits) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(parts) if all_logits else parts[-1]

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([token], np.int64))
