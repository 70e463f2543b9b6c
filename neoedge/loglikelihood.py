"""Log-likelihoods of many (context, continuation) token pairs, as evaluation harnesses ask for them.

Multiple-choice tasks score several continuations after one context (hellaswag: 4 endings, piqa: 2
solutions), so requests are grouped by context: each context is run through the model once and
every continuation of it is scored from its cache. A context is never recomputed for its other
continuations, and the logits of its positions are never computed (only the last one's, which
predicts the first continuation token).

With batch_size 1 each context runs in a sequence of its own (`Sequence.score`). With more, short
contexts share their first pass, `batch_size` at a time (`batch_scoring.ContextBatch`): one pass
for the contexts and their first continuations, then, on neoedge's Attention kernel, one pass per
further round of continuations (the second of every context, then the third, ...), or else one per
further multi-token continuation.

Pairs longer than the window are cut from the left the way lm-eval's Hugging Face backend cuts them:
the last `max_length + 1` tokens of context + continuation are kept (the last token is predicted,
never run), so a continuation keeps all its tokens and loses context instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence as Seq
from typing import TYPE_CHECKING

from .batch_scoring import LOGITS_BUDGET, ContextBatch
from .cancel import CancelToken
from .errors import ContextFullError, PromptError
from .events import ContinuationScore
from .runner import GqaRunner

if TYPE_CHECKING:
    from .model import Model

Pair = tuple[Seq[int], Seq[int]]

BATCH_WIDTH = 512
"""Longest row (context + continuation) scored in a shared pass; longer ones run on their own."""


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


def score_pairs(model: Model, pairs: Seq[Pair], *, max_length: int | None = None, batch_size: int = 1,
                cancel: CancelToken | None = None,
                on_scored: Callable[[int, ContinuationScore], None] | None = None) -> list[ContinuationScore]:
    """Score every continuation after its context; results in the order of `pairs`.

    max_length: positions one pass may see (default: the model's context).
    batch_size: contexts whose first pass is shared (GroupQueryAttention packages; see
        batch_scoring). 1 runs each context in its own pass.
    on_scored(index, score): called as each pair is scored (progress bars, caches).
    """
    context_length = model.info.context_length
    max_length = context_length if max_length is None else max_length
    if not 1 <= max_length <= context_length:
        raise PromptError(f"max_length must be between 1 and the model's context ({context_length}), "
                          f"got {max_length}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    groups: dict[tuple[int, ...], list[int]] = {}
    continuations: list[list[int]] = []
    for index, (context, continuation) in enumerate(pairs):
        ids = model.check_tokens(continuation, "continuation")
        key = window_context(model.check_tokens(context, "context"), ids, max_length)
        groups.setdefault(key, []).append(index)
        continuations.append(ids)
    results: list[ContinuationScore | None] = [None] * len(pairs)

    def done(members: list[int], scores: list[ContinuationScore]) -> None:
        for index, score in zip(members, scores):
            results[index] = score
            if on_scored is not None:
                on_scored(index, score)

    sequential = list(groups.items())
    if batch_size > 1 and isinstance(model.runner, GqaRunner):
        width = min(context_length, BATCH_WIDTH)
        fits = [(c, m) for c, m in sequential if len(c) + max(len(continuations[i]) for i in m) - 1 <= width]
        sequential = [(c, m) for c, m in sequential if len(c) + max(len(continuations[i]) for i in m) - 1 > width]
        # Rows of similar length share a pass: little padding, few distinct logits positions.
        fits.sort(key=lambda g: len(g[0]) + len(continuations[g[1][0]]))
        batch = ContextBatch(model.runner, min(batch_size, max(len(fits), 1)), width)
        for part in _batches(fits, continuations, batch_size, model.info.vocab_size):
            if cancel is not None and cancel.cancelled:
                raise PromptError("scoring was cancelled")
            scored = batch.score([c for c, _ in part], [[continuations[i] for i in m] for _, m in part])
            for (_, members), scores in zip(part, scored):
                done(members, scores)
    # One sequence for every other context: emptying it rewinds its cache in place, so each group
    # costs no new cache or input buffers.
    seq = model.sequence()
    for context, members in sequential:
        if cancel is not None and cancel.cancelled:
            raise PromptError("scoring was cancelled")
        seq.reset()
        seq.append(tokens=list(context))
        done(members, seq.score([continuations[i] for i in members], cancel=cancel))
    return results  # type: ignore[return-value]  # every index belongs to exactly one group


Group = tuple[tuple[int, ...], list[int]]


def _batches(groups: list[Group], continuations: list[list[int]], rows: int, vocab: int) -> Iterator[list[Group]]:
    """Consecutive groups, at most `rows` at a time, whose pass returns at most LOGITS_BUDGET of logits
    (each row needs logits from its context's last position to its first continuation's end)."""
    part: list[Group] = []
    for group in groups:
        candidate = part + [group]
        ends = [len(c) + len(continuations[m[0]]) - 1 for c, m in candidate]
        positions = max(ends) - min(len(c) for c, _ in candidate) + 1
        if part and (len(candidate) > rows or len(candidate) * positions * vocab * 4 > LOGITS_BUDGET):
            yield part
            part = [group]
        else:
            part = candidate
    if part:
        yield part
