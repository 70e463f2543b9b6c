"""`neoedge bench`: latency of one package on this machine, measured with the runtime's own loop.

Beside prefill and decode it measures what apps embedding the runtime feel: the first-token
latency of each turn of a chat that keeps its cache, memory with 1 and N sequences on one model,
and how quickly a cancel takes effect while decoding and while a long prompt is processed.
Every measurement is a typed dataclass; `render()` is the one text form, `to_dict()` the JSON one.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .events import Completion
from .model import Model
from .options import ContextPolicy, GenerationOptions
from .session import SessionSettings


# Timed generations that reach the context's end just end there.
STOP = ContextPolicy(on_full="stop")


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    session: SessionSettings = field(default_factory=SessionSettings)
    contexts: tuple[int, ...] = ()
    sweep_tokens: int = 32
    seed: int = 0
    cold_start: bool = True
    temperature: float = 0.0
    """Sampling settings of the timed generations (greedy by default)."""
    top_k: int = 0
    top_p: float = 1.0
    chat_turns: int = 0
    """Turns of a chat that keeps its cache (0: skip); each adds `chat_message_tokens` and replies
    with `chat_reply_tokens`."""
    chat_message_tokens: int = 32
    chat_reply_tokens: int = 32
    sequences: tuple[int, ...] = ()
    """Memory with this many sequences on one model, each in a fresh process (e.g. (1, 8))."""
    cancel: bool = False
    """Time from cancel() to the end of a generation: while decoding, and while a long prompt is processed."""

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "runs", "sweep_tokens", "chat_message_tokens",
                     "chat_reply_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "chat_turns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if any(n < 1 for n in self.sequences):
            raise ValueError("sequence counts must be >= 1")
        self.options(1)  # sampling settings are validated here, once

    def options(self, new_tokens: int) -> GenerationOptions:
        return GenerationOptions(max_new_tokens=new_tokens, stop_at_eos=False, temperature=self.temperature,
                                 top_k=self.top_k, top_p=self.top_p, seed=self.seed)

    def check_fits(self, context: int) -> None:
        """Refuse, before anything runs, lengths the model cannot hold."""
        needs = {"--prompt-tokens + --new-tokens": self.prompt_tokens + self.new_tokens}
        needs.update({f"--context {c} + {self.sweep_tokens} tokens": c + self.sweep_tokens for c in self.contexts})
        if self.chat_turns:
            needs["the chat turns"] = self.chat_turns * (self.chat_message_tokens + self.chat_reply_tokens)
        for what, length in needs.items():
            if length > context:
                raise ValueError(f"{what} = {length} tokens does not fit the model's context ({context})")


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        a = np.asarray(values, dtype=np.float64)
        return cls(median=float(np.median(a)), p90=float(np.percentile(a, 90)), p99=float(np.percentile(a, 99)),
                   min=float(a.min()), max=float(a.max()))


@dataclass(frozen=True)
class ContextPoint:
    context: int
    decode_ms_per_token: float
    first_token_ms: float


@dataclass(frozen=True)
class ChatTurns:
    """First-token latency per turn of one chat, with the cache kept, and without it (every turn
    processing the whole history again, as a stateless call does)."""

    message_tokens: int
    reply_tokens: int
    cached_ms: list[float]
    uncached_ms: list[float]

    @property
    def last_over_first(self) -> float:
        return self.cached_ms[-1] / self.cached_ms[0]


@dataclass(frozen=True)
class Memory:
    sequences: int
    model_rss_mb: float
    """Resident memory after loading the model and a first generation (weights, session, buffers)."""
    rss_mb: float
    """Resident memory with all sequences holding their tokens."""
    cache_mb_per_sequence: float

    @property
    def overhead(self) -> float:
        """Measured growth over what the caches occupy (1.0: memory grows by the caches only)."""
        expected = self.sequences * self.cache_mb_per_sequence
        return (self.rss_mb - self.model_rss_mb) / expected if expected else float("nan")


@dataclass(frozen=True)
class CancelLatency:
    decode_ms: Summary
    decode_step_ms: float
    prefill_ms: Summary
    prefill_tokens: int


@dataclass(frozen=True)
class BenchReport:
    package: str
    settings: BenchSettings
    machine: dict[str, Any]
    model: dict[str, Any]
    package_mb: float
    session_load_s: float
    tokenize_ms: float
    first_token_ms: float
    decode_ms_per_token: Summary | None
    context_sweep: list[ContextPoint]
    cold_start_s: float | None
    peak_rss_mb: float
    chat: ChatTurns | None = None
    memory: list[Memory] = field(default_factory=list)
    cancel: CancelLatency | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return 1e3 / self.decode_ms_per_token.median if self.decode_ms_per_token else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tokens_per_s"] = self.tokens_per_s
        if self.chat is not None:
            data["chat"]["last_over_first"] = self.chat.last_over_first
        for entry, memory in zip(data["memory"], self.memory):
            entry["overhead"] = memory.overhead
        return data

    def render(self) -> str:
        d, m, s = self.decode_ms_per_token, self.machine, self.settings
        lines = [
            f"machine        {m.get('cpu', m['machine'])}, {m['logical_cores']} cores, "
            f"{' '.join(m.get('flags', []))}, onnxruntime {m['onnxruntime']}",
            f"package        {self.package} ({self.model['quantization']}, {self.model['attention']}, "
            f"{self.package_mb:.1f} MB)",
            f"workload       batch 1, {s.prompt_tokens}-token prompt, {s.new_tokens} new tokens, "
            f"{s.runs} runs, threads {s.session.intra_threads or 'auto'}, {_sampling(s)}",
            f"session load   {self.session_load_s * 1e3:.0f} ms",
            f"tokenize       {self.tokenize_ms:.2f} ms",
            f"first token    {self.first_token_ms:.1f} ms (prefill)",
        ]
        if d:
            lines.append(f"decode         {d.median:.2f} ms/token median, p90 {d.p90:.2f}, p99 {d.p99:.2f} "
                         f"({self.tokens_per_s:.1f} tokens/s)")
        for point in self.context_sweep:
            lines.append(f"  context {point.context:>5}  {point.decode_ms_per_token:.2f} ms/token, "
                         f"first token {point.first_token_ms:.1f} ms")
        if self.chat is not None:
            c = self.chat
            lines.append(f"chat           {len(c.cached_ms)} turns of {c.message_tokens}-token messages, "
                         f"{c.reply_tokens}-token replies: first token ms per turn, cache kept / re-processed")
            lines.append("  kept         " + " ".join(f"{v:.0f}" for v in c.cached_ms) +
                         f"  (last/first {c.last_over_first:.2f}x)")
            lines.append("  re-processed " + " ".join(f"{v:.0f}" for v in c.uncached_ms))
        for mem in self.memory:
            lines.append(f"memory         {mem.sequences} sequence(s): RSS {mem.rss_mb:.0f} MB = model "
                         f"{mem.model_rss_mb:.0f} MB + {mem.rss_mb - mem.model_rss_mb:.1f} MB "
                         f"(caches: {mem.sequences} x {mem.cache_mb_per_sequence:.1f} MB, "
                         f"growth {mem.overhead:.2f}x the caches)")
        if self.cancel is not None:
            c = self.cancel
            lines.append(f"cancel         decoding: {c.decode_ms.median:.2f} ms median, max {c.decode_ms.max:.2f} "
                         f"(a step is {c.decode_step_ms:.2f} ms); {c.prefill_tokens}-token prompt: "
                         f"{c.prefill_ms.median:.1f} ms median, max {c.prefill_ms.max:.1f}")
        if self.cold_start_s is not None:
            lines.append(f"cold start     {self.cold_start_s:.2f} s (fresh process to first token)")
        lines.append(f"peak RSS       {self.peak_rss_mb:.0f} MB")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class Timings:
    """One generation: time to first token, then the interval between consecutive tokens."""

    first_token_ms: float
    step_ms: list[float] = field(default_factory=list)


def time_generation(model: Model, prompt: list[int], options: GenerationOptions) -> Timings:
    start = time.perf_counter()
    stamps = [start]
    for event in model.sequence(tokens=prompt).stream(options=options):
        if event.token is not None:
            stamps.append(time.perf_counter())
    gaps = np.diff(np.asarray(stamps)) * 1e3
    return Timings(first_token_ms=float(gaps[0]), step_ms=gaps[1:].tolist())


def random_prompt(model: Model, length: int, seed: int) -> list[int]:
    if length >= model.info.context_length:
        raise ValueError(f"prompt of {length} tokens does not fit the context ({model.info.context_length})")
    return np.random.default_rng(seed).integers(0, model.info.vocab_size, size=length).tolist()


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, which starts afresh at exec (ru_maxrss
    would carry the parent's peak into a spawned benchmark process)."""
    value = _proc_status("VmHWM")
    if value is not None:
        return value
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def current_rss_mb() -> float:
    value = _proc_status("VmRSS")
    return value if value is not None else peak_rss_mb()


