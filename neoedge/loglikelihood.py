"""Log-likelihoods of many (context, continuation) token pairs, as evaluation harnesses ask for them.

Multiple-choice tasks score several continuations after one context (hellaswag: 4 endings, piqa: 2
solutions), so requests are grouped by context: each context is run through the model once, in its
own sequence, and every continuation of it is scored from that sequence's cache
(`Sequence.score`). A context is never recomputed for its other continuations, and the logits of
its positions are never computed (only the last one's, which predicts the first continuation token).

Pairs longer than the window are cut from the left the way lm-eval's Hugging Face backend cuts them:
the last `max_length + 1` tokens of context + continuation are kept (the last token is predicted,
never run), so a continuation keeps all its tokens and loses context instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from typing import TYPE_CHECKING

from .cancel import CancelToken
from .errors import ContextFullError, PromptError
from .events import ContinuationScore

if TYPE_CHECKING:
    from .model import Model

Pair = tuple[Seq[int], Seq[int]]


def window_context(context: Seq[int], continuation: Seq[int], max_length: int) -> tuple[int, ...]:
    """The context a continuation is scored after: `context`, cut from the left so that context +
    continuation minus its last token fit `max_length` positions."""
    if not continuation:
        raise PromptError("a continuation is empty: it has no tokens to score")
    if len(continuation) > max_length:
        raise ContextFullError(f"a continuation of {len(continuation)} tokens does not fit the "
                               f"{max_length}-token window even without context")
    keep = max_length + 1 - len(continuation)
    context = tuple(context[-keep:]) if len(context) > keep else tuple(context)
    if not context:
        raise PromptError("a context is empty: a continuation needs at least one token before it "
                          "(lm-eval puts <|endoftext|> there)")
    return context


def score_pairs(model: Model, pairs: Seq[Pair], *, max_length: int | None = None,
                cancel: CancelToken | None = None,
                on_scored: Callable[[int, ContinuationScore], None] | None = None) -> list[ContinuationScore]:
    """Score every continuation after its context; results in the order of `pairs`.

    max_length: positions one pass may see (default: the model's context).
    on_scored(index, score): called as each pair is scored (progress bars, caches).
    """
    context_length = model.info.context_length
    max_length = context_length if max_length is None else max_length
    if not 1 <= max_length <= context_length:
        raise PromptError(f"max_length must be between 1 and the model's context ({context_length}), "
                          f"got {max_length}")
    groups: dict[tuple[int, ...], list[int]] = {}
    continuations: list[list[int]] = []
    for index, (context, continuation) in enumerate(pairs):
        ids = model.check_tokens(continuation, "continuation")
        key = window_context(model.check_tokens(context, "context"), ids, max_length)
        groups.setdefault(key, []).append(index)
        continuations.append(ids)
    results: list[ContinuationScore | None] = [None] * len(pairs)
    for context, members in groups.items():
        scores = model.sequence(tokens=list(context)).score([continuations[i] for i in members], cancel=cancel)
        for index, score in zip(members, scores):
            results[index] = score
            if on_scored is not None:
                on_scored(index, score)
    return results  # type: ignore[return-value]  # every index belongs to exactly one group
