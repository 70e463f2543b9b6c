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


# The whole text is read into memory and tokenized (in pieces): this bounds both.
MAX_TEXT_BYTES = 64 << 20


@dataclass(frozen=True)
class Windows:
    """Sliding windows over a token sequence; every token is scored exactly once.

    Each window holds up to `length` tokens and starts `stride` after the previous one (1 <= stride
    <= length); the tokens already scored by an earlier window serve only as context. A window's
    logits at position p predict token p + 1, so a window scores the tokens after its first one up
    to its last; when the next window starts right at its end (stride == length: windows that do
    not overlap), it also scores the token just past its end, which the next window cannot predict.
    """

    length: int
    stride: int

    def __post_init__(self) -> None:
        for name in ("length", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvaluationError(f"window {name} must be a positive integer, got {value!r}")
        if self.stride > self.length:
            raise EvaluationError(f"stride must be between 1 and the window ({self.length}), got {self.stride}")

    def spans(self, total: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (begin, end, first, stop): window begin..end-1 predicts tokens first..stop-1."""
        scored_until = 1  # token 0 (the bos we prepend) has nothing to predict it
        for begin in range(0, total, self.stride):
            end = min(begin + self.length, total)
            stop = end + 1 if end < total and begin + self.stride >= end else end
            if stop > scored_until:
                yield begin, end, scored_until, stop
                scored_until = stop
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
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise EvaluationError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_TEXT_BYTES:
        raise EvaluationError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MB: score it in parts")
    try:
        text = raw.decode("utf-8")
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

    The text is tokenized once and preceded by bos, so its first token is scored too. `window`
    defaults to min(context, 1024) and `stride` to window // 2 (None: the default; 0 is an error).
    """
    model = generator.manifest.model
    if window is None:
        window = min(model.context_length, 1024)
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= model.context_length:
        raise EvaluationError(f"window must be between 2 and the context ({model.context_length}), got {window!r}")
    Windows(window, window // 2 if stride is None else stride)  # a bad stride fails before tokenizing
    if reference is not None:
        if reference.manifest.files[reference.manifest.tokenizer].sha256 != \
                generator.manifest.files[generator.manifest.tokenizer].sha256:
            raise EvaluationError("the reference package has a different tokenizer: they cannot be compared")
        if reference.manifest.model.vocab_size != model.vocab_size:
            raise EvaluationError(f"the reference package's vocabulary ({reference.manifest.model.vocab_size}) is "
                                  f"not this one's ({model.vocab_size}): they cannot be compared")
        if reference.manifest.model.context_length < window:
            raise EvaluationError(f"the window ({window}) is longer than the reference package's context "
                                  f"({reference.manifest.model.context_length})")
    if not isinstance(text, str) or not text.strip():
        raise EvaluationError("the text is empty")
    ids = np.concatenate([np.array([model.bos_token_id], np.int64), generator.tokenizer.encode_long(text)])
    if ids.size and int(ids.max()) >= model.vocab_size:
        raise EvaluationError(f"the tokenizer produced id {int(ids.max())}, beyond the model's vocabulary "
                              f"({model.vocab_size})")
    return score(generator.logits, ids, window=window, stride=stride,
                 reference=reference.logits if reference is not None else None, progress=progress)


def score(logits: LogitsFn, ids: np.ndarray, *, window: int, stride: int | None = None,
          reference: LogitsFn | None = None, progress: bool = False) -> QualityReport:
    """Perplexity of ids[1:] given ids[0] (bos) and, with `reference`, top-1 agreement and mean
    KL(reference || model) of the next-token distributions. Any model can be scored through a
    logits function, which is how benchmarks compare neoedge with other runtimes on equal terms."""
    if stride is None:
        stride = max(1, window // 2)
    windows = Windows(window, stride)
    if len(ids) < window:
        raise EvaluationError(f"the text has {len(ids) - 1} tokens, fewer than one window ({window}): "
                              "use a longer text or a smaller window")
    from tqdm.auto import tqdm

    spans = list(windows.spans(len(ids)))
    nll = ref_nll = kl = 0.0
    agree = 0
    for begin, end, first, stop in tqdm(spans, desc="eval", unit="window", disable=not progress):
        targets = ids[first:stop]
        positions = np.arange(len(targets))
        rows = slice(first - 1 - begin, stop - 1 - begin)  # logits at position p predict token p+1
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
