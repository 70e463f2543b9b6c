"""Logits → next token. The sampler owns its state: options, random generator, seen tokens.

Sampling runs once per generated token, beside a decode step of a few milliseconds, so it avoids
whole-vocabulary sorts and selections (a full argsort of GPT-Neo's 50,257 logits alone costs ~5 ms
here, argpartition ~1 ms). The vocabulary is viewed as blocks of `BLOCK` logits: the k largest
logits always lie in the k blocks with the largest maxima, and a draw from the whole distribution
finds its block from block sums first. A wide nucleus is found by binning, not sorting. Work
buffers are allocated once per generation.
"""

from __future__ import annotations

import numpy as np

from .options import GenerationOptions

BLOCK = 64
BINS, BINS_PER_UNIT = 512, 8.0


class Sampler:
    def __init__(self, options: GenerationOptions, vocab_size: int, context: np.ndarray) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)
        self._vocab = vocab_size
        self._inverse_temperature = 0.0 if options.greedy else 1.0 / options.temperature
        self._penalize = options.repetition_penalty != 1.0
        # Buffers only for what these options use: greedy decoding without a penalty needs none.
        if not options.greedy:
            # Scaled logits, padded to whole blocks with -inf (weight 0 after exp).
            blocks = -(-vocab_size // BLOCK)
            self._scores = np.full(blocks * BLOCK, -np.inf, np.float32)
            self._blocks = self._scores.reshape(blocks, BLOCK)
            self._weights = np.zeros_like(self._blocks)
            self._distance = np.empty(vocab_size, np.float32)
        if self._penalize:
            # Tokens already seen (prompt and output): a mask to test membership and the distinct
            # ids, so a step touches only those logits.
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._seen[context] = True
            distinct = np.flatnonzero(self._seen)
            self._seen_ids = np.zeros(vocab_size, np.int64)
            self._seen_ids[: distinct.size] = distinct
            self._seen_count = distinct.size
            self._penalized = np.empty(vocab_size, np.float32)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token from one position's logits [vocab]. `logits` is left as it is."""
        if self._penalize:
            np.copyto(self._penalized, logits)
            logits = self._penalized
            self._apply_penalty(logits)
        if self.options.greedy:
            token = int(logits.argmax())
        else:
            ids, weights = self._distribution(logits)
            token = self._draw(ids, weights)
        if self._penalize and not self._seen[token]:
            self._seen[token] = True
            self._seen_ids[self._seen_count] = token
            self._seen_count += 1
        return token

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution the next token is drawn from, over the whole vocabulary [vocab] (float64).
        For inspection and tests; generation never materialises it."""
        logits = np.array(logits, np.float32)
        if self._penalize:
            self._apply_penalty(logits)
        probs = np.zeros(self._vocab)
        if self.options.greedy:
            probs[logits.argmax()] = 1.0
            return probs
        ids, weights = self._distribution(logits)
        if ids is None:
            probs[:] = weights.ravel()[: self._vocab]
        else:
            probs[ids] = weights
        return probs / probs.sum()

    def _apply_penalty(self, logits: np.ndarray) -> None:
        # As transformers: positive logits are divided by the penalty, negative ones multiplied.
        ids = self._seen_ids[: self._seen_count]
        seen = logits[ids]
        penalty = self.options.repetition_penalty
        logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(token ids, unnormalised weights) to draw from; ids None means the whole vocabulary,
        weights then being the [blocks, BLOCK] buffer."""
        opts = self.options
        scores = self._scores
        np.multiply(logits, self._inverse_temperature, out=scores[: self._vocab])
        top = scores[: self._vocab].max()
        if 0 < opts.top_k < self._vocab:
            ids = self._largest(opts.top_k)
            weights = np.exp(scores[ids] - top, dtype=np.float64)
            if opts.top_p < 1.0:
                ids, weights = _nucleus(ids, weights, weights.sum(), opts.top_p)
            return ids, weights
        np.subtract(self._blocks, top, out=self._weights)
        np.exp(self._weights, out=self._weights)
        if opts.top_p >= 1.0:
            return None, self._weights
        total = self._weights.sum(dtype=np.float64)
        # The nucleus is usually a few dozen tokens: look among the 64 largest first.
        ids = self._largest(min(64, self._vocab))
        weights = self._weights.ravel()[ids].astype(np.float64)
        if weights.sum() >= opts.top_p * total:
            return _nucleus(ids, weights, total, opts.top_p)
        return self._wide_nucleus(top, total, opts.top_p)

    def _wide_nucleus(self, top: float, total: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
        """The nucleus of a flat distribution (thousands of tokens) without sorting the vocabulary:
        tokens are binned by how far their score lies below the top one (BINS_PER_UNIT bins per unit
        of scaled logit); every bin before the one where the mass reaches top_p is kept whole, and
        only that bin is sorted."""
        scores = self._scores[: self._vocab]
        weights = self._weights.ravel()[: self._vocab]
        distance = self._distance
        np.subtract(top, scores, out=distance)
        np.multiply(distance, BINS_PER_UNIT, out=distance)
        np.minimum(distance, BINS - 1, out=distance)
        bins = distance.astype(np.int32)
        cumulative = np.cumsum(np.bincount(bins, weights=weights, minlength=BINS))
        target = top_p * total
        crossing = min(int(np.searchsorted(cumulative, target)), BINS - 1)
        inside = np.flatnonzero(bins == crossing)
        inside_weights = weights[inside].astype(np.float64)
        order = np.argsort(inside_weights)[::-1]
        before = cumulative[crossing - 1] if crossing else 0.0
        count = int(np.searchsorted(before + np.cumsum(inside_weights[order]), target)) + 1
        ids = np.concatenate([np.flatnonzero(bins < crossing), inside[order[:count]]])
        return ids, weights[ids].astype(np.float64)

    def _largest(self, k: int) -> np.ndarray:
        """Ids of the k largest scaled logits, in no particular order."""
        maxima = self._blocks.max(axis=1)
        if k >= maxima.size:
            return np.argpartition(self._scores[: self._vocab], -k)[-k:]
        # At least k logits are >= the k-th largest block maximum, so every one of the k largest
        # logits is too, and lies in a block whose maximum reaches it.
        threshold = np.partition(maxima, -k)[-k]
        blocks = np.flatnonzero(maxima >= threshold)
        candidates = (blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel()
        return candidates[np.argpartition(self._scores[candidates], -k)[-k:]]

    def _draw(self, ids: np.ndarray | None, weights: np.ndarray) -> int:
        if ids is not None:
            cumulative = np.cumsum(weights)
            index = np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right")
            return int(ids[min(index, ids.size - 1)])
        # Whole vocabulary: find the block from block sums, then the token within it.
        sums = weights.sum(axis=1, dtype=np.float64)
        cumulative = np.cumsum(sums)
        target = self._rng.random() * cumulative[-1]
        block = int(np.searchsorted(cumulative, target, side="right"))
        if block >= sums.size or sums[block] == 0.0:  # rounding at the very end
            block = int(np.flatnonzero(sums)[-1])
        inside = np.cumsum(weights[block], dtype=np.float64)
        target -= cumulative[block - 1] if block else 0.0
        offset = int(np.searchsorted(inside, target, side="right"))
        # Rounding can land past the block's last token with weight (or on padding): step back.
        offset = min(offset, int(np.flatnonzero(weights[block])[-1]))
        return block * BLOCK + offset


def _nucleus(ids: np.ndarray, weights: np.ndarray, total: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely prefix whose mass reaches top_p of `total`; the top token always stays."""
    order = np.argsort(weights)[::-1]
    cumulative = np.cumsum(weights[order])
    keep = order[: int(np.searchsorted(cumulative, top_p * total)) + 1]
    return ids[keep], weights[keep]
