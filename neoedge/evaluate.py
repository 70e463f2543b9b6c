"""Quality of a package measured by the runtime itself: perplexity of a text, and agreement with a
reference package (top-1 and KL divergence of next-token distributions)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NeoedgeError
from .generator import Generator


class EvaluationError(NeoedgeError, ValueError):
    """The text or the settings cannot be evaluated (empty, too short, not UTF-8, bad window)."""


@dataclass(frozen=True)
class Windows:
    """Sliding windows over a token sequence; every token is scored exactly once.

    Each window holds up to `length` tokens and starts `stride` after the previous one; the tokens
    already scored by an earlier window serve only as context.
    """

    length: int
    stride: int

    def spans(self, total: int) -> Iterator[tuple[int, int, int]]:
        """Yield (begin, end, first_scored): predict tokens first_scored..end-1 from window begin..end-1."""
        scored_until = 1  # token 0 (the bos we prepend) has nothing to predict it
        for begin in range(0, total, self.stride):
            end = min(begin + self.length, total)
            if end > scored_until:
                yield begin, end, scored_until
                scored_until = end
            if end == total:
                return


@dataclass(frozen=True)
class QualityReport:
    tokens: int
    windows: int
    window: int
    stride: int
    perplexity: float
    mean_nll: float
    reference_perplexity: float | None = None
    top1_agreement: float | None = None
    mean_kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_text(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"{path} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise EvaluationError(f"{path} is empty")
    return text


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


LogitsFn = Callable[[np.ndarray], np.ndarray]
"""token ids [n] -> next-token logits at every position [n, vocab]."""


def evaluate(generator: Generator, text: str, *, window: int | None = None, stride: int | None = None,
             reference: Generator | None = None, progress: bool = False) -> QualityReport:
    """Perplexity of `text` under `generator` and, with `reference`, how closely it follows it.

    The text is tokenized once and preceded by bos, so its first token is scored too.
    """
    model = generator.manifest.model
    window = window or min(model.context_length, 1024)
    if not 2 <= window <= model.context_length:
        raise EvaluationError(f"window must be between 2 and the context ({model.context_length}), got {window}")
    if reference is not None:
        if reference.manifest.files[reference.manifest.tokenizer].sha256 != \
                generator.manifest.files[generator.manifest.tokenizer].sha256:
            raise EvaluationError("the reference package has a different tokenizer: they cannot be compared")
    if not text.strip():
        raise EvaluationError("the text is empty")
    ids = np.asarray([model.bos_token_id] + generator.tokenizer.encode(text), dtype=np.int64)
    return score(generator.logits, ids, window=window, stride=stride,
                 reference=reference.logits if reference is not None else None, progress=progress)


def score(logits: LogitsFn, ids: np.ndarray, *, window: int, stride: int | None = None,
          reference: LogitsFn | None = None, progress: bool = False) -> QualityReport:
    """Perplexity of ids[1:] given ids[0] (bos) and, with `reference`, top-1 agreement and mean
    KL(reference || model) of the next-token distributions. Any model can be scored through a
    logits function, which is how benchmarks compare neoedge with other runtimes on equal terms."""
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise EvaluationError(f"stride must be between 1 and the window ({window}), got {stride}")
    if len(ids) < window:
        raise EvaluationError(f"the text has {len(ids) - 1} tokens, fewer than one window ({window}): "
                              "use a longer text or a smaller window")
    from tqdm.auto import tqdm

    spans = list(Windows(window, stride).spans(len(ids)))
    nll = ref_nll = kl = 0.0
    agree = 0
    for begin, end, first in tqdm(spans, desc="eval", unit="window", disable=not progress):
        targets = ids[first:end]
        positions = np.arange(len(targets))
        rows = slice(first - 1 - begin, end - 1 - begin)  # logits at position p predict token p+1
        logp = _log_softmax(logits(ids[begin:end])[rows])
        nll -= float(logp[positions, targets].sum())
        if reference is not None:
            ref_logp = _log_softmax(reference(ids[begin:end])[rows])
            ref_nll -= float(ref_logp[positions, targets].sum())
            kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    scored = len(ids) - 1
    compared = reference is not None
    return QualityReport(
        tokens=scored, windows=len(spans), window=window, stride=stride,
        perplexity=float(np.exp(nll / scored)), mean_nll=nll / scored,
        reference_perplexity=float(np.exp(ref_nll / scored)) if compared else None,
        top1_agreement=agree / scored if compared else None,
        mean_kl=kl / scored if compared else None,
    )
