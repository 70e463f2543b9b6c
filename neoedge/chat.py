"""Chat on a model that was never chat-tuned: a plain transcript format, and a conversation that
keeps its history in the KV cache.

GPT-Neo continues text. A chat is a transcript it continues one reply at a time:

    User: How do I open a file?
    Assistant: Use open() ...
    User: ...

The reply ends where the model starts the next user turn (a stop string), or at eos. The same
format renders OpenAI-style message lists for `neoedge serve`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .cancel import CancelToken
from .events import Completion
from .generation import Stream
from .model import Model
from .options import ContextPolicy, GenerationOptions
from .sequence import Sequence


@dataclass(frozen=True)
class ChatFormat:
    """How messages become a transcript. Every field is plain text."""

    system: str = ""
    """Text placed before the first turn (instructions, a persona); kept when the context shifts."""
    user: str = "User"
    assistant: str = "Assistant"
    separator: str = "\n"

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ValueError(f"chat format field {f.name} must be text, got {getattr(self, f.name)!r}")
        if not self.user or not self.assistant:
            raise ValueError("chat format: user and assistant names must not be empty")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ChatFormat:
        """A JSON object with any of the fields system, user, assistant, separator."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read chat format {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"chat format {path} must be a JSON object")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"chat format {path}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def stop(self) -> tuple[str, ...]:
        """Where a reply ends: the start of the next user turn."""
        return (f"{self.separator}{self.user}:",)

    def preamble(self) -> str:
        return self.system + self.separator if self.system else ""

    def turn(self, message: str, *, first: bool) -> str:
        """The text appended for a user message: the user's line, then the assistant's prefix."""
        start = self.preamble() if first else self.separator
        return f"{start}{self.user}: {message}{self.separator}{self.assistant}:"

    def render(self, messages: Iterable[Mapping[str, Any]]) -> str:
        """An OpenAI-style message list (roles system, user, assistant) as a transcript that ends with
        the assistant's prefix, ready to be continued."""
        system = [m["content"] for m in messages if m.get("role") == "system"]
        fmt = ChatFormat(system="\n".join([self.system, *system]).strip("\n") if system else self.system,
                         user=self.user, assistant=self.assistant, separator=self.separator)
        parts = [fmt.preamble()]
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"message content must be text, got {type(content).__name__}")
            if role == "system":
                continue
            if role == "user":
                parts.append(f"{fmt.user}: {content}{fmt.separator}")
            elif role == "assistant":
                parts.append(f"{fmt.assistant}:{'' if content.startswith(' ') else ' '}{content}{fmt.separator}")
            else:
                raise ValueError(f"unknown message role {role!r}: use system, user or assistant")
        parts.append(f"{fmt.assistant}:")
        return "".join(parts)


class Conversation:
    """A chat whose history stays in one sequence's cache: each turn processes only the new text.

    `say()` streams the reply; `undo()` removes the last exchange (rewinding the cache), `reset()`
    starts over, `save()` / `Conversation.load()` keep it in a file.
    """

    def __init__(self, model: Model, chat_format: ChatFormat | None = None, *,
                 policy: ContextPolicy | None = None, sequence: Sequence | None = None,
                 turns: list[tuple[int, int]] | None = None) -> None:
        self.model = model
        self.format = chat_format or ChatFormat()
        keep = len(model.encode(self.format.preamble())) if self.format.system else 0
        self.sequence = sequence or model.sequence(policy=policy or ContextPolicy(on_full="shift", keep=keep))
        # (sequence length, shifts so far) at the start of each exchange, for undo.
        self._turns: list[tuple[int, int]] = [tuple(t) for t in turns or []]

    @property
    def turns(self) -> int:
        return len(self._turns)

    def say(self, message: str, options: GenerationOptions | None = None, *,
            cancel: CancelToken | None = None, **overrides: Any) -> Stream:
        """Append the user's message and stream the assistant's reply."""
        if options is None:
            overrides.setdefault("stop", self.format.stop)
        # Shifts counted before the message goes in: appending it may shift the context too.
        start, shifts = len(self.sequence), self.sequence.shifts
        stream = self.sequence.stream(self.format.turn(message, first=start == 0), options,
                                      cancel=cancel, **overrides)
        self._turns.append((start, shifts))
        return stream

    def reply(self, message: str, options: GenerationOptions | None = None, *,
              cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        return self.say(message, options, cancel=cancel, **overrides).run()

    def undo(self) -> bool:
        """Forget the last exchange (the user's message and the reply). False if there was none."""
        if not self._turns:
            return False
        start, shifts = self._turns.pop()
        if shifts == self.sequence.shifts:
            self.sequence.rewind(start)
        else:  # the context shifted since: the exchange's tokens moved, so undo starts over
            self.reset()
        return True

    def reset(self) -> None:
        self.sequence.reset()
        self._turns.clear()

    def save(self, path: str | os.PathLike[str]) -> None:
        self.sequence.save(path, meta={"chat_turns": [list(t) for t in self._turns],
                                       "shifts": self.sequence.shifts})

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike[str], chat_format: ChatFormat | None = None,
             *, policy: ContextPolicy | None = None) -> Conversation:
        sequence, meta = Sequence.load_with_meta(model, path, policy=policy)
        conversation = cls(model, chat_format, sequence=sequence)
        if policy is None:
            conversation.sequence.policy = ContextPolicy(on_full="shift", keep=len(
                model.encode(conversation.format.preamble())) if conversation.format.system else 0)
        shifts = meta.get("shifts", 0)
        sequence.shifts = shifts if type(shifts) is int else 0
        turns = meta.get("chat_turns", [])
        if isinstance(turns, list) and all(isinstance(t, list) and len(t) == 2 and all(type(v) is int for v in t)
                                           and 0 <= t[0] <= len(sequence) for t in turns):
            conversation._turns = [(t[0], t[1]) for t in turns]
        return conversation