def _proc_status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


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


def _settings_code(settings: SessionSettings) -> str:
    return (f"SessionSettings(intra_threads={settings.intra_threads}, spinning={settings.spinning}, "
            f"prepack={settings.prepack})")


def cold_start_seconds(package: Path, settings: BenchSettings) -> float:
    """A fresh Python process: import, load the package, prefill, first token. Files are in page cache."""
    code = (
        "from neoedge import Model, SessionSettings\n"
        "from neoedge.bench import random_prompt\n"
        f"m = Model({str(package)!r}, settings={_settings_code(settings.session)})\n"
        f"p = random_prompt(m, {settings.prompt_tokens}, {settings.seed})\n"
        "m.sequence(tokens=p).generate(max_new_tokens=1, stop_at_eos=False)\n"
        "print('ready', flush=True)\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0 or "ready" not in result.stdout:
        raise RuntimeError(f"cold-start process failed: {result.stderr.strip()[-500:]}")
    return elapsed


def measure_chat(model: Model, settings: BenchSettings) -> ChatTurns:
    rng = np.random.default_rng(settings.seed)
    vocab, eos = model.info.vocab_size, model.info.eos_token_id
    messages = [[int(t) for t in rng.integers(0, vocab, settings.chat_message_tokens) if t != eos]
                for _ in range(settings.chat_turns)]
    options = settings.options(settings.chat_reply_tokens)
    chat = model.sequence()
    cached, uncached = [], []
    for message in messages:
        history = list(chat.tokens)
        chat.append(tokens=message)
        reply: Completion = chat.generate(options=options)
        cached.append(reply.usage.time_to_first_token_s * 1e3)
        fresh = model.sequence(tokens=history + message).generate(options=options)
        uncached.append(fresh.usage.time_to_first_token_s * 1e3)
    return ChatTurns(settings.chat_message_tokens, settings.chat_reply_tokens, cached, uncached)


def measure_memory(package: Path, settings: BenchSettings, count: int) -> Memory:
    """In a fresh process: RSS after loading and one generation, then with `count` sequences each
    holding a prompt and its reply."""
    code = f"""
import json
from neoedge import Model, SessionSettings
from neoedge.bench import current_rss_mb, random_prompt
m = Model({str(package)!r}, settings={_settings_code(settings.session)})
opts = dict(max_new_tokens={settings.new_tokens}, stop_at_eos=False)
warm = m.sequence(tokens=random_prompt(m, {settings.prompt_tokens}, 99))
warm.generate(**opts)
del warm
base = current_rss_mb()
seqs = []
for i in range({count}):
    s = m.sequence(tokens=random_prompt(m, {settings.prompt_tokens}, i))
    s.generate(**opts)
    seqs.append(s)
print(json.dumps({{"base": base, "rss": current_rss_mb(), "cache": seqs[0].cache_bytes() / 1e6}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory process failed: {result.stderr.strip()[-500:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return Memory(sequences=count, model_rss_mb=data["base"], rss_mb=data["rss"],
                  cache_mb_per_sequence=data["cache"])


def measure_cancel(model: Model, settings: BenchSettings, repeats: int = 7) -> CancelLatency:
    """cancel() from another thread at a random moment; time until the stream has ended."""
    rng = np.random.default_rng(settings.seed)
    prompt = random_prompt(model, settings.prompt_tokens, settings.seed)
    decode, steps = [], []
    for _ in range(repeats):
        stream = model.sequence(tokens=prompt, policy=STOP).stream(options=settings.options(400))
        events = iter(stream)
        next(events)
        stamps = [time.perf_counter()]
        for _ in range(8):
            next(events)
            stamps.append(time.perf_counter())
        steps.append(float(np.median(np.diff(stamps))) * 1e3)
        timer = threading.Timer(float(rng.uniform(0, steps[-1] / 1e3)), stream.cancel)
        timer.start()
        timer.join()
        fired = time.perf_counter()
        for _ in events:
            pass
        decode.append((time.perf_counter() - fired) * 1e3)
    length = min(1900, model.info.context_length - 2)
    long_prompt = random_prompt(model, length, settings.seed)
    prefill = []
    for _ in range(repeats):
        stream = model.sequence(tokens=long_prompt, policy=STOP).stream(options=settings.options(4))
        started = threading.Event()
        ended: list[float] = []

        def consume() -> None:
            started.set()
            for _ in stream:
                pass
            ended.append(time.perf_counter())

        worker = threading.Thread(target=consume)
        worker.start()
        started.wait()
        time.sleep(0.05 + float(rng.uniform(0, 0.05)))
        fired = time.perf_counter()
        stream.cancel()
        worker.join()
        prefill.append((ended[0] - fired) * 1e3)
    return CancelLatency(decode_ms=Summary.of(decode), decode_step_ms=float(np.median(steps)),
                         prefill_ms=Summary.of(prefill), prefill_tokens=length)


def run_bench(package: str | os.PathLike[str], settings: BenchSettings, *, progress: bool = False) -> BenchReport:
    from tqdm.auto import tqdm

    package = Path(package)
    start = time.perf_counter()
    model = Model(package, settings=settings.session)
    load_s = time.perf_counter() - start
    settings.check_fits(model.info.context_length)
    prompt = random_prompt(model, settings.prompt_tokens, settings.seed)
    text = model.tokenizer.decode(prompt)
    start = time.perf_counter()
    model.tokenizer.encode(text)
    tokenize_ms = (time.perf_counter() - start) * 1e3

    total_steps = (settings.warmup + settings.runs + len(settings.contexts) + int(settings.cold_start)
                   + int(bool(settings.chat_turns)) + len(settings.sequences) + int(settings.cancel))
    with tqdm(total=total_steps, desc="bench", unit="run", disable=not progress, leave=False) as bar:
        for _ in range(settings.warmup):
            time_generation(model, prompt, settings.options(min(settings.new_tokens, 8)))
            bar.update()
        runs = []
        for _ in range(settings.runs):
            runs.append(time_generation(model, prompt, settings.options(settings.new_tokens)))
            bar.update()
        steps = [ms for run in runs for ms in run.step_ms]
        sweep = []
        for context in settings.contexts:
            timing = time_generation(model, random_prompt(model, context, settings.seed),
                                     settings.options(settings.sweep_tokens))
            sweep.append(ContextPoint(context, float(np.median(timing.step_ms)), timing.first_token_ms))
            bar.update()
        chat = None
        if settings.chat_turns:
            chat = measure_chat(model, settings)
            bar.update()
        memory = []
        for count in settings.sequences:
            memory.append(measure_memory(package, settings, count))
            bar.update()
        cancel = None
        if settings.cancel:
            cancel = measure_cancel(model, settings)
            bar.update()
        cold = None
        if settings.cold_start:
            cold = cold_start_seconds(package, settings)
            bar.update()

    manifest = model.manifest
    return BenchReport(
        package=str(package), settings=settings, machine=machine_info(),
        model={"layers": manifest.model.num_layers, "hidden": manifest.model.hidden_size,
               "vocab": manifest.model.vocab_size, "attention": manifest.graph.attention,
               "quantization": manifest.quantization.scheme, **manifest.quantization.settings},
        package_mb=sum(e.bytes for e in manifest.files.values()) / 1e6, session_load_s=load_s,
        tokenize_ms=tokenize_ms, first_token_ms=float(np.median([r.first_token_ms for r in runs])),
        decode_ms_per_token=Summary.of(steps) if steps else None, context_sweep=sweep, cold_start_s=cold,
        peak_rss_mb=peak_rss_mb(), chat=chat, memory=memory, cancel=cancel)


def _sampling(settings: BenchSettings) -> str:
    if settings.temperature == 0.0:
        return "greedy"
    parts = [f"temperature {settings.temperature}"]
    if settings.top_k:
        parts.append(f"top_k {settings.top_k}")
    if settings.top_p < 1.0:
        parts.append(f"top_p {settings.top_p}")
    return "sampling: " + ", ".join(parts)
