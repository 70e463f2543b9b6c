"""Many requests on one model: continuous batching and `neoedge serve` under concurrent clients.

    python benchmarks/serve_load.py [--package PKG] [--batch 1,2,4,8,16] [--clients 8] [--threads 2]

Without --package it builds the gpt-neo-125m-shaped checkpoint (random weights,
benchmarks/random_checkpoint.py) and its int4 package under benchmarks/work (cached). The workload
is issue 14's: 128-token prompts, 128 new tokens (eos ignored), greedy.

- For each batch size B: an engine with B rows runs B requests at once; aggregate tokens/s (all
  tokens / wall time), first-token and per-request decode ms/token percentiles, resident memory
  growth against what the KV caches hold. Batch 1 also runs through the engine and through the
  direct API in alternating pairs.
- N streaming clients at once through a `neoedge serve` process (max batch N) against the same N
  requests one at a time, timed by the clients.

Timings are meaningless while other work shares the cores: it says so when /work/shared/tools/quiet-check
(if present) reports a busy machine, and records that in the result. Writes
benchmarks/results/serve-load-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
from pathlib import Path

from exports import cached_export
from report import write_report

HERE = Path(__file__).resolve().parent
QUIET_CHECK = Path("/work/shared/tools/quiet-check")


def default_package(work: Path) -> Path:
    checkpoint = work / "random125m-checkpoint"
    if not (checkpoint / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "random_checkpoint.py"), "125M", str(checkpoint)], check=True)
    return cached_export(str(checkpoint), work / "random125m-int4", quantize="int4", validate=False)


def machine_quiet() -> bool | None:
    if not QUIET_CHECK.exists() or shutil.which(str(QUIET_CHECK)) is None:
        return None
    return subprocess.run([str(QUIET_CHECK)], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, help="Package to measure (default: the 125M-shaped int4 one).")
    parser.add_argument("--batch", default="1,2,4,8,16")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from neoedge import SessionSettings
    from neoedge.bench import BenchSettings, run_bench

    package = args.package or default_package(HERE / "work")
    quiet_before = machine_quiet()
    settings = BenchSettings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs,
                             session=SessionSettings(intra_threads=args.threads), cold_start=False,
                             batches=tuple(int(b) for b in args.batch.split(",") if b.strip()),
                             clients=args.clients)
    report = run_bench(package, settings, progress=True)
    quiet_after = machine_quiet()
    noisy = quiet_before is False or quiet_after is False
    text = report.render()
    header = (f"# Batching and serving, {datetime.date.today()}\n\n"
              f"`python benchmarks/serve_load.py --batch {args.batch} --clients {args.clients} "
              f"--threads {args.threads}`\n\n")
    if noisy:
        header += "**Measured while other work ran on the machine (quiet-check): ratios only, not final figures.**\n\n"
    write_report(args.out, f"serve-load-{datetime.date.today()}",
                 {**report.to_dict(), "machine_quiet": {"before": quiet_before, "after": quiet_after}},
                 header + "```\n" + text + "\n```\n")


if __name__ == "__main__":
    main()
