"""What an export costs: wall time and peak memory (RSS) of `neoedge export`, one export per process.

    python benchmarks/export_cost.py CHECKPOINT [--quantize int4] [--algorithm rtn --algorithm gptq]
        [--code DIR] [--label NAME] [--out benchmarks/results]

Each export runs in a fresh Python process (peak RSS is that process's ru_maxrss: the whole
export, checkpoint load and validation included), into a temporary directory that is removed afterwards.
`--code DIR` runs another checkout's export instead (e.g. `git archive main | tar -x -C DIR`, with
DIR/neoedge/export a symlink to DIR/export): the "before" of a change. Timings depend on what else
the machine runs; compare rows of one run.

Writes benchmarks/results/export-cost-<date>.{json,md} (appending rows to the day's file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import resource, sys, time
from neoedge.export import export_package
options = {options}
start = time.perf_counter()
export_package({source!r}, {out!r}, progress=False, **options)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(source: str, options: dict, code: Path | None) -> dict:
    with tempfile.TemporaryDirectory(dir=HERE / "work") as tmp:
        out = str(Path(tmp) / "package")
        env = dict(os.environ)
        if code is not None:
            env["PYTHONPATH"] = str(code)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", CHILD.format(options=repr(options), source=source, out=out)],
                                capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(result.stderr[-2000:])
        size = sum(p.stat().st_size for p in Path(out).iterdir())
    seconds, peak_kb = result.stdout.strip().splitlines()[-1].split()
    return {"export_s": float(seconds), "process_s": wall, "peak_rss_mb": int(peak_kb) / 1024, "package_mb": size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--algorithm", action="append", help="repeatable; omitted: the code's default")
    parser.add_argument("--code", type=Path, help="another checkout's root to run the export from")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    (HERE / "work").mkdir(exist_ok=True)
    stem = f"export-cost-{datetime.date.today().isoformat()}"
    path = args.out / f"{stem}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for algorithm in args.algorithm or [None]:
        options = {"quantize": args.quantize} | ({"algorithm": algorithm} if algorithm else {})
        row = {"checkpoint": args.checkpoint, "code": args.label, **options, **measure(args.checkpoint, options,
                                                                                        args.code)}
        print(row, file=sys.stderr)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["| checkpoint | code | quantize | algorithm | export s | peak RSS MB | package MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['code']} | {r['quantize']} | {r.get('algorithm', '(default)')} | "
                     f"{r['export_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['package_mb']:.1f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
