"""The decode loop: from a sequence's next-token logits to step events, one token at a time.

`Stream` is what `Sequence.stream()` returns: an iterator of TokenEvent with a thread-safe
`cancel()`. The loop itself (`_events`) works on a `Cursor`, the narrow interface a sequence gives
it: logits of the next position, append-and-run one token, rewind, make room when the context fills.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .cancel import CancelToken
from .errors import ContextFullError, SequenceBusyError
from .events import Completion, FinishReason, TokenEvent, TopLogprob, Usage
from .options import GenerationOptions
from .sampling import Sampler
from .stopping import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside the loop when the cancel token fired during a forward pass."""


class Cursor(Protocol):
    """What the decode loop needs from a sequence. Every method may raise Cancelled."""

    @property
    def length(self) -> int:
        """Tokens the sequence holds."""

    @property
    def room(self) -> int:
        """Tokens that can still be added before the context is full."""

    def prompt_usage(self) -> tuple[int, int]:
        """(prompt tokens, of which already in the cache) at the start of a generation."""

    def next_logits(self) -> np.ndarray:
        """Logits [vocab] of the position after the last token (processing pending tokens first)."""

    def push(self, token: int) -> None:
        """Add a generated token (processed lazily, by the next next_logits)."""

    def truncate(self, length: int, text: str) -> None:
        """Drop tokens after `length`, then append `text` (used to cut a stop string out)."""

    def make_room(self) -> bool:
        """The context is full: apply the sequence's policy. True if room was made (shift);
        False to stop (policy "stop"); raises ContextFullError-like errors for policy "error"."""

    def context_tokens(self) -> np.ndarray:
        """The token ids the sequence holds (for the repetition penalty)."""


@dataclass
class _Progress:
    """What a generation has produced so far, for its Completion."""

    text: list[str]
    tokens: list[int]
    logprobs: list[float]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started: float = 0.0
    first_token: float | None = None
    finish: FinishReason | None = None

    def completion(self, with_logprobs: bool) -> Completion:
        now = time.perf_counter()
        first = self.first_token if self.first_token is not None else now
        return Completion(
            text="".join(self.text), tokens=tuple(self.tokens),
            finish_reason=self.finish or FinishReason.CANCELLED,
            usage=Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                        new_tokens=len(self.tokens), time_to_first_token_s=first - self.started,
                        total_s=now - self.started),
            logprobs=tuple(self.logprobs) if with_logprobs else None)


