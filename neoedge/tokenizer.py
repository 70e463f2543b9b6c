"""The package's byte-level BPE tokenizer, and streaming detokenization that never splits a character."""

from __future__ import annotations

import os

from tokenizers import Tokenizer as _HFTokenizer

from .errors import PackageError

_REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise PackageError(f"cannot read tokenizer {path}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def stream(self) -> TextStream:
        return TextStream(self)


class TextStream:
    """Turns tokens into text as they arrive.

    GPT-2's byte-level BPE can split one UTF-8 character across tokens; decoding such a prefix
    yields U+FFFD. Tokens are therefore held back until they decode to whole characters. Only the
    tokens since the last emitted boundary are decoded, so each step does constant work.
    """

    # A UTF-8 character has at most 4 bytes and every token at least one: a tail still broken after
    # this many tokens is genuinely invalid and is emitted as it is (with U+FFFD), not held forever.
    _MAX_HELD = 4

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._held: list[int] = []

    def push(self, token: int) -> str:
        self._held.append(token)
        text = self._tokenizer.decode(self._held)
        if text.endswith(_REPLACEMENT) and len(self._held) < self._MAX_HELD:
            return ""
        self._held.clear()
        return text

    @property
    def clean(self) -> bool:
        """True when every pushed token has been released as text (nothing held back)."""
        return not self._held

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD here)."""
        text = self._tokenizer.decode(self._held) if self._held else ""
        self._held.clear()
        return text
