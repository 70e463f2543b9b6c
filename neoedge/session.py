"""onnxruntime session settings that matter on small CPUs, and session creation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import onnxruntime as ort

from .errors import PackageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSettings:
    intra_threads: int = 0
    """Threads for one op; 0 lets onnxruntime use one per physical core."""
    spinning: bool = True
    """Keep worker threads spinning between ops: turning it off costs ~1 ms/token on 2 cores."""
    prepack: bool = True
    """Let kernels repack constant weights into their own layout at load. Off, the weights stay
    memory-mapped from the package file: session creation drops from seconds to milliseconds and an
    fp32 package needs no second copy of its weights, but fp32 decode runs ~1.5× slower, and int8/int4
    decode ~30× slower (their kernels have no fast path without the packed layout): keep it on for those."""

    def __post_init__(self) -> None:
        if isinstance(self.intra_threads, bool) or not isinstance(self.intra_threads, int) \
                or self.intra_threads < 0:
            raise ValueError(f"intra_threads must be an integer >= 0, got {self.intra_threads!r}")


def create_session(model_path: str | os.PathLike[str], settings: SessionSettings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_threads
    # One graph, run op after op: a second pool would only compete for the same cores.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    if not settings.prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types for bad files
        raise PackageError(f"cannot load model graph {model_path}: {exc}") from exc
    log.debug("loaded %s with %s", model_path, settings)
    return session
