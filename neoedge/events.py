"""What generation and scoring return: step events, whole-text results, usage, scores.

Typed and immutable, so an app can pass them between threads and keep them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class FinishReason(str, Enum):
    """Why a generation ended. Every generation ends with exactly one of these."""

    EOS = "eos"
    """The model produced its end-of-text token (not included in the text or the tokens)."""
    STOP = "stop"
    """A stop string appeared (it is not included in the text)."""
    LENGTH = "length"
    """`max_new_tokens` tokens were generated."""
    CONTEXT = "context"
    """The sequence reached the end of the model's context (policy "stop")."""
    CANCELLED = "cancelled"
    """A cancel handle was triggered (the tokens made so far are kept)."""

    def __str__(self) -> str:
        return self.value


class TopLogprob(NamedTuple):
    token: int
    logprob: float


class TokenEvent(NamedTuple):
    """One step of a streamed generation.

    Each generated token produces one event. `text` is the text this step releases: whole UTF-8
    characters only, and nothing that could still turn into a stop string, so it may be empty while
    text is held back. The last event of a stream has `finish_reason` set; when the generation ends
    without a new token to report (eos, cancel, or text released only at the end), that last event
    has `token` None. (A named tuple: immutable, and cheap enough to make once per token.)
    """

    index: int
    """0-based position of this token among the generated tokens."""
    token: int | None
    text: str
    logprob: float | None = None
    """log p(token) under the model (before temperature and other sampling settings); None unless
    requested with `logprobs=True` (or `top_logprobs` > 0)."""
    top_logprobs: tuple[TopLogprob, ...] = ()
    """The most likely tokens at this step with their log-probs, most likely first (`top_logprobs`)."""
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    """Tokens of the prompt (everything the sequence held before generating, or the appended text)."""
    cached_tokens: int
    """Of those, tokens already in the KV cache: not processed again."""
    new_tokens: int
    """Tokens generated (eos excluded), including those a stop string was then cut from."""
    time_to_first_token_s: float
    """From the call to the first generated token (includes processing the uncached prompt)."""
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens per second after the first one (None with fewer than two tokens)."""
        decode = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else None


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of a whole-text generation call."""

    text: str
    tokens: tuple[int, ...]
    """The generated tokens the sequence kept. After a stop string these end at the last token that
    ended before the stop began, so `text` can end with a few characters that no token here spells:
    the part before the stop of the token it began inside (the sequence holds them re-encoded)."""
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[float, ...] | None = None
    """Per generated token, when requested."""

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class ContinuationScore:
    """Log-probabilities of one continuation given a prompt."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    """log p(token | prompt, earlier continuation tokens), one per continuation token."""
    greedy: bool
    """Whether every continuation token is the model's most likely token at its position."""

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))
