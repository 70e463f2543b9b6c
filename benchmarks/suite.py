"""Side-by-side CPU latency: neoedge against what users would otherwise pick, in one run.

    python benchmarks/suite.py            # full: 5 rounds, contexts 128..1900
    python benchmarks/suite.py --quick    # 1 round, short sweep (~5 min after the one-time exports)
    python benchmarks/suite.py --checkpoint EleutherAI/gpt-neo-125m   # a real model, when online

Without --checkpoint, a gpt-neo-125m-shaped model is built here (published config, random weights,
seed 0): latency does not depend on the weights' values. Every configuration runs in a fresh process
per round, in rotating order; the report gives medians and min–max over rounds. All use batch 1,
greedy decoding with eos blocked (every new token produced), the same prompt and thread count.

Configurations: PyTorch eager `generate` fp32; Optimum ORTModelForCausalLM fp32 and dynamic int8
(avx512_vnni preset); neoedge fp32, int8, int4. The physical limit is the weight bytes a decode step
must read divided by this machine's measured memory read bandwidth.

Writes benchmarks/results/<date>-<machine>.{json,md} and a plot of decode ms/token against context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exports import cached_export
from report import write_report

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"

GPT_NEO_125M = dict(vocab_size=50257, max_position_embeddings=2048, hidden_size=768, num_layers=12,
                    num_heads=12, attention_types=[[["global", "local"], 6]], window_size=256,
                    intermediate_size=None, bos_token_id=50256, eos_token_id=50256)

CONFIGS = {
    "pytorch-fp32": "PyTorch eager `generate`, fp32",
    "optimum-fp32": "Optimum ORTModelForCausalLM, fp32",
    "optimum-int8": "Optimum ORTModelForCausalLM, dynamic int8 (avx512_vnni)",
    "loop-int8": "plain numpy loop over Optimum's int8 graph (no torch)",
    "neoedge-fp32": "neoedge fp32",
    "neoedge-int8": "neoedge int8 (block 128)",
    "neoedge-int4": "neoedge int4 (default: block 128, symmetric)",
    "neoedge-int4-l8": "neoedge int4, lm_head int8",
    "neoedge-int4-b32": "neoedge int4 (block 32, asymmetric)",
}
NEOEDGE_EXPORTS = {
    "neoedge-fp32": dict(quantize="none"),
    "neoedge-int8": dict(quantize="int8"),
    "neoedge-int4": dict(quantize="int4"),
    "neoedge-int4-l8": dict(quantize="int4", lm_head_bits=8),
    "neoedge-int4-b32": dict(quantize="int4", block_size=32, symmetric=False),
}
FIRST_TOKEN_MARK = "FIRST-TOKEN"


# -- preparation (once, cached under benchmarks/work) ----------------------------------------------
def prepare(checkpoint: str | None, configs: list[str]) -> dict[str, str]:
    """Build or locate every configuration's model files; returns config -> path."""
    WORK.mkdir(parents=True, exist_ok=True)
    source = checkpoint or str(_random_125m())
    tag = "random125m" if checkpoint is None else Path(source).name.replace("/", "_")
    paths = {"pytorch-fp32": source}
    for name, options in NEOEDGE_EXPORTS.items():
        out = WORK / f"{tag}-{name}"
        if name in configs:
            cached_export(source, out, **options)
        paths[name] = str(out)
    optimum_fp32 = WORK / f"{tag}-optimum-fp32"
    optimum_int8 = WORK / f"{tag}-optimum-int8"
    if {"optimum-fp32", "optimum-int8", "loop-int8"} & set(configs) and not (optimum_fp32 / "model.onnx").exists():
        from optimum.onnxruntime import ORTModelForCausalLM

        print("exporting optimum-fp32 ...", file=sys.stderr)
        ORTModelForCausalLM.from_pretrained(source, export=True, use_cache=True).save_pretrained(optimum_fp32)
        _copy_tokenizer(source, optimum_fp32)
    if {"optimum-int8", "loop-int8"} & set(configs) and not optimum_int8.exists():
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        print("quantizing optimum-int8 ...", file=sys.stderr)
        quantizer = ORTQuantizer.from_pretrained(optimum_fp32)
        quantizer.quantize(save_dir=optimum_int8,
                           quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
        _copy_tokenizer(source, optimum_int8)
    paths["optimum-fp32"] = str(optimum_fp32)
    paths["optimum-int8"] = str(optimum_int8)
    paths["loop-int8"] = str(optimum_int8 / "model_quantized.onnx")
    return paths


def _copy_tokenizer(source: str, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    AutoConfig.from_pretrained(source).save_pretrained(target)


def _random_125m() -> Path:
    out = WORK / "random125m-checkpoint"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from neoedge.export.tiny import save_checkpoint, stdlib_docstrings, train_tokenizer

    print("building a gpt-neo-125m-shaped model with random weights ...", file=sys.stderr)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(**GPT_NEO_125M)).eval()
    # The hub's GPT-2 tokenizer is not reachable offline; prompts are random token ids anyway.
    save_checkpoint(model, train_tokenizer(stdlib_docstrings(), 8192), out)
    return out


# -- measurements in a fresh process ---------------------------------------------------------------
def worker(config: str, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process. Prints FIRST-TOKEN as soon as the first token exists (cold start)."""
    threads, new_tokens = spec["threads"], spec["new_tokens"]
    rng = np.random.default_rng(spec["seed"])
    vocab = spec["vocab"]
    prompt = rng.integers(0, vocab, size=spec["prompt_tokens"]).tolist()
    generate = _make_generate(config, path, threads)
    marked = False

    def run(ids: list[int], count: int) -> tuple[float, list[float]]:
        nonlocal marked
        stamps = generate(ids, count)
        if not marked:
            print(FIRST_TOKEN_MARK, flush=True)
            marked = True
        gaps = np.diff(np.asarray(stamps)) * 1e3
        return float(gaps[0]), gaps[1:].tolist()

    load_s = time.perf_counter() - START
    run(prompt, 4)  # warm-up (and the cold-start mark)
    first_ms, steps = run(prompt, new_tokens)
    sweep = []
    for context in spec["contexts"]:
        ids = rng.integers(0, vocab, size=context).tolist()
        _, sweep_steps = run(ids, spec["sweep_tokens"])
        sweep.append({"context": context, "decode_ms_per_token": float(np.median(sweep_steps))})
    from neoedge.bench import peak_rss_mb

    return {"config": config, "load_s": load_s, "first_token_ms": first_ms,
            "decode_ms_per_token": float(np.median(steps)), "decode_p90_ms": float(np.percentile(steps, 90)),
            "sweep": sweep, "peak_rss_mb": peak_rss_mb()}


def _make_generate(config: str, path: str, threads: int):
    """A function (prompt ids, n) -> timestamps [start, token 1, ..., token n]."""
    if config.startswith("neoedge"):
        from neoedge import Model, SessionSettings

        model = Model(path, settings=SessionSettings(intra_threads=threads))

        def generate(ids, count):
            stamps = [time.perf_counter()]
            for event in model.sequence(tokens=ids).stream(max_new_tokens=count, stop_at_eos=False):
                if event.token is not None:
                    stamps.append(time.perf_counter())
            return stamps
        return generate

    if config == "loop-int8":
        return _plain_loop(path, threads)

    import torch
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    if config == "pytorch-fp32":
        from transformers import GPTNeoForCausalLM
        model = GPTNeoForCausalLM.from_pretrained(path).eval()
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        file_name = "model_quantized.onnx" if config == "optimum-int8" else "model.onnx"
        model = ORTModelForCausalLM.from_pretrained(path, session_options=options, use_cache=True,
                                                    file_name=file_name)

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; then one per new token
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(ids, count):
        streamer = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=0, streamer=streamer)
        return [start] + streamer.stamps[1:]
    return generate


def _plain_loop(path: str, threads: int):
    """What a careful user writes without torch: an InferenceSession over Optimum's graph, fed the
    ids, mask, positions and every past tensor; the presents become the next past; argmax in numpy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    outputs = [o.name for o in session.get_outputs()]

    def generate(ids, count):
        stamps = [time.perf_counter()]
        feeds = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
        tokens = np.asarray([ids], np.int64)
        length = 0
        for _ in range(count):
            n = tokens.shape[1]
            feeds.update(input_ids=tokens, attention_mask=np.ones((1, length + n), np.int64),
                         position_ids=np.arange(length, length + n, dtype=np.int64)[None])
            results = session.run(outputs, feeds)
            for name, value in zip(outputs[1:], results[1:]):
                feeds[name.replace("present", "past_key_values")] = value
            length += n
            tokens = np.asarray([[int(results[0][0, -1].argmax())]], np.int64)
            stamps.append(time.perf_counter())
        return stamps
    return generate


def run_worker(config: str, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Spawn a fresh process for one configuration; time process start to first token."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", config, "--path", path,
                             "--spec", json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    cold = None
    lines = []
    for line in proc.stdout:
        if line.strip() == FIRST_TOKEN_MARK and cold is None:
            cold = time.perf_counter() - start
        else:
            lines.append(line)
    if proc.wait() != 0:
        raise RuntimeError(f"{config} worker failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    result["cold_start_s"] = cold
    return result


# -- machine limits ---------------------------------------------------------------------------------
def memory_read_bandwidth(threads: int, size_mb: int = 512, repeats: int = 5) -> float:
    """GB/s reading a 512 MB array (far beyond the caches), split over `threads` (numpy frees the GIL).

    The best over repeats and over two streaming kernels (max-reduction, dot product): numpy's
    kernels are not a tuned STREAM benchmark, so this is a lower bound on the true bandwidth and the
    physical limit derived from it is, if anything, generous to every configuration alike.
    """
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(size_mb * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for kernel in (np.max, lambda x: np.dot(x, x)):
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(kernel, parts))
                best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def weights_read_per_step(config: str, path: str) -> float:
    """Bytes of weights a decode step reads: every initializer, except tables only gathered from
    (position embeddings; a token embedding that is not also the lm_head)."""
    if config == "pytorch-fp32":
        from safetensors import safe_open
        with safe_open(str(Path(path) / "model.safetensors"), "np") as f:
            return float(sum(f.get_tensor(name).nbytes for name in f.keys() if "wpe" not in name))
    import onnx

    files = [Path(path)] if path.endswith(".onnx") else sorted(Path(path).glob("*.onnx"))
    model = onnx.load(str(files[0]), load_external_data=True)
    gather_only: dict[str, bool] = {}
    for node in model.graph.node:
        for name in node.input:
            gather_only[name] = gather_only.get(name, True) and (node.op_type == "Gather" and node.input[0] == name)
    total = 0
    for tensor in model.graph.initializer:
        if gather_only.get(tensor.name, False):
            continue
        total += onnx.numpy_helper.to_array(tensor).nbytes
    return float(total)


def disk_mb(config: str, path: str) -> float:
    root = Path(path).parent if path.endswith(".onnx") else Path(path)
    pattern = "*.safetensors" if config == "pytorch-fp32" else "*"
    return sum(p.stat().st_size for p in root.glob(pattern) if p.is_file()) / 1e6


# -- the run ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round, contexts 128 and 1024, 64 new tokens")
    parser.add_argument("--checkpoint", help="hub id or directory of a real GPT-Neo (default: random 125M shape)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--contexts", default="128,512,1024,1900")
    parser.add_argument("--sweep-tokens", type=int, default=48, help="new tokens timed at each context")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", type=Path, help="rewrite the table and plot from a results JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, json.loads(args.spec))), flush=True)
        return
    if args.replot:
        write_outputs(json.loads(args.replot.read_text()), args.replot.parent, stem=args.replot.stem)
        return

    from tqdm import tqdm

    from neoedge.bench import machine_info

    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    rounds = 1 if args.quick else args.rounds
    contexts = [128, 1024] if args.quick else [int(c) for c in args.contexts.split(",")]
    new_tokens = 64 if args.quick else args.new_tokens
    paths = prepare(args.checkpoint, configs)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(paths["pytorch-fp32"]).vocab_size
    spec = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens,
            "contexts": contexts, "sweep_tokens": args.sweep_tokens, "seed": 0, "vocab": vocab}

    bandwidth = {1: memory_read_bandwidth(1), args.threads: memory_read_bandwidth(args.threads)}
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with tqdm(total=rounds * len(configs), desc="suite", unit="run") as bar:
        for r in range(rounds):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for config in order:
                bar.set_postfix_str(f"round {r + 1}: {config}")
                results[config].append(run_worker(config, paths[config], spec))
                bar.update()

    limit_bw = bandwidth[args.threads]
    rows = []
    for config in configs:
        runs = results[config]
        read = weights_read_per_step(config, paths[config])
        limit_ms = read / (limit_bw * 1e9) * 1e3
        row = {"config": config, "label": CONFIGS[config],
               "decode_ms_per_token": _stats([x["decode_ms_per_token"] for x in runs]),
               "first_token_ms": _stats([x["first_token_ms"] for x in runs]),
               "cold_start_s": _stats([x["cold_start_s"] for x in runs]),
               "peak_rss_mb": _stats([x["peak_rss_mb"] for x in runs]),
               "disk_mb": disk_mb(config, paths[config]),
               "weights_read_mb": read / 1e6, "limit_ms": limit_ms,
               "sweep": {str(c): _stats([x["sweep"][i]["decode_ms_per_token"] for x in runs])
                         for i, c in enumerate(contexts)},
               "needs_torch": config.startswith(("pytorch", "optimum"))}
        row["ratio_to_limit"] = row["decode_ms_per_token"]["median"] / limit_ms
        rows.append(row)
    report = {"date": datetime.date.today().isoformat(), "machine": machine_info(),
              "bandwidth_gb_s": {str(k): v for k, v in bandwidth.items()},
              "workload": {**spec, "rounds": rounds, "batch": 1, "decoding": "greedy, eos blocked",
                           "checkpoint": args.checkpoint or "random weights, gpt-neo-125m shape, seed 0"},
              "results": rows}
    write_outputs(report, args.out, quick=args.quick)


