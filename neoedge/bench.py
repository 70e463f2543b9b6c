"""`neoedge bench`: latency of one package on this machine, measured with the runtime's own loop.

Beside prefill and decode it measures what apps embedding the runtime feel: the first-token
latency of each turn of a chat that keeps its cache, memory with 1 and N sequences on one model,
and how quickly a cancel takes effect while decoding and while a long prompt is processed.
With batch sizes it measures the continuous-batching engine (B requests at once), batch 1 through
the engine against the direct API, and N concurrent clients through a `neoedge serve` process.
Every measurement is a typed dataclass; `render()` is the one text form, `to_dict()` the JSON one.
"""

from __future__ import annotations

import asyncio
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

from .engine import Engine, EngineSettings, Request
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
    batches: tuple[int, ...] = ()
    """Engine batch sizes: for each B, an engine with max_batch=B runs B requests at once (e.g.
    (1, 2, 4, 8, 16)); batch 1 is also compared with the direct API in paired runs."""
    clients: int = 0
    """Concurrent clients through a `neoedge serve` process (0: skip), against the same requests
    one at a time; needs the [serve] extra."""

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
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise ValueError("batch sizes must be integers >= 1")
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 0:
            raise ValueError(f"clients must be an integer >= 0, got {self.clients!r}")
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
        if self.cancel:
            needs[f"--prompt-tokens + the cancel measurement's {CANCEL_ROOM} tokens"] = self.prompt_tokens + CANCEL_ROOM
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
class Spread:
    """One figure across requests: median, 95th percentile, worst."""

    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        a = np.asarray(values, dtype=np.float64)
        return cls(p50=float(np.median(a)), p95=float(np.percentile(a, 95)), max=float(a.max()))


@dataclass(frozen=True)
class BatchPoint:
    """B requests at once through an engine with B rows (each run: B fresh prompts)."""

    batch: int
    tokens_per_s: float
    """All requests' generated tokens / wall time from submitting them to the last token (median run)."""
    first_token_ms: Spread
    """From submit to each request's first token (prefill included), over every request of every run."""
    decode_ms_per_token: Spread
    """Each request's time between its first and last token / its tokens after the first."""
    rss_growth_mb: float
    """Resident memory after the runs minus before the engine was made."""
    cache_mb: float
    """What the B rows' KV caches hold at the end (B x one sequence's cache of prompt + new tokens)."""
    paired_over_batch_1: float
    """Median over runs of this run's tokens/s / a batch-1 run's next to it (same prompts' first,
    alternating which goes first): the ratio of two medians taken minutes apart moved with the
    machine's speed (a VM's drifts by tens of percent: 2.40x and 3.90x in two runs of one command)."""


@dataclass(frozen=True)
class EngineOverhead:
    """Batch 1 through the engine vs the direct API (a sequence's stream), in alternating pairs."""

    pairs: int
    direct_ms_per_token: float
    engine_ms_per_token: float
    direct_first_token_ms: float
    engine_first_token_ms: float

    @property
    def ratio(self) -> float:
        return self.engine_ms_per_token / self.direct_ms_per_token


@dataclass(frozen=True)
class ServedLoad:
    """A set of streamed requests through a server, as the clients timed them."""

    requests: int
    tokens_per_s: float
    """Generated tokens / wall time from the first request sent to the last token received (median run)."""
    first_token_ms: Spread
    decode_ms_per_token: Spread


