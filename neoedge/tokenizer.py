"""The package's byte-level BPE tokenizer, and streaming detokenization that never splits a character.

Encoding is bounded: a text that cannot fit `max_tokens` is refused from its length alone, before
the tokenizer sees it (tokenizing 10 MB takes ~20 s and over a GB here), and long texts (eval) are
encoded in pieces cut where the byte-level pre-tokenizer cuts anyway, so the result is the same
tokens in bounded memory.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterator
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import PackageError, PromptError

_REPLACEMENT = "\ufffd"
# Characters a tokenizer without a proven length bound is given in one call.
UNPROVEN_MAX_CHARS = 1 << 22
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
        return max(max(self._vocab.values(), default=-1), max(self._added, default=-1))

    @cached_property
    def _vocab(self) -> dict[str, int]:
        """The model's vocabulary, token string -> id (read once: the load-time checks use it)."""
        return self._tok.get_vocab(with_added_tokens=False)

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
            if self._proven_bound:
                bound = max_tokens * self.max_token_chars
                if len(text) > bound:
                    raise PromptError(
                        f"{what} is {len(text)} characters, more than {max_tokens} tokens can hold{why} (at "
                        f"most {bound} characters: no token stands for more than {self.max_token_chars})")
            elif len(text) > max(max_tokens * self.max_token_chars * _UNPROVEN_BOUND_FACTOR, UNPROVEN_MAX_CHARS):
                # Without a byte-level bound a normalizer or pre-tokenizer may drop characters, so no
                # length proves a text too long; only a text too large to tokenize at all is refused.
                raise PromptError(f"{what} is {len(text)} characters, more than this tokenizer is given at once "
                                  f"({UNPROVEN_MAX_CHARS}){why}")
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

    @cached_property
    def _byte_vocab(self) -> dict[int, str] | None:
        """id -> token string in GPT-2's byte-character space, for a byte-level BPE (None otherwise)."""
        if type(self._tok.decoder).__name__ != "ByteLevel":
            return None
        return {i: t for t, i in self._vocab.items()}

    def missing_bytes(self) -> list[int]:
        """The bytes a byte-level BPE has no token for: text holding them would be dropped when
        encoded (a vocabulary trained without the whole byte alphabet). Empty otherwise."""
        if type(self._tok.decoder).__name__ != "ByteLevel":
            return []
        return sorted(b for c, b in _BYTE_OF_CHAR.items() if c not in self._vocab)

    def token_bytes(self, token: int) -> bytes | None:
        """The exact bytes a token stands for (a byte-level BPE's token may hold part of a UTF-8
        character); None when the tokenizer is not byte-level, or the token not in its vocabulary."""
        added = self._added.get(token)
        if added is not None:
            return added.content.encode("utf-8")
        vocab = self._byte_vocab
        stored = vocab.get(token) if vocab is not None else None
        if stored is None:
            return None
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in stored)
        except KeyError:
            return None

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


def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character table: printable Latin-1 bytes stand for
    themselves; the others (control characters, space, a few more) were moved to U+0100 onwards,
    in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    moved = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + moved)] = b
            moved += 1
    return table


_BYTE_OF_CHAR = _byte_of_char()


class TextStream:
    """Turns tokens into text as they arrive.

    GPT-2's byte-level BPE can split one UTF-8 character across tokens. With a byte-level tokenizer
    the tokens' bytes go through an incremental UTF-8 decoder, which holds back exactly an
    incomplete character's bytes: a real U+FFFD in the text, or a stray invalid byte, can not be
    taken for one (decoding and looking for U+FFFD could, and then cut the next character in two).
    Other tokenizers: tokens are held while their decoded text ends in U+FFFD, at most 4.
    """

    # A UTF-8 character has at most 4 bytes and every token at least one: a tail still broken after
    # this many tokens is genuinely invalid and is emitted as it is (with U+FFFD), not held forever.
    _MAX_HELD = 4

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._held: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        raw = self._tokenizer.token_bytes(token) if not self._held else None
        if raw is not None:
            return self._utf8.decode(raw)
        self._held.append(token)
        text = self._tokenizer.decode(self._held)
        if text.endswith(_REPLACEMENT) and len(self._held) < self._MAX_HELD:
            return ""
        self._held.clear()
        return text

    @property
    def clean(self) -> bool:
        """True when every pushed token has been released as text (nothing held back)."""
        return not self._held and not self._utf8.getstate()[0]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD here)."""
        text = self._utf8.decode(b"", final=True)
        if self._held:
            text += self._tokenizer.decode(self._held)
        self._held.clear()
        return text
