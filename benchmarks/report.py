"""Where the benchmark scripts put their results: one JSON for machines, one markdown table for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: Path, stem: str, report: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
