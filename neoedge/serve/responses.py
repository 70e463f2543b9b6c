"""OpenAI response bodies: whole completions, streamed chunks, log-probs, usage.

One generation (one of the `n` choices of one prompt) is a `Choice`: it turns the engine's events
into what the client is sent. Two shapes share it: the legacy text completions (`TextShape`) and
chat completions (`ChatShape`).

Streamed log-probs follow the text: an event whose text is held back (a possible stop string, half
a UTF-8 character) keeps its token's log-prob until text is released, and at the end only the
tokens of the final completion are added (a stop string's tokens are cut out, as in the text). A
token whose first characters were released before the stop string began inside it stays reported,
whole responses alike: the reported tokens spell the text, then that token's rest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..events import Completion, FinishReason, TokenEvent, TopLogprob
from .tokens import TokenPieces

# A client never sees "cancelled": the server cancels a generation only when its client has gone.
# It is mapped anyway (not to "stop"), so that a cancel from elsewhere could not pass for an ending.
FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
          FinishReason.CONTEXT: "length", FinishReason.CANCELLED: "cancelled"}

Entry = tuple[int, float, tuple[TopLogprob, ...], int]
"""One generated token's log-prob record: token, log p(token), top alternatives, and the legacy
`text_offset`: the characters of text released before its event. That counts released text, not
display strings ("bytes:\\xc2" for half a character), and is the same streamed or whole."""


class Choice:
    """What one generation has sent so far, and what each new event adds to it."""

    def __init__(self, index: int, prompt_index: int, *, prefix: str = "", strip_leading: bool = False) -> None:
        self.index = index
        self.prompt_index = prompt_index
        self.prefix = prefix
        """Text sent before the generated text (the prompt, with `echo`)."""
        self._strip_reply = strip_leading  # the whole reply's leading whitespace goes
        self._strip = strip_leading  # the stream's: until its first non-blank text
        self._entries: list[Entry] = []
        self._sent = 0
        self._released = 0  # characters of generated text released so far

    def feed(self, event: TokenEvent) -> tuple[str, list[Entry]]:
        """The text and the log-prob records this event releases (either may be empty)."""
        if event.token is not None and event.logprob is not None:
            self._entries.append((event.token, event.logprob, event.top_logprobs, self._released))
        text = self._leading(event.text)
        self._released += len(text)
        if not event.text:
            return "", []
        released, self._sent = self._entries[self._sent:], len(self._entries)
        return text, released

    def final(self, completion: Completion) -> list[Entry]:
        """The log-prob records not yet sent that belong to the finished completion."""
        keep = len(completion.tokens)
        released = self._entries[self._sent: keep]
        self._sent = max(self._sent, keep)
        return released

    def entries(self, completion: Completion) -> list[Entry]:
        """All log-prob records of the completion (for a whole, not streamed, response): the same a
        stream sends, the completion's tokens and any token whose text was released before a stop
        string cut it (its first characters are in the text)."""
        return self._entries[: max(self._sent, len(completion.tokens))]

    def text(self, completion: Completion) -> str:
        return self.prefix + (completion.text.lstrip() if self._strip_reply else completion.text)

    def _leading(self, text: str) -> str:
        """Chat replies follow "Assistant:" and start with a space, which is not part of the content."""
        if self._strip and text:
            text = text.lstrip()
            if text:
                self._strip = False
        return text


def usage(completions: Sequence[tuple[Choice, Completion]]) -> dict[str, int]:
    """Prompt tokens once per prompt (its n choices share it), generated tokens of every choice."""
    prompts = {choice.prompt_index: completion.usage.prompt_tokens for choice, completion in completions}
    prompt = sum(prompts.values())
    generated = sum(completion.usage.new_tokens for _, completion in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class _Shape:
    object: str
    chunk_object: str
    prefix: str

    def __init__(self, model_name: str, fingerprint: str, pieces: TokenPieces, *, logprobs: bool,
                 include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name, self.fingerprint, self.pieces = model_name, fingerprint, pieces
        self.logprobs = logprobs
        self.include_usage = include_usage

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.fingerprint, "choices": choices}

    def body(self, completions: Sequence[tuple[Choice, Completion]]) -> dict[str, Any]:
        body = self._envelope(self.object, [self.choice(c, done) for c, done in completions])
        body["usage"] = usage(completions)
        return body

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, completions: Sequence[tuple[Choice, Completion]]) -> dict[str, Any]:
        body = self._envelope(self.chunk_object, [])
        body["usage"] = usage(completions)
        return body

    def choice(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        raise NotImplementedError

    def start(self, choice: Choice) -> dict[str, Any] | None:
        """The chunk that opens a choice's stream, if any."""
        raise NotImplementedError

    def delta(self, choice: Choice, text: str, entries: list[Entry], finish: str | None = None) -> dict[str, Any]:
        raise NotImplementedError


class TextShape(_Shape):
    """/v1/completions: `text`, and the legacy log-probs (tokens, token_logprobs, top_logprobs, text_offset)."""

    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def _logprobs(self, entries: list[Entry]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top, offset in entries:
            out["tokens"].append(self.pieces(token)[1])
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append({self.pieces(t.token)[1]: t.logprob for t in top})
            out["text_offset"].append(offset)
        return out

    def choice(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        return {"index": choice.index, "text": choice.text(completion),
                "logprobs": self._logprobs(choice.entries(completion)),
                "finish_reason": FINISH[completion.finish_reason]}

    def start(self, choice: Choice) -> dict[str, Any] | None:
        if not choice.prefix:
            return None
        return {"index": choice.index, "text": choice.prefix, "logprobs": self._logprobs([]),
                "finish_reason": None}

    def delta(self, choice: Choice, text: str, entries: list[Entry], finish: str | None = None) -> dict[str, Any]:
        return {"index": choice.index, "text": text, "logprobs": self._logprobs(entries),
                "finish_reason": finish}


class ChatShape(_Shape):
    """/v1/chat/completions: an assistant `message` (streamed as `delta`s), log-probs as `content`."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        raw, text = self.pieces(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def _logprobs(self, entries: list[Entry]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._token(token, logprob), "top_logprobs": [self._token(t.token, t.logprob) for t in top]}
                            for token, logprob, top, _ in entries], "refusal": None}

    def choice(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        return {"index": choice.index,
                "message": {"role": "assistant", "content": choice.text(completion), "refusal": None},
                "logprobs": self._logprobs(choice.entries(completion)),
                "finish_reason": FINISH[completion.finish_reason]}

    def start(self, choice: Choice) -> dict[str, Any] | None:
        return {"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, choice: Choice, text: str, entries: list[Entry], finish: str | None = None) -> dict[str, Any]:
        return {"index": choice.index, "delta": {"content": text} if text or finish is None else {},
                "logprobs": self._logprobs(entries) if entries or finish is None else None,
                "finish_reason": finish}
