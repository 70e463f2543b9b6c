"""What a server is allowed to do: where it listens, who may call it, how big a request may be."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..chat import ChatFormat
from ..engine import EngineSettings


@dataclass(frozen=True)
class Limits:
    """Bounds on one HTTP request. A request beyond any of them is refused (400, or 413 for the body)."""

    max_body_bytes: int = 1_000_000
    """Largest request body accepted."""
    max_prompt_tokens: int | None = None
    """Longest prompt (or rendered chat transcript), in tokens; None: the model's context minus one."""
    max_tokens: int | None = None
    """Largest `max_tokens` a request may ask for; None: the model's context."""
    max_choices: int = 16
    """Most generations one request may start (`n` times the number of prompts)."""
    max_stop: int = 4
    """Most stop strings per request (OpenAI's limit)."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "max_choices", "max_stop"):
            value = getattr(self, name)
            if value is None and name in ("max_prompt_tokens", "max_tokens"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    """Where to listen. Only loopback by default: another address exposes the model to the network."""
    port: int = 8000
    """0 picks a free port (the server reports the one it got)."""
    api_key: str | None = None
    """When set, every /v1 request must carry `Authorization: Bearer <api_key>`."""
    model_name: str | None = None
    """The model's id in /v1/models and in responses; None: the package directory's name."""
    engine: EngineSettings = field(default_factory=EngineSettings)
    limits: Limits = field(default_factory=Limits)
    chat_format: ChatFormat = field(default_factory=ChatFormat)
    access_log: bool = False
    """Log one line per HTTP request (uvicorn's access log)."""
    graceful_shutdown_s: float = 5.0
    """On shutdown, how long running requests may finish before they are cut off."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or unset)")
        # HTTP header values are bytes that clients send as ASCII (httpx refuses anything else), and
        # a key with spaces at its ends would be compared after the header's are stripped.
        if self.api_key is not None and (not self.api_key.isascii() or not self.api_key.isprintable()
                                         or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be printable ASCII without surrounding spaces: an HTTP client "
                             "cannot send other characters in a header")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ValueError("model_name must be a non-empty string (or unset)")
        if not self.graceful_shutdown_s >= 0:
            raise ValueError(f"graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s!r}")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
