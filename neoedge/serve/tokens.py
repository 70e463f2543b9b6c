"""Each token as OpenAI's log-probability fields show it: its UTF-8 bytes and a printable string.

GPT-Neo's byte-level BPE splits some characters across tokens, so a token is a run of bytes, not
always text. The vocabulary of a byte-level tokenizer stores each byte as one printable character
(GPT-2's reversible byte-to-character table): mapping them back gives the token's exact bytes.
A token whose bytes are not valid UTF-8 on their own is shown as "bytes:\\xe2\\x80" (OpenAI's
convention); its `bytes` field has the real bytes, which a client joins to rebuild the generated
text. (A chat reply's `content` leaves out the whitespace it starts with after "Assistant:", which
the first token's bytes still hold.)
"""

from __future__ import annotations

from ..tokenizer import Tokenizer


class TokenPieces:
    """token id -> (bytes, display string), computed on first use and kept."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[bytes, str]] = {}

    def __call__(self, token: int) -> tuple[bytes, str]:
        piece = self._cache.get(token)
        if piece is None:
            raw = self._bytes(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            piece = self._cache[token] = (raw, text)
        return piece

    def _bytes(self, token: int) -> bytes:
        raw = self._tokenizer.token_bytes(token)
        return raw if raw is not None else self._tokenizer.decode([token]).encode("utf-8")
