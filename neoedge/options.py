"""Generation options: one small frozen object, validated once when it is made."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterable, Literal

from .errors import OptionsError

MAX_TOP_LOGPROBS = 20

# Sampling computes logits / temperature in float32. Below this the quotient of an ordinary logit
# can overflow to inf (1e-45 would: inf - inf is nan), and any temperature this small already
# picks the argmax except between logits equal to ~1e-3: ask for greedy (0) instead.
MIN_TEMPERATURE = 1e-3
# The penalty multiplies or divides logits before the temperature does; within these bounds the
# two together scale a logit by at most 1e6, far from float32's range.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-3, 1e3
# Stop strings are matched against the text after every token: their number and length bound
# that per-token work.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


@dataclass(frozen=True)
class GenerationOptions:
    """How to pick the next tokens. Invalid values raise OptionsError (a ValueError); nothing is
    silently clamped."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens (generation also ends at eos, a stop string or the context)."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling (>= 1e-3)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 disables."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style, as transformers does);
    between 1e-3 and 1e3."""
    seed: int | None = None
    """Seed of the sampler's random generator, for reproducible sampling."""
    stop: tuple[str, ...] = ()
    """Generation ends when one of these strings appears; the stop text is not returned
    (at most 16 strings of at most 256 characters)."""
    stop_at_eos: bool = True
    """End at the end-of-sequence token (benchmarks turn this off to produce every token)."""
    logprobs: bool = False
    """Report each generated token's log-probability under the model (costs ~2% per token)."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives at each step, with their log-probs (implies logprobs)."""

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_float("temperature", self.temperature, minimum=0.0)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            raise OptionsError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got "
                               f"{self.temperature!r}: a smaller one overflows float32 and would "
                               "pick the argmax anyway")
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p, minimum=0.0, open_minimum=True, maximum=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, minimum=0.0, open_minimum=True)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise OptionsError(f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and "
                               f"{MAX_REPETITION_PENALTY:g}, got {self.repetition_penalty!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        object.__setattr__(self, "stop", _check_stop(self.stop))
        for name in ("stop_at_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_int("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise OptionsError(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    @classmethod
    def merged(cls, defaults: Any, overrides: Mapping[str, Any]) -> GenerationOptions:
        """Options from a package's defaults (a manifest's GenerationDefaults, or a mapping),
        overridden by what the caller set (None = unset). An unknown name is an error, never dropped."""
        if hasattr(defaults, "as_options"):
            defaults = defaults.as_options()
        known = {f.name for f in fields(cls)}
        for source, names in (("package default", defaults), ("generation option", overrides)):
            unknown = set(names) - known
            if unknown:
                raise OptionsError(f"unknown {source}(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in defaults.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ContextPolicy:
    """What a sequence does when it needs more positions than the model's context has.

    GPT-Neo's positions are absolute (learned position embeddings added at the input), so a full
    cache cannot simply slide: every kept token's keys and values depend on its position.
    """

    on_full: Literal["error", "stop", "shift"] = "error"
    """"error": raise ContextFullError (a generation's partial result rides on the exception);
    "stop": end the generation with finish reason "context";
    "shift": keep the first `keep` tokens and the most recent ones (half the context in all), and
    run them again from position 0 (costs a prefill of about half the context), then go on."""
    keep: int = 0
    """Tokens at the start that "shift" never drops (a system prompt, say)."""

    def __post_init__(self) -> None:
        if self.on_full not in ("error", "stop", "shift"):
            raise OptionsError(f"on_full must be 'error', 'stop' or 'shift', got {self.on_full!r}")
        _check_int("keep", self.keep, minimum=0)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise OptionsError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, minimum: float, open_minimum: bool = False,
                 maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionsError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (open_minimum and value == minimum):
        bound = ">" if open_minimum else ">="
        raise OptionsError(f"{name} must be {bound} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise OptionsError(f"{name} must be <= {maximum}, got {value}")


def _check_stop(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Iterable) or isinstance(stop, (bytes, Mapping)):
        raise OptionsError(f"stop must be a sequence of strings, got {type(stop).__name__}")
    result = []
    for text in stop:
        if not isinstance(text, str) or not text:
            raise OptionsError(f"stop strings must be non-empty strings, got {text!r}")
        if len(text) > MAX_STOP_CHARS:
            raise OptionsError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of "
                               f"{len(text)}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate: generated text can never contain it
                raise OptionsError(f"stop string {text!r} is not valid text: character {exc.start} is not "
                                   "Unicode") from None
        result.append(text)
        if len(result) > MAX_STOP_STRINGS:
            raise OptionsError(f"at most {MAX_STOP_STRINGS} stop strings, got more")
    return tuple(result)
