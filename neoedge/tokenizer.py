"""The package's byte-level BPE tokenizer, and streaming detokenization that never splits a character.

Encoding is bounded: a text that cannot fit `max_tokens` is refused from its length alone, before
the tokenizer sees it (tokenizing 10 MB takes ~20 s and over a GB here), and long texts (eval) are
encoded in pieces cut where the byte-level pre-tokenizer cuts anyway, so the result is the same
tokens in bounded memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import PackageError, PromptError

_REPLACEMENT = "\ufffd"
# Long texts are encoded in pieces of about this many characters.
_PIECE_CHARS = 1 << 16
# A space between two ASCII letters or digits: GPT-2's pre-tokenizer regex always starts a new
# pre-token at such a space (` ?\p{L}+`, ` ?\p{N}+`) and no pre-token runs across it.
_SAFE_CUT = re.compile(r"(?<=[A-Za-z0-9]) (?=[A-Za-z0-9])")
# For a tokenizer whose characters-per-token bound is not proven (see `encode`), this much slack.
_UNPROVEN_BOUND_FACTOR = 4


class Tokenizer:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise PackageError(f"cannot read tokenizer {path}: {' '.join(str(exc).split())[:300]}") from exc
        self.path = str(path)
        pre = self._tok.pre_tokenizer
        byte_level = type(pre).__name__ == "ByteLevel" and self._tok.normalizer is None
        self._added = self._tok.get_added_tokens_decoder()
        # Without a normalizer, a byte-level BPE covers every input byte with exactly one token and
        # a token covers at most len(its string) bytes, so a text of n characters (<= n bytes)
        # needs at least n / max_token_chars tokens: a bound that never refuses a text that fits.
        self._proven_bound = byte_level
        # Pieces cut at _SAFE_CUT tokenize exactly as the whole only under GPT-2's regex, without a
        # prefix space, and with no added token that could span or absorb the cut's space.
        self._cuttable = (byte_level and bool(pre.use_regex) and not pre.add_prefix_space
                          and all(" " not in t.content and not (t.lstrip or t.rstrip or t.single_word)
                                  for t in self._added.values()))

    # -- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer can produce (-1 for an empty vocabulary): ids need not be
        dense, so the count alone does not bound them."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def special_ids(self) -> set[int]:
        """Ids of the tokenizer's special tokens (e.g. <|endoftext|>)."""
        return {token_id for token_id, token in self._added.items() if token.special}

    @cached_property
    def max_token_chars(self) -> int:
        """Most characters of text one token can stand for (computed on first need: it reads the
        whole vocabulary)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return max(1, max(map(len, vocab), default=1))

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, *, max_tokens: int | None = None, what: str = "prompt", why: str = "") -> list[int]:
        """Token ids of `text`. With `max_tokens`, a text with more tokens raises PromptError, and
        one that cannot fit is refused from its length before tokenizing; `why` explains the limit
        in the message."""
        check_text(text, what)
        if max_tokens is not None and len(text) > max_tokens:
            bound = max_tokens * self.max_token_chars * (1 if self._proven_bound else _UNPROVEN_BOUND_FACTOR)
            if len(text) > bound:
                raise PromptError(
                    f"{what} is {len(text)} characters, more than {max_tokens} tokens can hold{why} (at most "
                    f"{bound} characters: no token stands for more than {self.max_token_chars})")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptError(f"{what} is {len(ids)} tokens, more than the {max_tokens} that fit{why}")
        return ids

    def encode_long(self, text: str, *, what: str = "text") -> np.ndarray:
        """Token ids of a text of any length, as int64, in memory proportional to the ids (the
        tokenizer's per-token bookkeeping lives only for one piece at a time)."""
        check_text(text, what)
        return np.fromiter((i for piece in self._pieces(text)
                            for i in self._tok.encode(piece, add_special_tokens=False).ids), dtype=np.int64)

    def _pieces(self, text: str) -> Iterator[str]:
        if not self._cuttable:
            yield text
            return
        start = 0
        while len(text) - start > _PIECE_CHARS:
            cut = _SAFE_CUT.search(text, start + _PIECE_CHARS)
            if cut is None:
                break
            yield text[start: cut.start()]
            start = cut.start()
        yield text[start:]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def stream(self) -> TextStream:
        return TextStream(self)


def check_text(text: object, what: str) -> None:
    """Text must be a str of valid Unicode: a command line in another encoding reaches Python as
    lone surrogates (surrogateescape), which the tokenizer cannot take."""
    if not isinstance(text, str):
        raise PromptError(f"{what} must be a str, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PromptError(f"{what} is not valid text: character {exc.start} is not Unicode (bytes that "
                              "are not UTF-8, e.g. a command line in another encoding)") from None


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
