"""Builds neoedge's native kernels; everything else about the package is in pyproject.toml.

The kernels are a plain shared library (not a Python extension module) that onnxruntime loads by
path. It is declared as an optional extension so that setuptools finds the compiler, places the
library for both `pip install .` and `pip install -e .`, and carries on without it when the build
fails or no compiler exists: the runtime then uses onnxruntime's stock kernels and says so.

NEOEDGE_KERNELS_BUILD=0 skips the build on purpose.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "neoedge/kernels"
SOURCES = ["op.cpp", "isa.cpp", "portable.cpp", "avx2.cpp", "avx512.cpp", "avx512_batch.cpp", "avx512_tiled.cpp", "tiled.cpp", "tiled_registry.cpp", "amx.cpp", "attention.cpp", "attention_avx512.cpp", "attention_amx.cpp", "elementwise.cpp", "elementwise_avx512.cpp", "gptq.cpp", "log_softmax.cpp", "neon.cpp", "compute_peak.cpp"]


def library_name() -> str:
    if sys.platform == "win32":
        return "neoedge_kernels.dll"
    return "libneoedge_kernels.dylib" if sys.platform == "darwin" else "libneoedge_kernels.so"


class BuildKernels(build_ext):
    def build_extensions(self) -> None:
        if os.environ.get("NEOEDGE_KERNELS_BUILD", "1") == "0":
            print("neoedge: NEOEDGE_KERNELS_BUILD=0, not building the native kernels", file=sys.stderr)
            return
        msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            # Baseline flags only: each fast path carries its own target attributes and is chosen at
            # run time by CPUID, so one library runs on every CPU of the architecture.
            ext.extra_compile_args = ["/std:c++17", "/O2", "/EHsc"] if msvc else \
                ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-fno-math-errno", "-Wall", "-pthread",
                 # GCC 12 reports its own AVX-512 intrinsics headers as reading uninitialised values
                 "-Wno-uninitialized", "-Wno-maybe-uninitialized"]
            if not msvc and sys.platform != "darwin":
                ext.extra_link_args = ["-Wl,--no-undefined", "-pthread"]  # tiled.cpp's std::thread
        super().build_extensions()

    def get_ext_filename(self, fullname: str) -> str:
        # Loaded by path, never imported: a plain library name instead of a CPython extension suffix.
        return os.path.join(*fullname.split(".")[:-1], library_name())

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # not a module: no PyInit_ symbol; the library marks its own exports


setup(
    ext_modules=[Extension("neoedge.kernels._library", [f"{KERNELS}/{s}" for s in SOURCES],
                           language="c++", optional=True)],
    cmdclass={"build_ext": BuildKernels},
)
