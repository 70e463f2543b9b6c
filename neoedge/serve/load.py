"""Load against a running server, with the standard library only: a `neoedge serve` process, and
clients streaming completions from it, timing each token as it arrives.

The clients run in this process and the server in its own, so that the clients' Python work
does not share the server's interpreter (and its lock) — as with real clients.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Timing:
    """One streamed completion, as its client saw it (perf_counter seconds)."""

    sent: float
    first: float
    """When the first token arrived (the server streams one chunk per token)."""
    last: float
    """When the last token arrived."""
    tokens: int
    """Tokens generated (the server's usage count)."""

    @property
    def first_token_ms(self) -> float:
        return (self.first - self.sent) * 1e3

    @property
    def decode_ms_per_token(self) -> float | None:
        return (self.last - self.first) * 1e3 / (self.tokens - 1) if self.tokens > 1 else None


class ServerProcess:
    """`neoedge serve PACKAGE --port 0 ARGS...` in a child process, for a `with` block.

    It is ready once it prints the address it listens on; leaving the block interrupts it (SIGINT,
    a clean shutdown) and waits for it."""

    def __init__(self, package: str | Path, args: Sequence[str] = (), *, start_timeout_s: float = 300.0) -> None:
        self.command = [sys.executable, "-m", "neoedge.cli", "serve", str(package), "--port", "0", *args]
        self._timeout = start_timeout_s
        self._process: subprocess.Popen[str] | None = None
        self.url = ""
        self._log: list[str] = []

    def __enter__(self) -> ServerProcess:
        self._process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        found = threading.Event()

        def read() -> None:  # keeps draining stderr, so that the server never blocks on a full pipe
            assert self._process is not None and self._process.stderr is not None
            for line in self._process.stderr:
                self._log.append(line)
                if line.startswith("serving ") and " on http://" in line and not found.is_set():
                    self.url = line.split(" on ", 1)[1].split(" ", 1)[0].removesuffix("/v1")
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(self._timeout)
        if not self.url:
            self.__exit__()
            raise RuntimeError("the server did not start: " + "".join(self._log[-5:]).strip())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def stream_completion(url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 600.0) -> Timing:
    """POST a streamed /v1/completions request and time its chunks."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body=payload, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
        first = last = None
        tokens = 0
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:  # one chunk per token
                last = time.perf_counter()
                first = first or last
    finally:
        conn.close()
    if first is None or last is None:
        raise RuntimeError("the stream carried no tokens")
    return Timing(sent=sent, first=first, last=last, tokens=tokens)


def run_clients(url: str, bodies: Sequence[dict[str, Any]], *, concurrent: bool,
                api_key: str | None = None) -> tuple[float, list[Timing]]:
    """All requests at once (one client thread each) or one after another; (wall seconds, timings)."""
    timings: list[Timing | None] = [None] * len(bodies)
    errors: list[BaseException] = []
    if not concurrent:
        for i, body in enumerate(bodies):
            timings[i] = stream_completion(url, body, api_key=api_key)
    else:
        gate = threading.Barrier(len(bodies))

        def client(i: int) -> None:
            try:
                gate.wait()
                timings[i] = stream_completion(url, bodies[i], api_key=api_key)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    done = [t for t in timings if t is not None]
    return max(t.last for t in done) - min(t.sent for t in done), done
