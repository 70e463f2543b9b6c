"""Packages the benchmarks export once and keep under benchmarks/work, re-exported when stale.

A cached package is reused only if it was written from the same source with the same options by
the current export code (a hash of neoedge/export's sources); otherwise a benchmark would time or
score a graph the code no longer produces.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

EXPORT_CODE = Path(__file__).resolve().parent.parent / "export"


def fingerprint(source: str, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{source}\n{sorted(options.items())!r}\n".encode())
    for path in sorted(EXPORT_CODE.glob("*.py")):
        digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()


def cached_export(source: str, out: Path, *, progress: bool = True, **options: Any) -> Path:
    """`out` holding the package of `source` exported with `options`, exported now if needed."""
    from neoedge.export import export_package

    stamp = out.with_name(out.name + ".stamp")
    expected = fingerprint(source, options)
    if (out / "neoedge.json").exists() and stamp.exists() and stamp.read_text() == expected:
        return out
    print(f"exporting {out.name} ...", file=sys.stderr)
    if out.exists():
        shutil.rmtree(out)
    export_package(source, out, progress=progress, **options)
    stamp.write_text(expected)
    return out
