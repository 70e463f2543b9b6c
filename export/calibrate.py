"""Calibration text: what data-aware weight quantization and the int8 KV cache's scales are
measured on.

By default the corpus that ships with neoedge (export/assets/calibration/stdlib-docstrings.txt: a
fixed snapshot of Python standard-library docstrings, PSF-licensed, see its README), so that an
export depends neither on the running Python's standard library nor on anything else on the
machine; `neoedge export --calibration FILE` takes any UTF-8 text instead. The text is tokenized by
the checkpoint's own tokenizer and cut into `sequences` windows of `length` tokens, evenly spaced
over the whole text, in a fixed order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoedge.manifest import CalibrationInfo

from .tiny import CALIBRATION_CORPUS

# Chosen by measurement (benchmarks/quality.py): enough tokens that the inputs' second moments are
# well estimated at hidden 512 (c_proj reads 2048 inputs), while a 125M export stays within twice
# the time of round-to-nearest.
DEFAULT_SEQUENCES, DEFAULT_LENGTH = 32, 256
MIN_TOKENS = 64


class CalibrationError(ValueError):
    """The calibration text cannot be used (missing, not UTF-8, too short)."""


@dataclass(frozen=True)
class CalibrationText:
    text: str
    name: str  # as recorded in the manifest

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def read_calibration(path: str | Path | None = None) -> CalibrationText:
    """The calibration text of `path`, or the built-in corpus (None)."""
    if path is None:
        return CalibrationText(CALIBRATION_CORPUS.read_text(encoding="utf-8"), f"built-in: {CALIBRATION_CORPUS.name}")
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration text not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration text {path} is not UTF-8: {exc}") from exc
    if not text.strip():
        raise CalibrationError(f"calibration text {path} is empty")
    return CalibrationText(text, path.name)


@dataclass(frozen=True)
class CalibrationBatches:
    ids: np.ndarray  # int64 [sequences, length]
    info: CalibrationInfo


def calibration_batches(tokenizer_json: str, calibration: CalibrationText, *, sequences: int = DEFAULT_SEQUENCES,
                        length: int = DEFAULT_LENGTH) -> CalibrationBatches:
    """`sequences` windows of `length` token ids, evenly spaced over the text (fewer, or one
    shorter window, if the text is short)."""
    from tokenizers import Tokenizer

    if sequences < 1 or length < 2:
        raise CalibrationError(f"calibration needs at least one sequence of 2 tokens, got {sequences} x {length}")
    stream = np.asarray(Tokenizer.from_str(tokenizer_json).encode(calibration.text, add_special_tokens=False).ids,
                        dtype=np.int64)
    if len(stream) < MIN_TOKENS:
        raise CalibrationError(f"calibration text {calibration.name} has {len(stream)} tokens; "
                               f"at least {MIN_TOKENS} are needed")
    length = min(length, len(stream))
    sequences = min(sequences, len(stream) // length)
    last = len(stream) - length
    starts = [i * last // max(1, sequences - 1) for i in range(sequences)] if sequences > 1 else [0]
    ids = np.stack([stream[s:s + length] for s in starts])
    return CalibrationBatches(ids, CalibrationInfo(text=calibration.name, sha256=calibration.sha256,
                                                   sequences=len(starts), tokens_per_sequence=length))


def kv_cache_scales(maxima: list[tuple[np.ndarray, np.ndarray]], num_heads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (key scale, value scale), each float32 [heads, 1, head_size]: max |x| / 127 per
    channel (head, head dimension), from the calibration pass's largest keys and values."""
    scales = []
    for pair in maxima:
        key, value = (np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32).reshape(num_heads, 1, -1)
                      for peak in pair)
        scales.append((key, value))
    return scales
