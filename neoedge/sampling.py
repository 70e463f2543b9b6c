"""Logits → next token. The sampler owns its state: options, random generator, seen tokens."""

from __future__ import annotations

import numpy as np

from .options import GenerationOptions


class Sampler:
    def __init__(self, options: GenerationOptions, vocab_size: int, context: np.ndarray) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)
        self._penalize = options.repetition_penalty != 1.0
        # Tokens already seen (prompt and output), for the repetition penalty.
        self._seen = np.zeros(vocab_size, dtype=bool)
        self._seen[context] = True

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token from one position's logits [vocab]. May modify `logits` in place."""
        if self._penalize:
            self._apply_penalty(logits)
        if self.options.greedy:
            token = int(logits.argmax())
        else:
            token = self._sample(logits)
        if self._penalize:
            self._seen[token] = True
        return token

    def _apply_penalty(self, logits: np.ndarray) -> None:
        # As transformers: positive logits are divided by the penalty, negative ones multiplied.
        seen = logits[self._seen]
        penalty = self.options.repetition_penalty
        logits[self._seen] = np.where(seen > 0, seen / penalty, seen * penalty)

    def _sample(self, logits: np.ndarray) -> int:
        opts = self.options
        scores = logits.astype(np.float64) / opts.temperature
        candidates = np.arange(scores.shape[0])
        if 0 < opts.top_k < scores.shape[0]:
            candidates = np.argpartition(scores, -opts.top_k)[-opts.top_k:]
            scores = scores[candidates]
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if opts.top_p < 1.0:
            order = np.argsort(probs)[::-1]
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix reaching top_p; the most likely token always stays.
            keep = order[: int(np.searchsorted(cumulative, opts.top_p)) + 1]
            candidates, probs = candidates[keep], probs[keep]
            probs /= probs.sum()
        return int(candidates[self._rng.choice(probs.shape[0], p=probs)])
