"""Batch-1 decode and first token of this checkout against an earlier commit, in paired fresh processes.

    python benchmarks/decode_paired.py benchmarks/work/random125m-neoedge-int4 --baseline 8367545 --rounds 5

The baseline commit's code is unpacked to a temporary directory (`git archive`) and runs its own
API (`Generator.generate_tokens`) on a copy of the package with the manifest in its format
(cold_start.baseline_package: same graph, weights and tokenizer). This checkout runs its `Model`
API twice: on onnxruntime's stock kernels (`kernels="off"`: the same graph the baseline runs, so
the difference is the runtime's own loop) and as shipped (`kernels="auto"`). Each round runs the
three in turn, alternating the order: a 128-token random prompt, then 128 new tokens, greedy, eos
blocked, 2 threads; reported are medians over rounds of each run's median step and first token.

Writes benchmarks/results/decode-paired-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from cold_start import baseline_package, unpack_commit  # noqa: E402

OLD = """
import sys, time, numpy as np
from neoedge import Generator, GenerationOptions
g = Generator(sys.argv[1], intra_threads=2)
ids = np.random.default_rng(0).integers(0, g.manifest.model.vocab_size, 128).tolist()
def run(n):
    stamps = [time.perf_counter()]
    for _ in g.generate_tokens(ids, GenerationOptions(max_new_tokens=n, stop_at_eos=False)):
        stamps.append(time.perf_counter())
    return np.diff(stamps) * 1e3
run(8)
gaps = run(128)
print("result", gaps[0], float(np.median(gaps[1:])))
"""
NEW = """
import sys, time, numpy as np
from neoedge import Model, SessionSettings
m = Model(sys.argv[1], settings=SessionSettings(intra_threads=2, kernels=sys.argv[2]))
ids = np.random.default_rng(0).integers(0, m.info.vocab_size, 128).tolist()
def run(n):
    stamps = [time.perf_counter()]
    for event in m.sequence(tokens=ids).stream(max_new_tokens=n, stop_at_eos=False):
        if event.token is not None:
            stamps.append(time.perf_counter())
    return np.diff(stamps) * 1e3
run(8)
gaps = run(128)
print("result", gaps[0], float(np.median(gaps[1:])))
"""


def run(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=tempfile.gettempdir(), timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("result")), None)
    if line is None:
        raise RuntimeError(out.stderr[-800:])
    first, step = map(float, line.split()[1:])
    return first, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--baseline", default="8367545")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="neoedge-paired-") as work:
        work = Path(work)
        code = unpack_commit(args.baseline, work / "baseline-code")
        old_package = baseline_package(args.package.resolve(), work / "baseline-package")
        package = str(args.package.resolve())
        variants = {
            f"baseline {args.baseline} (Generator, stock kernels)": (OLD, [str(old_package)], {"PYTHONPATH": str(code)}),
            "this checkout, Model, stock kernels": (NEW, [package, "off"], {}),
            "this checkout, Model, kernels auto": (NEW, [package, "auto"], {}),
        }
        names = list(variants)
        results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                results[name].append(run(*variants[name]))
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    base = results[names[0]]
    rows = []
    for name in names:
        firsts, steps = [f for f, _ in results[name]], [s for _, s in results[name]]
        rows.append({"configuration": name, "first_token_ms": statistics.median(firsts),
                     "decode_ms": statistics.median(steps),
                     "decode_ratio_to_baseline": statistics.median(s / b[1] for (_, s), b in zip(results[name], base)),
                     "first_token_ratio_to_baseline": statistics.median(f / b[0] for (f, _), b in zip(results[name], base)),
                     "runs": results[name]})
    date = datetime.date.today().isoformat()
    report = {"date": date, "package": str(args.package), "baseline": args.baseline, "rounds": args.rounds, "rows": rows}
    lines = [f"# Batch-1 decode, paired against {args.baseline} ({date})", "",
             f"`python benchmarks/decode_paired.py {args.package} --baseline {args.baseline} --rounds {args.rounds}`; "
             "128-token prompt, 128 new tokens, greedy, 2 threads, fresh processes alternating; medians over rounds; "
             "ratios are medians of per-round ratios.", "",
             "| configuration | decode ms/token | ratio to baseline | first token ms | ratio to baseline |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['configuration']} | {row['decode_ms']:.2f} | {row['decode_ratio_to_baseline']:.3f} | "
                     f"{row['first_token_ms']:.0f} | {row['first_token_ratio_to_baseline']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode-paired-{date}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"decode-paired-{date}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
