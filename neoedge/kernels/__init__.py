"""neoedge's own CPU kernels for quantized linear layers, attention and the ops between them, and
the stock fallback.

The native library (built at install time when a C++ compiler is there, see setup.py) registers
with onnxruntime, in the `neoedge.kernels` domain:
- `MatMulNBits`: a drop-in for `com.microsoft.MatMulNBits` with accuracy_level 4, dispatched at run
  time to the widest path this CPU has: amx > avx512vnni > avxvnni > avx2 > portable (neon on arm64);
- `Attention`: GroupQueryAttention over the int8 per-channel cache, as neoedge's graphs use it;
- `SkipLayerNormalization` and `FastGelu`: com.microsoft's, without SkipLayerNormalization's mean
  and inverse-deviation outputs.
All run on the session's own thread pool.

    info = kernels.register(session_options)   # before creating the session
    if info.available: ...load the package's kernel graph...

Environment:
- NEOEDGE_KERNELS=0 (or off, false, no): never use the kernels (stock onnxruntime only).
- NEOEDGE_KERNELS_ISA=<path>: force a narrower path (for tests and comparisons); a path this CPU
  cannot run is refused.
- NEOEDGE_KERNELS_BATCHED=0: 4-16 rows (batched decode) run the one-row GEMV in passes instead of
  the batched GEMV (for comparisons; read when a session creates its kernels).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)

DOMAIN = "neoedge.kernels"
ISA_VARIABLE = "NEOEDGE_KERNELS_ISA"
DISABLE_VARIABLE = "NEOEDGE_KERNELS"
PATHS = ("amx", "avx512vnni", "avxvnni", "avx2", "neon", "portable")
# Paths measured faster than stock onnxruntime on the same CPU (benchmarks/kernels.py). The others are
# correct but were only measured against stock's AVX-512 kernels (on AVX-512 CPUs stock wins): a
# runtime should prefer stock there unless the path is forced.
FASTER_THAN_STOCK = ("amx", "avx512vnni")
INTERFACE_VERSION = 4  # 2: the Attention, SkipLayerNormalization and FastGelu ops beside MatMulNBits;
# 3: GatherBlockQuantized, and MatMulNBits' rearrange_weights (tiled weights); 4: MatMulNBitsTiled
# (MatMulNBits over weights the export stored tiled) and neoedge_vnni_peak
STOCK = "stock"


@dataclass(frozen=True)
class KernelInfo:
    """Whether neoedge's kernels run, on which path, and why (or why not)."""

    available: bool
    isa: str
    """The path the kernels take ("amx", "avx512vnni", ...), or "stock" when onnxruntime's own run."""
    reason: str
    library: str | None = None
    preferred: bool = False
    """Whether to run the package's kernel graph rather than the stock one: the path is measured
    faster than stock on such CPUs, or was forced with NEOEDGE_KERNELS_ISA."""
    attention: str = ""
    """What prompt attention runs on with this path ("amx-bf16 tiles", "avx512", "portable")."""
    tiled_weights: bool = False
    """Whether this path keeps symmetric weights in 16-row tiles, rearranged in place where the
    package's kernel graph allows it (AVX-512 VNNI without AMX, not on Windows, unless
    NEOEDGE_KERNELS_TILED=0)."""
    stored_tiles: bool = False
    """Whether the session reads them from the package's tiled kernel graph, stored tiled already."""

    def describe(self) -> str:
        if self.available:
            attention = f", prompt attention on {self.attention}" if self.attention else ""
            tiled = (", weights stored tiled" if self.stored_tiles else ", weights tiled in place") \
                if self.tiled_weights else ""
            return f"neoedge native kernels, {self.isa} path{tiled}{attention}" + \
                (f" ({self.reason})" if self.reason else "")
        return "onnxruntime stock kernels" + (f" ({self.reason})" if self.reason else "")


def library_path() -> Path:
    """Where the build puts the library: beside this file."""
    name = {"win32": "neoedge_kernels.dll", "darwin": "libneoedge_kernels.dylib"}.get(
        sys.platform, "libneoedge_kernels.so")
    return Path(__file__).resolve().parent / name


@lru_cache(maxsize=None)
def _probe(path: str) -> tuple[str | None, str]:
    """(best path, "") if the library loads and speaks this interface, else (None, why)."""
    try:
        library = ctypes.CDLL(path)
        library.neoedge_kernels_interface_version.restype = ctypes.c_int
        library.neoedge_kernels_best_isa.restype = ctypes.c_char_p
        version = library.neoedge_kernels_interface_version()
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {path}: {exc}"
    if version != INTERFACE_VERSION:
        return None, f"{path} is interface version {version}, this neoedge needs {INTERFACE_VERSION}: rebuild it"
    return library.neoedge_kernels_best_isa().decode(), ""


def _attention(path: str, isa: str) -> str:
    library = ctypes.CDLL(path)
    function = getattr(library, "neoedge_kernels_attention_path", None)
    if function is None:
        return ""
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_char_p]
    return function(isa.encode()).decode()


