"""`neoedge bench`: latency of one package on this machine, measured with the runtime's own loop."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .generator import Generator
from .options import GenerationOptions


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    threads: int = 0
    spinning: bool = True
    prepack: bool = True
    contexts: tuple[int, ...] = ()
    sweep_tokens: int = 32
    seed: int = 0
    cold_start: bool = True
    temperature: float = 0.0
    """Sampling settings of the timed generations (greedy by default)."""
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "runs", "sweep_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError("warmup and threads must be >= 0")
        self.options(1)  # sampling settings are validated here, once

    def options(self, new_tokens: int) -> GenerationOptions:
        return GenerationOptions(max_new_tokens=new_tokens, stop_at_eos=False, temperature=self.temperature,
                                 top_k=self.top_k, top_p=self.top_p, seed=self.seed)


@dataclass
class Timings:
    """One generation: time to first token, then the interval between consecutive tokens."""

    first_token_ms: float
    step_ms: list[float] = field(default_factory=list)


def time_generation(generator: Generator, prompt: list[int], options: GenerationOptions) -> Timings:
    start = time.perf_counter()
    stamps = [start]
    for _ in generator.generate_tokens(prompt, options):
        stamps.append(time.perf_counter())
    gaps = np.diff(np.asarray(stamps)) * 1e3
    return Timings(first_token_ms=float(gaps[0]), step_ms=gaps[1:].tolist())


def random_prompt(generator: Generator, length: int, seed: int) -> list[int]:
    model = generator.manifest.model
    if length >= model.context_length:
        raise ValueError(f"prompt of {length} tokens does not fit the context ({model.context_length})")
    return np.random.default_rng(seed).integers(0, model.vocab_size, size=length).tolist()


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, which starts afresh at exec (ru_maxrss
    would carry the parent's peak into a spawned benchmark process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "python": platform.python_version(), "onnxruntime": ort.__version__,
                            "logical_cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu" not in info:
            info["cpu"] = value.strip()
        if key.strip() == "flags" and "flags" not in info:
            flags = set(value.split())
            info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                               "amx_int8") if f in flags)
    return info


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def cold_start_seconds(package: Path, settings: BenchSettings) -> float:
    """A fresh Python process: import, load the package, prefill, first token. Files are in page cache."""
    code = (
        "import sys, time\n"
        "from neoedge import Generator, GenerationOptions\n"
        "from neoedge.bench import random_prompt\n"
        f"g = Generator({str(package)!r}, intra_threads={settings.threads}, prepack={settings.prepack})\n"
        f"p = random_prompt(g, {settings.prompt_tokens}, {settings.seed})\n"
        "next(g.generate_tokens(p, GenerationOptions(max_new_tokens=1, stop_at_eos=False)))\n"
        "print('ready', flush=True)\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or "ready" not in result.stdout:
        raise RuntimeError(f"cold-start process failed: {result.stderr.strip()[-500:]}")
    return elapsed


def run_bench(package: str | os.PathLike[str], settings: BenchSettings, *, progress: bool = False) -> dict[str, Any]:
    from tqdm.auto import tqdm

    package = Path(package)
    start = time.perf_counter()
    generator = Generator(package, intra_threads=settings.threads, spinning=settings.spinning,
                          prepack=settings.prepack)
    load_s = time.perf_counter() - start
    prompt = random_prompt(generator, settings.prompt_tokens, settings.seed)
    text = generator.tokenizer.decode(prompt)
    start = time.perf_counter()
    generator.tokenizer.encode(text)
    tokenize_ms = (time.perf_counter() - start) * 1e3

    total_steps = settings.warmup + settings.runs + len(settings.contexts) + int(settings.cold_start)
    bar = tqdm(total=total_steps, desc="bench", unit="run", disable=not progress)
    for _ in range(settings.warmup):
        time_generation(generator, prompt, settings.options(min(settings.new_tokens, 8)))
        bar.update()
    runs = []
    for _ in range(settings.runs):
        runs.append(time_generation(generator, prompt, settings.options(settings.new_tokens)))
        bar.update()
    steps = [ms for run in runs for ms in run.step_ms]
    decode = _summary(steps) if steps else None

    sweep = []
    for context in settings.contexts:
        sweep_prompt = random_prompt(generator, context, settings.seed)
        timing = time_generation(generator, sweep_prompt, settings.options(settings.sweep_tokens))
        sweep.append({"context": context, "decode_ms_per_token": float(np.median(timing.step_ms)),
                      "first_token_ms": timing.first_token_ms})
        bar.update()
    cold = None
    if settings.cold_start:
        cold = cold_start_seconds(package, settings)
        bar.update()
    bar.close()

    manifest = generator.manifest
    return {
        "package": str(package),
        "settings": asdict(settings),
        "machine": machine_info(),
        "model": {"layers": manifest.model.num_layers, "hidden": manifest.model.hidden_size,
                  "vocab": manifest.model.vocab_size, "attention": manifest.graph.attention,
                  "quantization": manifest.quantization.scheme,
                  **(asdict(manifest.quantization.settings) if manifest.quantization.settings else {})},
        "package_mb": sum(e.bytes for e in manifest.files.values()) / 1e6,
        "session_load_s": load_s,
        "tokenize_ms": tokenize_ms,
        "first_token_ms": float(np.median([r.first_token_ms for r in runs])),
        "decode_ms_per_token": decode,
        "tokens_per_s": 1e3 / decode["median"] if decode else None,
        "context_sweep": sweep,
        "cold_start_s": cold,
        "peak_rss_mb": peak_rss_mb(),
    }


def format_report(report: dict[str, Any]) -> str:
    d = report["decode_ms_per_token"]
    m = report["machine"]
    s = report["settings"]
    lines = [
        f"machine        {m.get('cpu', m['machine'])}, {m['logical_cores']} cores, "
        f"{' '.join(m.get('flags', []))}, onnxruntime {m['onnxruntime']}",
        f"package        {report['package']} ({report['model']['quantization']}, "
        f"{report['model']['attention']}, {report['package_mb']:.1f} MB)",
        f"workload       batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens, "
        f"{s['runs']} runs, threads {s['threads'] or 'auto'}, {_sampling(s)}",
        f"session load   {report['session_load_s'] * 1e3:.0f} ms",
        f"tokenize       {report['tokenize_ms']:.2f} ms",
        f"first token    {report['first_token_ms']:.1f} ms (prefill)",
    ]
    if d:
        lines.append(f"decode         {d['median']:.2f} ms/token median, p90 {d['p90']:.2f}, p99 {d['p99']:.2f} "
                     f"({report['tokens_per_s']:.1f} tokens/s)")
    for point in report["context_sweep"]:
        lines.append(f"  context {point['context']:>5}  {point['decode_ms_per_token']:.2f} ms/token")
    if report["cold_start_s"] is not None:
        lines.append(f"cold start     {report['cold_start_s']:.2f} s (fresh process to first token)")
    lines.append(f"peak RSS       {report['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def _sampling(settings: dict[str, Any]) -> str:
    if settings.get("temperature", 0.0) == 0.0:
        return "greedy"
    parts = [f"temperature {settings['temperature']}"]
    if settings["top_k"]:
        parts.append(f"top_k {settings['top_k']}")
    if settings["top_p"] < 1.0:
        parts.append(f"top_p {settings['top_p']}")
    return "sampling: " + ", ".join(parts)


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