@dataclass(frozen=True)
class ServedClients:
    """N clients at once through `neoedge serve` (max batch N) vs the same N requests one at a time."""

    clients: int
    concurrent: ServedLoad
    one_at_a_time: ServedLoad

    @property
    def speedup(self) -> float:
        return self.concurrent.tokens_per_s / self.one_at_a_time.tokens_per_s


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
    kernels: str = ""
    """Which kernels ran the weight MatMuls (neoedge's native path, or onnxruntime's stock, and why)."""
    chat: ChatTurns | None = None
    memory: list[Memory] = field(default_factory=list)
    cancel: CancelLatency | None = None
    batches: list[BatchPoint] = field(default_factory=list)
    engine_overhead: EngineOverhead | None = None
    served: ServedClients | None = None

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
        one = next((b for b in self.batches if b.batch == 1), None)
        for entry, point in zip(data["batches"], self.batches):
            entry["over_batch_1"] = point.tokens_per_s / one.tokens_per_s if one else None
        if self.engine_overhead is not None:
            data["engine_overhead"]["ratio"] = self.engine_overhead.ratio
        if self.served is not None:
            data["served"]["speedup"] = self.served.speedup
        return data

    def render(self) -> str:
        d, m, s = self.decode_ms_per_token, self.machine, self.settings
        lines = [
            f"machine        {m.get('cpu', m['machine'])}, {m['logical_cores']} cores, "
            f"{' '.join(m.get('flags', []))}, onnxruntime {m['onnxruntime']}",
            f"package        {self.package} ({self.model['quantization']}, {self.model['attention']}, "
            f"{self.package_mb:.1f} MB)",
            f"kernels        {self.kernels}",
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
        if self.batches:
            one = next((b for b in self.batches if b.batch == 1), None)
            lines.append(f"batches        engine, B requests at once ({s.prompt_tokens}-token prompts, "
                         f"{s.new_tokens} new tokens), median of {s.runs} runs")
            lines.append("      B  tokens/s  vs B=1  paired  first token ms p50 / p95  decode ms/token p50 / p95  "
                         "RSS +MB (caches)")
            for b in self.batches:
                ratio = f"{b.tokens_per_s / one.tokens_per_s:5.2f}x" if one else "     -"
                lines.append(f"  {b.batch:>5}  {b.tokens_per_s:8.1f}  {ratio}  {b.paired_over_batch_1:5.2f}x  "
                             f"{b.first_token_ms.p50:12.1f} / {b.first_token_ms.p95:<9.1f}  "
                             f"{b.decode_ms_per_token.p50:10.2f} / {b.decode_ms_per_token.p95:<10.2f}  "
                             f"{b.rss_growth_mb:6.1f} ({b.cache_mb:.1f})")
        if self.engine_overhead is not None:
            e = self.engine_overhead
            lines.append(f"engine batch 1 {e.engine_ms_per_token:.2f} ms/token vs direct {e.direct_ms_per_token:.2f} "
                         f"({e.ratio:.3f}x, {e.pairs} paired runs); first token {e.engine_first_token_ms:.1f} vs "
                         f"{e.direct_first_token_ms:.1f} ms")
        if self.served is not None:
            v = self.served
            for name, load in (("concurrent", v.concurrent), ("one at a time", v.one_at_a_time)):
                lines.append(f"served {name:<14}{load.requests} requests: {load.tokens_per_s:.1f} tokens/s, first "
                             f"token p50 {load.first_token_ms.p50:.1f} / p95 {load.first_token_ms.p95:.1f} ms, "
                             f"decode p50 {load.decode_ms_per_token.p50:.2f} / p95 {load.decode_ms_per_token.p95:.2f} "
                             "ms/token")
            lines.append(f"served         {v.clients} concurrent clients: {v.speedup:.2f}x the tokens/s of one at a time")
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


def settled_rss_mb() -> float:
    """Resident memory once the C allocator has handed its free pages back (glibc's malloc_trim):
    without that, an engine made after a larger one reused the pages the first had freed, and its
    growth read below its own caches (11 MB for a batch-16 engine's 75 MB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may include reusable free memory
        pass
    return current_rss_mb()


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
            f"prepack={settings.prepack}, kernels={settings.kernels!r})")


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


# Tokens the cancel measurement generates at most: 9 timed steps, then the cancel lands within one.
CANCEL_ROOM = 32


def measure_cancel(model: Model, settings: BenchSettings, repeats: int = 7) -> CancelLatency:
    """cancel() from another thread at a random moment; time until the stream has ended."""
    rng = np.random.default_rng(settings.seed)
    prompt = random_prompt(model, settings.prompt_tokens, settings.seed)
    decode, steps = [], []
    for _ in range(repeats):
        stream = model.sequence(tokens=prompt, policy=STOP).stream(options=settings.options(CANCEL_ROOM))
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


def _timed_requests(engine: Engine, prompts: list[list[int]], options: GenerationOptions
                    ) -> tuple[float, list[tuple[float, float, int]]]:
    """Submit all prompts at once and follow their events on one asyncio loop (as the server does):
    (submit time, [(first token time, last token time, tokens)])."""
    async def consume(request: Request) -> tuple[float, float, int]:
        first = last = 0.0
        count = 0
        async for event in request.events():
            if event.token is not None:
                last = time.perf_counter()
                first = first or last
                count += 1
        return first, last, count

    async def main() -> tuple[float, list[tuple[float, float, int]]]:
        start = time.perf_counter()
        requests = [engine.submit(p, options) for p in prompts]
        return start, list(await asyncio.gather(*(consume(r) for r in requests)))

    return asyncio.run(main())


def _cache_mb(model: Model, tokens: int, seed: int) -> float:
    seq = model.sequence(tokens=random_prompt(model, tokens, seed))
    seq.process()
    return seq.cache_bytes() / 1e6


def measure_batch(model: Model, settings: BenchSettings, batch: int, single: Engine | None = None) -> BatchPoint:
    """An engine with `batch` rows, `batch` requests at once, `settings.runs` times; each run paired
    with one of the same requests' first through `single` (an engine of one row), when given."""
    def prompts(run: int) -> list[list[int]]:
        return [random_prompt(model, settings.prompt_tokens, settings.seed + 1000 * (run + 1) + i) for i in range(batch)]

    def rate(engine: Engine, requests: list[list[int]]) -> tuple[float, list[tuple[float, float, int]]]:
        start, results = _timed_requests(engine, requests, settings.options(settings.new_tokens))
        return sum(n for _, _, n in results) / (max(last for _, last, _ in results) - start), \
            [(first - start, last - start, n) for first, last, n in results]

    cache_mb = batch * _cache_mb(model, settings.prompt_tokens + settings.new_tokens, settings.seed)
    before = settled_rss_mb()
    rates, ratios, firsts, decodes = [], [], [], []
    with Engine(model, EngineSettings(max_batch=batch, max_queue=batch)) as engine:
        for run in range(settings.warmup):
            _timed_requests(engine, prompts(settings.runs + run), settings.options(min(settings.new_tokens, 8)))
        for run in range(settings.runs):
            alone = None
            if single is not None and run % 2 == 1:
                alone, _ = rate(single, prompts(run)[:1])
            tokens_per_s, results = rate(engine, prompts(run))
            if single is not None and run % 2 == 0:
                alone, _ = rate(single, prompts(run)[:1])
            rates.append(tokens_per_s)
            ratios.append(tokens_per_s / alone if alone else 1.0)
            firsts += [first * 1e3 for first, _, _ in results]
            decodes += [(last - first) * 1e3 / (n - 1) for first, last, n in results if n > 1]
        after = current_rss_mb()
    return BatchPoint(batch=batch, tokens_per_s=float(np.median(rates)), first_token_ms=Spread.of(firsts),
                      decode_ms_per_token=Spread.of(decodes), rss_growth_mb=after - before, cache_mb=cache_mb,
                      paired_over_batch_1=float(np.median(ratios)))


def measure_engine_overhead(model: Model, settings: BenchSettings) -> EngineOverhead:
    """The same generation alone through the engine and through a sequence, alternating which goes first."""
    prompt = random_prompt(model, settings.prompt_tokens, settings.seed)
    options = settings.options(settings.new_tokens)
    pairs = 2 * settings.runs
    direct_steps: list[float] = []
    engine_steps: list[float] = []
    direct_first, engine_first = [], []
    with Engine(model, EngineSettings(max_batch=1, max_queue=1)) as engine:
        def through_engine() -> None:
            start = time.perf_counter()
            stamps = [start]
            for event in engine.submit(prompt, options):
                if event.token is not None:
                    stamps.append(time.perf_counter())
            gaps = np.diff(np.asarray(stamps)) * 1e3
            engine_first.append(float(gaps[0]))
            engine_steps.extend(gaps[1:].tolist())

        def direct() -> None:
            timing = time_generation(model, prompt, options)
            direct_first.append(timing.first_token_ms)
            direct_steps.extend(timing.step_ms)

        for _ in range(settings.warmup):
            engine.submit(prompt, settings.options(min(settings.new_tokens, 8))).result()
            time_generation(model, prompt, settings.options(min(settings.new_tokens, 8)))
        for i in range(pairs):
            for run in ((direct, through_engine) if i % 2 == 0 else (through_engine, direct)):
                run()
    return EngineOverhead(pairs=pairs, direct_ms_per_token=float(np.median(direct_steps)),
                          engine_ms_per_token=float(np.median(engine_steps)),
                          direct_first_token_ms=float(np.median(direct_first)),
                          engine_first_token_ms=float(np.median(engine_first)))


def measure_served(package: Path, model: Model, settings: BenchSettings, clients: int) -> ServedClients:
    """`neoedge serve` in a child process with max batch `clients`; the clients stream from this one."""
    from .serve.load import ServerProcess, run_clients

    session = settings.session
    args = ["--threads", str(session.intra_threads), "--spinning" if session.spinning else "--no-spinning",
            "--prepack" if session.prepack else "--no-prepack", "--max-batch", str(clients),
            "--max-queue", str(max(64, clients))]

    def bodies(run: int, new_tokens: int) -> list[dict[str, Any]]:
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                    "seed": settings.seed}
        return [{"prompt": random_prompt(model, settings.prompt_tokens, settings.seed + 1000 * (run + 1) + i),
                 "max_tokens": new_tokens, "ignore_eos": True, **sampling} for i in range(clients)]

    def load(results: list[tuple[float, list[Any]]]) -> ServedLoad:
        timings = [t for _, run in results for t in run]
        return ServedLoad(requests=clients,
                          tokens_per_s=float(np.median([sum(t.tokens for t in run) / wall for wall, run in results])),
                          first_token_ms=Spread.of([t.first_token_ms for t in timings]),
                          decode_ms_per_token=Spread.of([t.decode_ms_per_token for t in timings
                                                         if t.decode_ms_per_token is not None]))

    concurrent, one_at_a_time = [], []
    with ServerProcess(package, args) as server:
        for run in range(settings.warmup):
            run_clients(server.url, bodies(settings.runs + run, min(settings.new_tokens, 8)), concurrent=True)
        for run in range(settings.runs):  # the same requests both ways, alternating which goes first
            order = [(concurrent, True), (one_at_a_time, False)]
            for results, together in (order if run % 2 == 0 else order[::-1]):
                results.append(run_clients(server.url, bodies(run, settings.new_tokens), concurrent=together))
    return ServedClients(clients=clients, concurrent=load(concurrent), one_at_a_time=load(one_at_a_time))