def _stats(values: list[float | None]) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}


def _fmt(s: dict[str, float], digits: int = 1) -> str:
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    m, w = report["machine"], report["workload"]
    contexts = w["contexts"]
    by_config = {row["config"]: row for row in report["results"]}
    torch_ms = by_config.get("pytorch-fp32", {}).get("decode_ms_per_token", {}).get("median")
    lines = [
        f"Machine: {m.get('cpu', m['machine'])}, {m['logical_cores']} cores ({' '.join(m.get('flags', []))}), "
        f"onnxruntime {m['onnxruntime']}; memory read bandwidth {report['bandwidth_gb_s']['1']:.1f} GB/s "
        f"(1 thread), {report['bandwidth_gb_s'][str(w['threads'])]:.1f} GB/s ({w['threads']} threads).",
        f"Workload: {w['checkpoint']}; batch 1, {w['prompt_tokens']}-token prompt, {w['new_tokens']} new "
        f"tokens, {w['decoding']}, {w['threads']} threads; {w['rounds']} round(s) of fresh processes, "
        f"medians [min–max]. Date {report['date']}.",
        "",
        "| configuration | decode ms/token | vs PyTorch | × physical limit | first token ms | cold start s "
        "| peak RSS MB | on disk MB | needs torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        speedup = f"{torch_ms / row['decode_ms_per_token']['median']:.1f}×" if torch_ms else "–"
        lines.append(
            f"| {row['label']} | {_fmt(row['decode_ms_per_token'], 2)} | {speedup} | {row['ratio_to_limit']:.1f} "
            f"({row['limit_ms']:.2f} ms) | {_fmt(row['first_token_ms'], 0)} | {_fmt(row['cold_start_s'], 2)} "
            f"| {_fmt(row['peak_rss_mb'], 0)} | {row['disk_mb']:.0f} | {'yes' if row['needs_torch'] else 'no'} |")
    sweep_tokens = report["workload"].get("sweep_tokens", 16)
    lines += ["", f"Decode ms/token by context length (prompt of that many tokens, then {sweep_tokens} new tokens, "
              "median step):", "",
              "| configuration | " + " | ".join(str(c) for c in contexts) + " | ratio last/first |",
              "| --- | " + " | ".join("---" for _ in contexts) + " | --- |"]
    for row in report["results"]:
        values = [row["sweep"][str(c)]["median"] for c in contexts]
        lines.append(f"| {row['label']} | " + " | ".join(f"{v:.2f}" for v in values)
                     + f" | {values[-1] / values[0]:.2f} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], out: Path, *, quick: bool = False, stem: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    host = platform.node() or "machine"
    stem = stem or f"{report['date']}-{host}{'-quick' if quick else ''}"
    write_report(out, stem, report, markdown(report))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'neoedge[bench]')", file=sys.stderr)
        return
    contexts = report["workload"]["contexts"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for row in report["results"]:
        ax.plot(contexts, [row["sweep"][str(c)]["median"] for c in contexts], marker="o", label=row["label"])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms/token (median)")
    ax.set_yscale("log")
    ax.set_title(f"GPT-Neo 125M shape, batch 1, {report['workload']['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / stem}.{{json,md,png}}", file=sys.stderr)


START = time.perf_counter()

if __name__ == "__main__":
    main()
