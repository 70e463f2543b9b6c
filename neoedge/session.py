"""onnxruntime session settings that matter on small CPUs, session creation, and onnxruntime's
errors turned into neoedge's."""

from __future__ import annotations


import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from . import kernels
from .errors import OptionsError, PackageError, RunError

log = logging.getLogger(__name__)

# onnxruntime raises its own exception classes (Fail, InvalidArgument, RuntimeException, ...), none
# of which share a base class below Exception.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    value for value in vars(_ort_state).values()
    if isinstance(value, type) and issubclass(value, Exception))


def max_intra_threads() -> int:
    """More threads per op than logical CPUs never runs an op faster, and onnxruntime spins up every
    one of them at load (100,000 of them take minutes): this is the most SessionSettings accepts."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class SessionSettings:
    intra_threads: int = 0
    """Threads for one op; 0 lets onnxruntime use one per physical core. At most os.cpu_count()."""
    spinning: bool = True
    """Keep worker threads spinning between ops: turning it off costs ~1 ms/token on 2 cores."""
    prepack: bool = True
    """Let kernels repack constant weights into their own layout at load. Off, the weights stay
    memory-mapped from the package file: session creation drops from seconds to milliseconds and an
    fp32 package needs no second copy of its weights, but fp32 decode runs ~1.5× slower, and int8/int4
    decode ~30× slower (their kernels have no fast path without the packed layout): keep it on for those."""
    kernels: Literal["auto", "off"] = "auto"
    """"auto": a quantized package runs its kernel graph on neoedge's native kernels when they are
    built and this CPU has a path measured faster than onnxruntime's own (see neoedge.kernels);
    "off": always the stock graph and onnxruntime's kernels."""

    def __post_init__(self) -> None:
        limit = max_intra_threads()
        if isinstance(self.intra_threads, bool) or not isinstance(self.intra_threads, int) \
                or not 0 <= self.intra_threads <= limit:
            raise OptionsError(f"intra_threads must be an integer from 0 (one per physical core) to "
                               f"{limit} (this machine's CPUs), got {self.intra_threads!r}")
        for name in ("spinning", "prepack"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.kernels not in ("auto", "off"):
            raise OptionsError(f"kernels must be 'auto' or 'off', got {self.kernels!r}")


@dataclass(frozen=True)
class LoadedGraph:
    """The session a package runs on, the graph file it was made from, and which kernels run it."""

    session: ort.InferenceSession
    path: Path
    kernels: kernels.KernelInfo


def create_session(model_path: str | os.PathLike[str], settings: SessionSettings,
                   kernel_graph: str | os.PathLike[str] | None = None,
                   tiled_kernel_graph: str | os.PathLike[str] | None = None) -> LoadedGraph:
    """A session over `kernel_graph` (the same graph on neoedge's kernels) when the kernels are
    available and preferred here, else over the stock graph `model_path`; over `tiled_kernel_graph`
    (the kernel graph with its weights stored tiled) instead of `kernel_graph` where the kernels
    tile weights."""
    options = _options(settings)
    kernel_info = kernels.KernelInfo(False, kernels.STOCK, "the package has no kernel graph")
    if settings.kernels == "off":
        kernel_info = kernels.KernelInfo(False, kernels.STOCK, "SessionSettings(kernels='off')")
    elif kernel_graph is not None:
        found = kernels.info()
        if found.available and not found.preferred:
            # Built, but not faster than stock on this CPU: the stock graph runs, the library stays unloaded.
            kernel_info = kernels.KernelInfo(False, kernels.STOCK, found.reason, found.library)
        else:
            kernel_info = kernels.register(options)  # says once why, if the kernels cannot run here
            if kernel_info.available:
                if kernel_info.tiled_weights and tiled_kernel_graph is not None:
                    # Its weights are mapped as they are: no copy of each page written (cold start).
                    kernel_info = replace(kernel_info, stored_tiles=True)
                    return LoadedGraph(_session(tiled_kernel_graph, options, settings), Path(tiled_kernel_graph),
                                       kernel_info)
                if kernel_info.tiled_weights and not kernels.graph_allows_tiling(kernel_graph):
                    # A kernel graph from before tiling (no node allows it): the weights stay as they are.
                    kernel_info = replace(kernel_info, tiled_weights=False)
                return LoadedGraph(_session(kernel_graph, options, settings), Path(kernel_graph), kernel_info)
    return LoadedGraph(_session(model_path, options, settings), Path(model_path), kernel_info)


def _options(settings: SessionSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_threads
    # One graph, run op after op: a second pool would only compete for the same cores.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    if not settings.prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def _session(model_path: str | os.PathLike[str], options: ort.SessionOptions,
             settings: SessionSettings) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types for bad files
        raise PackageError(f"cannot load model graph {model_path}: {one_line(exc)}") from exc
    log.debug("loaded %s with %s", model_path, settings)
    return session


# onnxruntime's Python run wrappers look up this run-config key on every call to decide on WebGPU graph
# capture; a key that was never set is reported by a C++ exception turned into RuntimeError and
# caught, which costs ~25 µs a call (about 1% of a 125M decode step). "-1" is the documented value
# for "no capture", so setting it changes nothing but the cost of asking.
_GRAPH_CAPTURE_KEY = "gpu_graph_id"


def new_run_options() -> ort.RunOptions:
    """RunOptions for neoedge's forward passes: onnxruntime's defaults, cheap to run with."""
    options = ort.RunOptions()
    options.add_run_config_entry(_GRAPH_CAPTURE_KEY, "-1")
    return options


def run_error(exc: BaseException, what: str, where: str | os.PathLike[str]) -> RunError:
    """The RunError to raise for onnxruntime's `exc`: what was running, on which graph."""
    return RunError(f"onnxruntime failed during {what} ({where}): {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (onnxruntime's often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
