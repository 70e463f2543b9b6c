"""Packages the benchmarks export once and keep under benchmarks/work, re-exported when stale.

A cached package is reused only if it was written from the same source with the same options by
the current code: a hash of every source file of the export pipeline and of the runtime (the export
writes the manifest with the runtime's schema and validates through the runtime, so a runtime change
can change a package too); otherwise a benchmark would time or score a graph the code no longer
produces.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CODE = (REPO / "export", REPO / "neoedge")


def fingerprint(source: str, options: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{source}\n{sorted(options.items())!r}\n".encode())
    for root in CODE:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\n" + path.read_bytes())
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
