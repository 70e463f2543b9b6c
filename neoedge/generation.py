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
    generated: int = 0
    """Tokens sampled (eos excluded), those a stop string cut from `tokens` too: the usage."""
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
                        new_tokens=self.generated, time_to_first_token_s=first - self.started,
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
        self._completion: Completion | None = None
        prompt, cached = cursor.prompt_usage()
        self._decoder = Decoder(tokenizer, options, vocab_size, eos_token_id, cursor.context_tokens(),
                                prompt, cached)
        self._events = _events(cursor, self._decoder, self.cancel_token)

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
        self._completion = self._decoder.completion()
        self._release_sequence()


class Decoder:
    """One generation's decoding state: successive next-token logits in, one TokenEvent out each.

    It owns the sampler, the streaming detokenizer, the stop-string matcher and what was produced,
    and knows nothing of how the logits were computed: a sequence's stream feeds it one position at
    a time, the batching engine one row of a batched step. After an event, `token` says which token
    the caller must append to its sequence (None when the generation ended without one), and on a
    stop, `cut` says how to make the sequence hold exactly the returned text.
    """

    def __init__(self, tokenizer: Tokenizer, options: GenerationOptions, vocab_size: int, eos_token_id: int,
                 context: np.ndarray, prompt_tokens: int, cached_tokens: int) -> None:
        self.options = options
        self._eos = eos_token_id
        self._sampler = Sampler(options, vocab_size, context if options.repetition_penalty != 1.0
                                else np.zeros(0, np.int64))
        self._logprobs = _Logprobs(vocab_size, options.top_logprobs) if options.wants_logprobs else None
        self._text = tokenizer.stream()
        self._stops = StopMatcher(options.stop) if options.stop else None
        self._stop_at_eos = options.stop_at_eos
        self._max_new_tokens = options.max_new_tokens
        self.progress = _Progress(text=[], tokens=[], logprobs=[], prompt_tokens=prompt_tokens,
                                  cached_tokens=cached_tokens, started=time.perf_counter())
        # Per generated token: characters of text released once it was decoded, and whether it ended
        # on a character boundary (a stop string is cut out by rewinding to such a boundary).
        self._released_after: list[int] = []
        self._clean_after: list[bool] = []
        self._released = 0
        self._raw: list[str] = []
        self.token: int | None = None
        self.cut: tuple[int, str] | None = None
        """(generated tokens to keep, text to append after them) after a stop string."""
        self.finished = False

    @property
    def index(self) -> int:
        return len(self.progress.tokens)

    def step(self, logits: np.ndarray) -> TokenEvent:
        """Sample the next token from `logits` [vocab] (left unchanged) and return its event."""
        progress = self.progress
        token = self._sampler(logits)
        if progress.first_token is None:
            progress.first_token = time.perf_counter()
        if self._logprobs is not None:
            chosen, top = self._logprobs(logits, token)
        else:
            chosen, top = None, ()
        tokens = progress.tokens
        index = len(tokens)
        if token == self._eos and self._stop_at_eos:
            return self.finish(FinishReason.EOS)
        self.token = token
        tokens.append(token)
        progress.generated += 1
        if chosen is not None:
            progress.logprobs.append(chosen)
        piece = self._text.push(token)
        if self._stops is not None:
            # Bookkeeping for cutting a stop string out of the sequence, only when there are stops.
            self._raw.append(piece)
            self._released += len(piece)
            self._released_after.append(self._released)
            self._clean_after.append(self._text.clean)
            safe = self._stops.push(piece)
            if self._stops.stopped:
                self.cut = self._stop_cut("".join(progress.text) + safe)
                return self._close(FinishReason.STOP, index, token, safe, chosen, top)
        else:
            safe = piece
        if index + 1 == self._max_new_tokens:
            return self._close(FinishReason.LENGTH, index, token, safe + self._tail(), chosen, top)
        if safe:
            progress.text.append(safe)
        return TokenEvent(index, token, safe, chosen, top)

    def finish(self, reason: FinishReason) -> TokenEvent:
        """End without a new token (eos, cancel, the context's end): the closing event."""
        self.token = None
        return self._close(reason, self.index, None, "" if reason == FinishReason.CANCELLED else self._tail())

    def completion(self) -> Completion:
        return self.progress.completion(self.options.wants_logprobs)

    def _close(self, reason: FinishReason, index: int, token: int | None, piece: str,
               logprob: float | None = None, top: tuple[TopLogprob, ...] = ()) -> TokenEvent:
        self.finished = True
        self.progress.finish = reason
        if piece:
            self.progress.text.append(piece)
        return TokenEvent(index=index, token=token, text=piece, logprob=logprob, top_logprobs=top,
                          finish_reason=reason)

    def _tail(self) -> str:
        """Text still held back at the end (a partial character, a possible stop-string prefix)."""
        piece = self._text.flush()
        if self._stops is None:
            return piece
        piece = self._stops.push(piece)
        return piece if self._stops.stopped else piece + self._stops.flush()

    def _stop_cut(self, returned: str) -> tuple[int, str]:
        """Keep the generated tokens before the one where the stop string begins (rewinding to a
        character boundary), and the text before the stop that the dropped tokens carried."""
        keep = 0
        for count, (chars, clean) in enumerate(zip(self._released_after, self._clean_after), start=1):
            if chars > len(returned):
                break
            if clean:
                keep = count
        del self.progress.tokens[keep:]
        del self.progress.logprobs[keep:]
        return keep, returned[len("".join(self._raw[:keep])):]


def _events(cursor: Cursor, decoder: Decoder, cancel: CancelToken) -> Iterator[TokenEvent]:
    """Drive a decoder over one sequence: one forward pass per token."""
    # Counted, not found from the start length: a context shift drops tokens from the front.
    pushed = 0
    step, next_logits, push = decoder.step, cursor.next_logits, cursor.push
    try:
        while True:
            if cancel.cancelled:
                yield decoder.finish(FinishReason.CANCELLED)
                return
            if cursor.room == 0 and not cursor.make_room():
                yield decoder.finish(FinishReason.CONTEXT)
                return
            event = step(next_logits())
            if decoder.token is not None:
                push(decoder.token)
                pushed += 1
            if decoder.cut is not None:
                keep, text = decoder.cut
                cursor.truncate(cursor.length - (pushed - keep), text)
            yield event
            if decoder.finished:
                return
    except Cancelled:
        yield decoder.finish(FinishReason.CANCELLED)
    except ContextFullError as exc:
        decoder.progress.finish = FinishReason.CONTEXT
        exc.completion = decoder.completion()
        raise
