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

import json
import logging
from pathlib import Path

from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _byte_level_table() -> dict[str, int]:
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


class TokenPieces:
    """token id -> (bytes, display string), computed on first use and kept."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_file: Path) -> None:
        self._tokenizer = tokenizer
        self._vocab: dict[int, str] = {}
        self._special: set[int] = set()
        try:
            data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
            if (data.get("decoder") or {}).get("type") == "ByteLevel":
                self._vocab = {int(i): t for t, i in data["model"]["vocab"].items()}
                for added in data.get("added_tokens", []):
                    self._vocab[int(added["id"])] = added["content"]
                    self._special.add(int(added["id"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cannot read the vocabulary of %s (%s): token bytes come from decoding", tokenizer_file, exc)
            self._vocab = {}
        self._table = _byte_level_table()
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
        stored = self._vocab.get(token)
        if stored is not None:
            if token in self._special:
                return stored.encode("utf-8")
            try:
                return bytes(self._table[c] for c in stored)
            except KeyError:
                pass
        return self._tokenizer.decode([token]).encode("utf-8")