class _Logprobs:
    """log-softmax of one position's logits, for the chosen token and the top alternatives."""

    def __init__(self, vocab: int, top: int) -> None:
        self._work = np.empty(vocab, np.float32)
        self._top = top

    def __call__(self, logits: np.ndarray, token: int) -> tuple[float, tuple[TopLogprob, ...]]:
        peak = float(logits.max())
        np.subtract(logits, peak, out=self._work)
        np.exp(self._work, out=self._work)
        normaliser = peak + math.log(float(self._work.sum(dtype=np.float64)))
        chosen = float(logits[token]) - normaliser
        if not self._top:
            return chosen, ()
        ids = np.argpartition(logits, -self._top)[-self._top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        return chosen, tuple(TopLogprob(int(i), float(logits[i]) - normaliser) for i in ids)


class Stream:
    """The events of one generation, produced as they are iterated.

    `cancel()` may be called from any thread: the generation stops within one forward pass and its
    last event says "cancelled". `close()` from the iterating thread stops it too (so does leaving a
    `for` loop early and dropping the stream). While a stream is open its sequence is busy: any other
    call on that sequence raises SequenceBusyError.
    """

    def __init__(self, cursor: Cursor, tokenizer: Tokenizer, options: GenerationOptions, vocab_size: int,
                 eos_token_id: int, cancel: CancelToken | None, release: callable) -> None:
        self.options = options
        self.cancel_token = cancel or CancelToken()
        self._release_sequence = release
        self._released = False
        self._lock = threading.Lock()
        self._progress = _Progress(text=[], tokens=[], logprobs=[])
        self._completion: Completion | None = None
        self._events = _events(cursor, tokenizer, options, vocab_size, eos_token_id, self.cancel_token,
                               self._progress)

    # -- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> TokenEvent:
        if not self._lock.acquire(blocking=False):
            raise SequenceBusyError("this stream is being iterated by another thread")
        try:
            event = next(self._events)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._finish()
            raise
        finally:
            self._lock.release()
        if event.finish_reason is not None:
            self._finish()
        return event

    def text(self) -> Iterator[str]:
        """Only the text pieces (empty pieces skipped)."""
        for event in self:
            if event.text:
                yield event.text

    @property
    def completion(self) -> Completion | None:
        """The whole result, once the stream has ended (None before)."""
        return self._completion

    def run(self) -> Completion:
        """Iterate to the end and return the whole result."""
        for _ in self:
            pass
        assert self._completion is not None
        return self._completion

    # -- stopping -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the generation from any thread (within one forward pass)."""
        self.cancel_token.cancel()

    def close(self) -> None:
        """Stop and release the sequence. From another thread while iterating, this cancels instead."""
        if self._events.gi_running:
            self.cancel()
            return
        self._events.close()
        self._finish()

    def __del__(self) -> None:
        # A stream dropped unfinished must not leave its sequence busy forever.
        if not self._released:
            try:
                self._events.close()
            except Exception:  # generator already executing in another thread: it releases itself
                return
            self._finish()

    def _finish(self) -> None:
        if self._released:
            return
        self._released = True
        self._progress.finish = self._progress.finish or FinishReason.CANCELLED
        self._completion = self._progress.completion(self.options.wants_logprobs)
        self._release_sequence()


def _events(cursor: Cursor, tokenizer: Tokenizer, options: GenerationOptions, vocab_size: int,
            eos_token_id: int, cancel: CancelToken, progress: _Progress) -> Iterator[TokenEvent]:
    progress.started = time.perf_counter()
    progress.prompt_tokens, progress.cached_tokens = cursor.prompt_usage()
    sampler = Sampler(options, vocab_size, cursor.context_tokens() if options.repetition_penalty != 1.0
                      else np.zeros(0, np.int64))
    logprobs = _Logprobs(vocab_size, options.top_logprobs) if options.wants_logprobs else None
    text = tokenizer.stream()
    stops = StopMatcher(options.stop)
    start = cursor.length
    # Per generated token: characters of text released once it was decoded, and whether it ended on
    # a character boundary (a stop string is cut out by rewinding to such a boundary).
    released_after: list[int] = []
    clean_after: list[bool] = []
    released = 0
    raw: list[str] = []

    def finish(reason: FinishReason, index: int, token: int | None, piece: str, logprob: float | None = None,
               top: tuple[TopLogprob, ...] = ()) -> TokenEvent:
        progress.finish = reason
        if piece:
            progress.text.append(piece)
        return TokenEvent(index=index, token=token, text=piece, logprob=logprob, top_logprobs=top,
                          finish_reason=reason)

    def tail() -> str:
        """Text still held back at the end (a partial character, a possible stop-string prefix)."""
        piece = stops.push(text.flush())
        return piece if stops.stopped else piece + stops.flush()

    index = 0
    try:
        while True:
            if cancel.cancelled:
                yield finish(FinishReason.CANCELLED, index, None, "")
                return
            if cursor.room == 0 and not cursor.make_room():
                yield finish(FinishReason.CONTEXT, index, None, tail())
                return
            logits = cursor.next_logits()
            token = sampler(logits)
            now = time.perf_counter()
            if progress.first_token is None:
                progress.first_token = now
            chosen, top = logprobs(logits, token) if logprobs is not None else (None, ())
            if token == eos_token_id and options.stop_at_eos:
                yield finish(FinishReason.EOS, index, None, tail())
                return
            cursor.push(token)
            progress.tokens.append(token)
            if chosen is not None:
                progress.logprobs.append(chosen)
            piece = text.push(token)
            raw.append(piece)
            released += len(piece)
            released_after.append(released)
            clean_after.append(text.clean)
            safe = stops.push(piece)
            if stops.stopped:
                _cut_stop(cursor, progress, start, "".join(progress.text) + safe, raw, released_after,
                          clean_after)
                yield finish(FinishReason.STOP, index, token, safe, chosen, top)
                return
            if len(progress.tokens) == options.max_new_tokens:
                yield finish(FinishReason.LENGTH, index, token, safe + tail(), chosen, top)
                return
            if safe:
                progress.text.append(safe)
            yield TokenEvent(index=index, token=token, text=safe, logprob=chosen, top_logprobs=top)
            index += 1
    except Cancelled:
        yield finish(FinishReason.CANCELLED, index, None, "")
    except ContextFullError as exc:
        progress.finish = FinishReason.CONTEXT
        exc.completion = progress.completion(options.wants_logprobs)
        raise


def _cut_stop(cursor: Cursor, progress: _Progress, start: int, returned: str, raw: list[str],
              released_after: list[int], clean_after: list[bool]) -> None:
    """Leave the sequence holding exactly the text returned: drop the tokens from the one where the
    stop string begins (rewinding to a character boundary) and re-append the text before it that
    those tokens carried."""
    keep = 0  # generated tokens kept
    for count, (chars, clean) in enumerate(zip(released_after, clean_after), start=1):
        if chars > len(returned):
            break
        if clean:
            keep = count
    kept_text = "".join(raw[:keep])
    remainder = returned[len(kept_text):]
    cursor.truncate(start + keep, remainder)
    del progress.tokens[keep:]
    del progress.logprobs[keep:]