def _supported(path: str, isa: str) -> bool:
    library = ctypes.CDLL(path)
    library.neoedge_kernels_isa_supported.restype = ctypes.c_int
    return bool(library.neoedge_kernels_isa_supported(isa.encode()))


def runnable_paths() -> tuple[str, ...]:
    """The paths this CPU runs, widest first (empty if the library is missing or does not load)."""
    path = library_path()
    if not path.exists() or _probe(str(path))[0] is None:
        return ()
    return tuple(p for p in PATHS if _supported(str(path), p))


_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes", "")


def _switched_off() -> str | None:
    """Why the environment turns the kernels off (NEOEDGE_KERNELS), or None. A value that is no
    switch turns them off too, with a reason that says so, rather than being read as "on"."""
    value = os.environ.get(DISABLE_VARIABLE)
    if value is None or value.strip().lower() in _ON:
        return None
    if value.strip().lower() in _OFF:
        return f"{DISABLE_VARIABLE}={value}"
    return (f"unrecognised {DISABLE_VARIABLE}={value!r} (use 0/off/false/no or 1/on/true/yes), so the "
            "kernels are off")


def info() -> KernelInfo:
    """What `register` would do in this process now (reads the environment each time)."""
    off = _switched_off()
    if off is not None:
        return KernelInfo(False, STOCK, off)
    path = library_path()
    if not path.exists():
        return KernelInfo(False, STOCK, "the native library was not built at install time "
                                        "(no C++ compiler, or its build failed)")
    best, why = _probe(str(path))
    if best is None:
        return KernelInfo(False, STOCK, why)
    forced = os.environ.get(ISA_VARIABLE, "")
    if forced:
        if forced not in PATHS:
            return KernelInfo(False, STOCK, f"{ISA_VARIABLE}={forced} is not one of {', '.join(PATHS)}")
        if not _supported(str(path), forced):
            return KernelInfo(False, STOCK, f"{ISA_VARIABLE}={forced} but this CPU cannot run it (best: {best})")
        return _runs(path, forced, f"forced by {ISA_VARIABLE}", preferred=True)
    if best not in FASTER_THAN_STOCK:
        return _runs(path, best, "not faster than onnxruntime's own kernels on this CPU; "
                                 f"{ISA_VARIABLE}={best} uses it anyway", preferred=False)
    return _runs(path, best, "", preferred=True)


TILED_VARIABLE = "NEOEDGE_KERNELS_TILED"


def graph_allows_tiling(kernel_graph: str | os.PathLike[str]) -> bool:
    """Whether a kernel graph lets some MatMulNBits node tile its weights: one written by this
    version names the attribute on those nodes (onnx is not needed to look)."""
    return b"rearrange_weights" in Path(kernel_graph).read_bytes()


def _runs(path: Path, isa: str, reason: str, preferred: bool) -> KernelInfo:
    # As the library decides (op.cpp, tiling_enabled): only the value "0" switches tiling off.
    tiled = isa == "avx512vnni" and sys.platform != "win32" and os.environ.get(TILED_VARIABLE) != "0"
    return KernelInfo(True, isa, reason, str(path), preferred=preferred, attention=_attention(str(path), isa),
                      tiled_weights=tiled)


_reported: set[str] = set()


def register(options: ort.SessionOptions) -> KernelInfo:
    """Registers the kernels on `options` if they can run here; otherwise says why, once per process."""
    kernels = info()
    if kernels.available:
        try:
            options.register_custom_ops_library(kernels.library)
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types here
            kernels = KernelInfo(False, STOCK, f"onnxruntime refused {kernels.library}: {exc}")
    if not kernels.available and kernels.reason not in _reported:
        _reported.add(kernels.reason)
        # Switched off on purpose is news, not a problem; anything else is worth a warning.
        level = logging.INFO if kernels.reason.startswith(DISABLE_VARIABLE) else logging.WARNING
        log.log(level, "neoedge kernels unavailable, using onnxruntime's stock kernels: %s", kernels.reason)
    return kernels


def avx512_function(name: str, restype: Any, argtypes: list[Any]) -> tuple[Any, str]:
    """(the library's C function `name`, "") for the helpers neoedge calls through ctypes beside
    the ops (GPTQ's column loop, log_softmax_at), which exist in AVX-512 only; else (None, why):
    kernels disabled, library missing, stale or lacking the function, or a CPU without AVX-512."""
    off = _switched_off()
    if off is not None:
        return None, off
    path = library_path()
    if not path.exists():
        return None, "the native kernel library was not built"
    if "avx512vnni" not in runnable_paths():
        return None, _probe(str(path))[1] or "this CPU has no AVX-512"
    try:
        function = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError) as exc:
        return None, f"{path} lacks {name} ({exc})"
    function.restype, function.argtypes = restype, argtypes
    return function, ""


__all__ = ["DOMAIN", "KernelInfo", "avx512_function", "info", "library_path", "register", "runnable_paths"]
