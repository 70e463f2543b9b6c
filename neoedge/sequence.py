"""One sequence: its tokens and its KV cache. A conversation, a document being scored, a fork.

A `Sequence` belongs to a `Model` (which it shares with any number of other sequences) and owns
everything that changes while it is used: the tokens, the cache, the position. Text and tokens are
appended; generation continues from whatever the cache already holds. Only one call at a time may
use a sequence: a second one (another thread, or while a stream is open) raises SequenceBusyError.

Appended tokens are processed lazily, by the next call that needs the model's output (generate,
stream, score, process), so appending never blocks and a cancelled prefill leaves the rest pending.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence as Seq
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from .cancel import CancelToken
from .errors import ContextFullError, OptionsError, PromptError, SequenceBusyError, StateFileError
from .events import Completion, ContinuationScore
from .generation import Cancelled, Stream
from .options import ContextPolicy, GenerationOptions
from .runner import Terminated
from .scoring import continuation_logprobs
from .session import new_run_options
from .state_file import SavedState, read_state, write_state

if TYPE_CHECKING:
    from .aio import AsyncStream
    from .model import Model

Tokens = Seq[int] | np.ndarray


class Sequence:
    """Tokens and KV cache of one sequence on a shared Model. Make one with `model.sequence()`."""

    def __init__(self, model: Model, *, policy: ContextPolicy | None = None) -> None:
        self.model = model
        self.policy = policy or ContextPolicy()
        self._runner = model.runner
        self._context = model.info.context_length
        if self.policy.on_full == "shift" and self.policy.keep > self._context // 2:
            # A shift keeps half the context in all: more pinned tokens than that cannot all stay.
            raise OptionsError(f"ContextPolicy keep={self.policy.keep} cannot be honoured: a shift keeps "
                               f"half the context ({self._context // 2} tokens) in all")
        self._state = self._runner.new_state(self._context)
        self._tokens: list[int] = []
        # The next-token logits in self._state.last_logits are those of position len(tokens) iff this
        # is True (every token processed, nothing rewound since).
        self._logits_valid = False
        self._guard = threading.Lock()
        self._user = ""
        self.shifts = 0
        """How many times policy "shift" dropped tokens (positions before it are no longer valid)."""

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the cache (the rest are pending)."""
        return self._state.length

    @property
    def text(self) -> str:
        return self.model.tokenizer.decode(self._tokens)

    @property
    def room(self) -> int:
        """Tokens that can still be added before the context is full."""
        return self._context - len(self._tokens)

    def cache_bytes(self) -> int:
        """Memory this sequence's KV cache occupies (what one more sequence costs)."""
        return self._state.cache.nbytes_used()

    def __repr__(self) -> str:
        return f"Sequence({len(self._tokens)} tokens, {self.cached} cached, context {self._context})"

    # -- changing it --------------------------------------------------------------------------------
    def append(self, text: str | None = None, *, tokens: Tokens | None = None) -> int:
        """Add text (tokenized on its own) or token ids; they are processed by the next call that
        needs the model. Returns how many tokens were added."""
        with self._use("append"):
            return self._append(self._new_tokens(text, tokens))

    def process(self, *, cancel: CancelToken | None = None) -> None:
        """Run the pending tokens through the model now (e.g. a system prompt while the user types)."""
        with self._use("process"), _RunLink(cancel) as link:
            if not self._tokens:
                return
            try:
                self._next_logits(link.run_options)
            except Cancelled:
                pass

    def rewind(self, length: int) -> None:
        """Keep only the first `length` tokens (e.g. regenerate the last reply). Free when the cache's
        local layers still hold the window before that point (the last ~window + chunk tokens);
        further back the kept tokens are processed again by the next call."""
        with self._use("rewind"):
            self._rewind(length)

    def reset(self) -> None:
        """Forget everything (same as rewind(0))."""
        self.rewind(0)

    def fork(self) -> Sequence:
        """An independent copy holding the same tokens and cache: try two continuations of one prefix."""
        with self._use("fork"):
            other = Sequence(self.model, policy=self.policy)
            other._state = self._runner.copy_state(self._state)
            other._tokens = list(self._tokens)
            other._logits_valid = self._logits_valid
            return other

    # -- generating ---------------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
               cancel: CancelToken | None = None, **overrides: Any) -> Stream:
        """Append `prompt` (if given) and generate, one TokenEvent per token. Options are checked and
        the prompt appended now; the model runs as the stream is iterated. The sequence is busy until
        the stream ends or is closed."""
        opts = self.model.options(options, **overrides)
        self._acquire("an open stream")
        try:
            if prompt is not None and prompt != "":
                self._append(self.model.encode(prompt))
            if not self._tokens:
                # Nothing to condition on: start from <|endoftext|>, as GPT-Neo was trained.
                self._append([self.model.info.bos_token_id])
            link = _RunLink(cancel)
            cursor = _Cursor(self, link)

            def release() -> None:
                link.close()
                self._release()

            return Stream(cursor, self.model.tokenizer, opts, self.model.info.vocab_size,
                          self.model.info.eos_token_id, link.cancel, release)
        except BaseException:
            self._release()
            raise

    def generate(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
                 cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        """Append `prompt` (if given), generate, and return the whole result."""
        return self.stream(prompt, options, cancel=cancel, **overrides).run()

    def astream(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
                cancel: CancelToken | None = None, **overrides: Any) -> AsyncStream:
        """`stream` for asyncio: `async for event in seq.astream(...)`. The model runs in a worker
        thread, never on the event loop; cancelling the awaiting task cancels the generation."""
        from .aio import AsyncStream

        return AsyncStream(self.stream(prompt, options, cancel=cancel, **overrides))

    async def agenerate(self, prompt: str | None = None, options: GenerationOptions | None = None, *,
                        cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        return await self.astream(prompt, options, cancel=cancel, **overrides).run()

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, continuations: Seq[str | Tokens], *, cancel: CancelToken | None = None
              ) -> list[ContinuationScore]:
        """Log-probabilities of each continuation after what the sequence holds. The continuations
        share the sequence's cache (its content is processed once) and leave the sequence unchanged."""
        model = self.model
        encoded = [model.encode(c) if isinstance(c, str) else model.check_tokens(c, "continuation")
                   for c in continuations]
        with self._use("score"), _RunLink(cancel) as link:
            # Checked holding the sequence: another thread's append cannot come between. A
            # continuation's last token is only predicted, never run through the model: scoring fits
            # when the sequence (at least the bos an empty one starts with) and all but that token do.
            room = self.room - (0 if self._tokens else 1)
            for ids in encoded:
                if not ids:
                    raise PromptError("a continuation is empty: it has no tokens to score")
                if len(ids) - 1 > room:
                    raise ContextFullError(f"a continuation of {len(ids)} tokens does not fit after the "
                                           f"sequence's {len(self._tokens)} tokens (context {self._context})")
            # An empty sequence scores after bos, which it then gives back: scoring leaves it unchanged.
            lent_bos = not self._tokens
            if lent_bos:
                self._append([model.info.bos_token_id])
            try:
                first = self._next_logits(link.run_options).copy()
                checkpoint = self._state.cache.checkpoint()
                scores = []
                for ids in encoded:
                    try:
                        scores.append(continuation_logprobs(
                            first, ids, lambda chunk: self._runner.forward(
                                self._state, chunk, all_logits=True, run_options=link.run_options),
                            self._runner.chunk))
                    finally:
                        self._state.cache.restore(checkpoint)
            except (Terminated, Cancelled) as exc:
                raise PromptError("scoring was cancelled") from exc
            finally:
                if lent_bos:
                    self._rewind(0)
            # The next-token logits buffer was not touched by all-logits passes, and the cache is back.
            return scores

    # -- saving -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None) -> None:
        """Write tokens and cache to `path`; `model.load_sequence(path)` restores them exactly. Only
        the package this sequence belongs to can load the file. `meta`: JSON kept beside them."""
        with self._use("save"):
            cache = self._state.cache
            write_state(path, SavedState(
                package=self.model.fingerprint, tokens=list(self._tokens), processed=cache.length,
                length=cache.length, local_length=getattr(cache, "local_length", cache.length),
                arrays=cache.filled(), meta=dict(meta or {})))

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike[str], *, policy: ContextPolicy | None = None
             ) -> Sequence:
        return cls.load_with_meta(model, path, policy=policy)[0]

    @classmethod
    def load_with_meta(cls, model: Model, path: str | os.PathLike[str], *, policy: ContextPolicy | None = None
                       ) -> tuple[Sequence, dict[str, Any]]:
        saved = read_state(path, model.fingerprint)
        seq = cls(model, policy=policy)
        if not 0 <= saved.processed <= len(saved.tokens) <= seq._context:
            raise StateFileError(f"sequence state {path} is corrupt (lengths)")
        seq._tokens = model.check_tokens(saved.tokens, "saved tokens")
        try:
            seq._state.cache.load_filled(saved.length, saved.local_length, saved.arrays)
        except ValueError as exc:
            raise StateFileError(f"sequence state {path} does not fit this package's cache: {exc}") from exc
        # The next-token logits are not saved: the last token is processed again on first use.
        if seq._tokens:
            seq._rewind(len(seq._tokens))
        return seq, saved.meta

    # -- internals ------------------------------------------------------------------------------------
    @contextmanager
    def _use(self, what: str) -> Iterator[None]:
        self._acquire(what)
        try:
            yield
        finally:
            self._release()

    def _acquire(self, what: str) -> None:
        if not self._guard.acquire(blocking=False):
            raise SequenceBusyError(
                f"this sequence is in use ({self._user}): one sequence runs one call at a time; "
                f"use model.sequence() (or fork()) for each concurrent conversation")
        self._user = what

    def _release(self) -> None:
        self._user = ""
        self._guard.release()

    def _new_tokens(self, text: str | None, tokens: Tokens | None) -> list[int]:
        if text is not None and tokens is not None:
            raise PromptError("append() takes text or tokens=, not both")
        if tokens is None:
            return self.model.encode(text, what="text")  # None is refused there: text must be a str
        return self.model.check_tokens(tokens, "tokens")

    def _append(self, ids: list[int]) -> int:
        if len(ids) > self.room:
            if self.policy.on_full == "shift" and len(ids) <= self._context // 2:
                self._shift(len(ids))
            else:
                raise ContextFullError(
                    f"{len(ids)} more tokens do not fit: the model's context is {self._context} tokens "
                    f"and the sequence holds {len(self._tokens)}")
        if ids:
            self._tokens.extend(ids)
            self._logits_valid = False
        return len(ids)

    def _rewind(self, length: int) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= len(self._tokens):
            raise PromptError(f"cannot rewind to {length!r}: the sequence holds {len(self._tokens)} tokens")
        cache = self._state.cache
        if length == len(self._tokens) and self._logits_valid:
            return
        del self._tokens[length:]
        self._logits_valid = False
        # Leave the last kept token pending: processing it again gives the next-token logits.
        target = max(0, length - 1)
        if target < cache.length:
            if cache.can_rewind(target):
                cache.rewind(target)
            else:
                self._state = self._runner.new_state(self._context)

    def _shift(self, needed: int) -> None:
        """Policy "shift": keep the pinned start and the most recent tokens, half the context in all."""
        keep = self.policy.keep  # at most half the context (checked when the sequence was made)
        recent = max(self._context // 2 - keep, 0)
        recent = min(recent, len(self._tokens) - keep)
        if self._context - (keep + recent) < needed:
            raise ContextFullError(f"{needed} tokens do not fit even after shifting the context")
        kept = self._tokens[:keep] + (self._tokens[-recent:] if recent else [])
        self._tokens = kept
        self.shifts += 1
        self._state = self._runner.new_state(self._context)
        self._logits_valid = False

    def _next_logits(self, run_options: ort.RunOptions | None) -> np.ndarray:
        """Logits of the position after the last token, processing pending tokens first."""
        if self._logits_valid:
            return self._state.last_logits
        tokens, state = self._tokens, self._state
        if len(tokens) == state.length + 1:  # the decode step: one new token
            try:
                logits = self._runner.step(state, tokens[-1], run_options)
            except Terminated as exc:
                raise Cancelled() from exc
            self._logits_valid = True
            return logits
        if not tokens:
            raise PromptError("the sequence is empty: append text or tokens first")
        if len(tokens) == state.length:  # all processed, but the logits are stale
            self._rewind(len(tokens))
            state = self._state
        runner = self._runner
        ids = np.asarray(tokens[state.length:], dtype=np.int64)
        try:
            if ids.shape[0] == 1:
                logits = runner.step(state, int(ids[0]), run_options)
            for offset in range(0, ids.shape[0] if ids.shape[0] > 1 else 0, runner.chunk):
                logits = runner.forward(state, ids[offset: offset + runner.chunk], run_options=run_options)
        except Terminated as exc:
            raise Cancelled() from exc
        self._logits_valid = True
        return logits


class _RunLink:
    """One call's link to cancellation: a CancelToken whose cancel() terminates the RunOptions the
    call's forward passes run with."""

    def __init__(self, cancel: CancelToken | None) -> None:
        self.cancel = cancel or CancelToken()
        self.run_options = new_run_options()
        self._unregister = self.cancel.on_cancel(self._terminate)

    def _terminate(self) -> None:
        self.run_options.terminate = True

    def close(self) -> None:
        self._unregister()

    def __enter__(self) -> _RunLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cursor:
    """The decode loop's view of a sequence during one stream (see generation.Cursor)."""

    def __init__(self, seq: Sequence, link: _RunLink) -> None:
        self._seq = seq
        self._link = link
        self._prompt = len(seq._tokens)
        self._cached = min(seq._state.length, self._prompt)

    @property
    def length(self) -> int:
        return len(self._seq._tokens)

    @property
    def room(self) -> int:
        seq = self._seq
        return seq._context - len(seq._tokens)

    def prompt_usage(self) -> tuple[int, int]:
        return self._prompt, self._cached

    def next_logits(self) -> np.ndarray:
        return self._seq._next_logits(self._link.run_options)

    def push(self, token: int) -> None:
        self._seq._tokens.append(token)
        self._seq._logits_valid = False

    def truncate(self, length: int, text: str) -> None:
        seq = self._seq
        seq._rewind(length)
        if text:
            seq._append(seq.model.encode(text))

    def make_room(self) -> bool:
        seq = self._seq
        if seq.policy.on_full == "shift":
            seq._shift(1)
            return True
        if seq.policy.on_full == "stop":
            return False
        raise ContextFullError(f"the sequence reached the end of the model's context ({seq._context} tokens)")

    def context_tokens(self) -> np.ndarray:
        return np.asarray(self._seq._tokens, dtype=np.int64)
