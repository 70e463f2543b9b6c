"""Where the benchmark scripts put their results: one JSON for machines, one markdown table for people."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

QUIET_CHECK = Path("/work/shared/tools/quiet-check")


def quiet_verdict() -> str:
    """"quiet", "busy: <why>", or "unknown" where the machine has no quiet-check: timings taken while
    other work shares the cores are not final."""
    if not QUIET_CHECK.exists():
        return "unknown"
    result = subprocess.run([str(QUIET_CHECK)], capture_output=True, text=True)
    return "quiet" if result.returncode == 0 else "busy: " + result.stdout.strip().splitlines()[0]


def write_report(out: Path, stem: str, report: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