PROGRESS_FORMAT = "{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}"


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
                   + int(bool(settings.chat_turns)) + len(settings.sequences) + int(settings.cancel)
                   + len(settings.batches) + int(1 in settings.batches) + int(bool(settings.clients)))
    # No rate or ETA: the steps differ by orders of magnitude (an 8-token warm-up, a fresh process
    # for the cold start), so any estimate from the steps done so far would mislead.
    with tqdm(total=total_steps, desc="bench", unit="run", disable=not progress, leave=False,
              bar_format=PROGRESS_FORMAT) as bar:
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
        batches = []
        if settings.batches:
            # One row's engine, made first (its cache is in every batch's "before"), runs the batch-1
            # half of each pair.
            with Engine(model, EngineSettings(max_batch=1, max_queue=1)) as single:
                for batch in settings.batches:
                    batches.append(measure_batch(model, settings, batch, single if batch > 1 else None))
                    bar.update()
        overhead = None
        if 1 in settings.batches:
            overhead = measure_engine_overhead(model, settings)
            bar.update()
        served = None
        if settings.clients:
            served = measure_served(package, model, settings, settings.clients)
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
               "quantization": manifest.quantization.scheme,
               **(asdict(manifest.quantization.settings) if manifest.quantization.settings else {})},
        package_mb=sum(e.bytes for e in manifest.files.values()) / 1e6, session_load_s=load_s,
        tokenize_ms=tokenize_ms, first_token_ms=float(np.median([r.first_token_ms for r in runs])),
        decode_ms_per_token=Summary.of(steps) if steps else None, context_sweep=sweep, cold_start_s=cold,
        peak_rss_mb=peak_rss_mb(), kernels=model.kernels.describe(), chat=chat, memory=memory, cancel=cancel, batches=batches,
        engine_overhead=overhead, served=served)


def _sampling(settings: BenchSettings) -> str:
    if settings.temperature == 0.0:
        return "greedy"
    parts = [f"temperature {settings.temperature}"]
    if settings.top_k:
        parts.append(f"top_k {settings.top_k}")
    if settings.top_p < 1.0:
        parts.append(f"top_p {settings.top_p}")
    return "sampling: " + ", ".join(parts)
