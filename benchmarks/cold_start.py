"""Cold start (fresh process: import, load, 128-token prefill, first token) of this checkout against
an earlier commit, in paired, interleaved fresh processes.

    python benchmarks/random_checkpoint.py 125M work/ck125
    neoedge export work/ck125 work/int4 --quantize int4
    python benchmarks/cold_start.py work/int4 --baseline 8367545 --rounds 20

The baseline commit's code is unpacked to a temporary directory (`git archive`) and imported from
there; it gets a copy of the package with the manifest in its format (the same graph, weights and
tokenizer files, copied). This checkout runs twice: with no verified stamps (every file hashed
on every load) and with warm stamps (the steady state: files unchanged since last verified).
With `--baseline-env NAME=VALUE` the baseline is this checkout with that environment variable set
instead (e.g. NEOEDGE_KERNELS_TILED=0: what tiling the weights at session creation costs).
Each round runs the three in turn, alternating the order; the figures are medians over rounds, and
the ratio is the median of each round's ratio to the baseline of that round. Both code trees are
byte-compiled first, as an installed package is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN = """
import sys, time
start = time.perf_counter()
import json
import numpy as np
try:  # this checkout: the Model API
    from neoedge import Model
except ImportError:  # an earlier commit: the Generator API
    Model = None
    from neoedge import Generator, GenerationOptions
imported = time.perf_counter()
vocab = json.load(open(sys.argv[1] + "/neoedge.json"))["model"]["vocab_size"]
ids = np.random.default_rng(0).integers(0, vocab, 128).tolist()
if Model is not None:
    m = Model(sys.argv[1])
    loaded = time.perf_counter()
    next(iter(m.sequence(tokens=ids).stream(max_new_tokens=1, stop_at_eos=False)))
else:
    g = Generator(sys.argv[1], intra_threads=0)
    loaded = time.perf_counter()
    next(g.generate_tokens(ids, GenerationOptions(max_new_tokens=1, stop_at_eos=False)))
print("ready", imported - start, loaded - imported, time.perf_counter() - loaded, flush=True)
"""


def unpack_commit(commit: str, out: Path) -> Path:
    """The source tree of `commit` of this repository, unpacked into `out` (git archive)."""
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def baseline_package(package: Path, out: Path) -> Path:
    """`package` with its manifest in format 1 (what commits before format 2 read)."""
    out.mkdir()
    manifest = json.loads((package / "neoedge.json").read_text())
    for name in manifest["files"]:
        # A copy, not a hard link: a link would change the original's ctime, invalidating its stamp.
        shutil.copyfile(package / name, out / name)
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 1
    # Fields format 1 did not have: the kernel graph (the baseline runs the stock graph) and its check.
    manifest["graph"].pop("kernel_file", None)
    manifest["graph"].pop("tiled_kernel_file", None)
    if manifest.get("validation"):
        manifest["validation"].pop("kernel_graph", None)
    (out / "neoedge.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def run(package: Path, env: dict[str, str]) -> tuple[float, float, list[float]]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", FIRST_TOKEN, str(package)], capture_output=True, text=True,
                            env={**os.environ, **env}, cwd=tempfile.gettempdir(), timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if "ready" not in result.stdout:
        raise RuntimeError(result.stderr[-800:])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, [float(x) for x in result.stdout.split()[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="a package exported by this checkout")
    parser.add_argument("--baseline", default="8367545", help="git commit to compare with")
    parser.add_argument("--baseline-env", help="NAME=VALUE: the baseline is this checkout with that variable set")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="neoedge-cold-") as work:
        work = Path(work)
        stamps = work / "stamps"
        if args.baseline_env:
            code = None
            name, value = args.baseline_env.split("=", 1)
            baseline = (f"baseline {args.baseline_env}",
                        (args.package.resolve(), {"NEOEDGE_CACHE_DIR": str(stamps), name: value}))
        else:
            code = unpack_commit(args.baseline, work / "baseline-code")
            baseline = (f"baseline {args.baseline}", (baseline_package(args.package.resolve(), work / "baseline-package"),
                                                      {"PYTHONPATH": str(code)}))
        # Both trees byte-compiled, as an installed package is (an editable checkout with
        # PYTHONDONTWRITEBYTECODE set would compile every module on every start instead).
        for tree in ([code / "neoedge"] if code else []) + [ROOT / "neoedge"]:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
        variants = {
            baseline[0]: baseline[1],
            "this checkout, no stamps": (args.package.resolve(), {"NEOEDGE_CACHE_DIR": ""}),
            "this checkout, warm stamps": (args.package.resolve(), {"NEOEDGE_CACHE_DIR": str(stamps)}),
        }
        # Warm-up: page cache, and the stamps (files older than the racy margin are stamped).
        for package, env in variants.values():
            run(package, env)
        results: dict[str, list[tuple[float, float, list[float]]]] = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                results[name].append(run(*variants[name]))
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        if code:
            shutil.rmtree(code)

    base = [wall for wall, _, _ in results[names[0]]]
    median = statistics.median
    command = " ".join(["python benchmarks/cold_start.py", str(args.package)] +
                       ([f"--baseline-env {args.baseline_env}"] if args.baseline_env else [f"--baseline {args.baseline}"]) +
                       [f"--rounds {args.rounds}"])
    lines = [f"cold start of {args.package} (fresh process to first token, 128-token prompt), {args.rounds} rounds",
             "", f"Command: `{command}`", "",
             "| configuration | cold start s (median [min-max]) | ratio to baseline (paired median) | import s | "
             "load s | prefill + first token s | CPU s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in results.items():
        walls = [wall for wall, _, _ in runs]
        lines.append(f"| {name} | {median(walls):.3f} [{min(walls):.3f}-{max(walls):.3f}] | "
                     f"{median([w / b for w, b in zip(walls, base)]):.3f} | "
                     f"{median([p[0] for _, _, p in runs]):.3f} | {median([p[1] for _, _, p in runs]):.3f} | "
                     f"{median([p[2] for _, _, p in runs]):.3f} | {median([c for _, c, _ in runs]):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
