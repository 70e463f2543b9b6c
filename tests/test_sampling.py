"""Sampling: the distribution each option defines, and draws that follow it.

The reference below is the plain definition (float64, whole-vocabulary sorts), as transformers'
logits processors apply it: repetition penalty, temperature, top-k, then top-p.
"""

from __future__ import annotations

import numpy as np
import pytest

from neoedge.options import GenerationOptions
from neoedge.sampling import Sampler

GPT_NEO_VOCAB = 50257


def reference(logits: np.ndarray, options: GenerationOptions, seen: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    if options.repetition_penalty != 1.0:
        penalty = options.repetition_penalty
        x[seen] = np.where(x[seen] > 0, x[seen] / penalty, x[seen] * penalty)
    probs = np.zeros_like(x)
    if options.greedy:
        probs[x.argmax()] = 1.0
        return probs
    x = x / options.temperature
    probs = np.exp(x - x.max())
    if 0 < options.top_k < x.size:
        probs[np.argsort(-x)[options.top_k:]] = 0.0
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), options.top_p)) + 1]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return probs


def lm_like_logits(vocab: int, seed: int, *, peaked: bool) -> np.ndarray:
    """A broad background with (if peaked) a few strong candidates, as a language model's logits look."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.5, vocab)
    if peaked:
        logits[rng.choice(vocab, 20, replace=False)] += rng.uniform(6.0, 14.0, 20)
    return logits.astype(np.float32)


OPTIONS = [
    dict(temperature=0.0),
    dict(temperature=0.8),
    dict(temperature=1.3),
    dict(temperature=0.7, top_k=1),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0, top_k=5000),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.5, top_p=0.99),  # flat: the nucleus holds thousands of tokens
    dict(temperature=0.9, top_k=50, top_p=0.8),
    dict(temperature=0.8, top_p=0.95, repetition_penalty=1.3),
    dict(temperature=0.0, repetition_penalty=0.7),
]


@pytest.mark.parametrize("vocab", [GPT_NEO_VOCAB, 1000, 37])
@pytest.mark.parametrize("peaked", [True, False])
@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_distribution_matches_the_definition(overrides, peaked, vocab):
    options = GenerationOptions(seed=0, **overrides)  # top_k >= vocab: no restriction
    logits = lm_like_logits(vocab, seed=vocab, peaked=peaked)
    seen = np.unique(np.random.default_rng(1).integers(0, vocab, 30))
    sampler = Sampler(options, vocab, seen)
    expected = reference(logits, options, seen)
    got = sampler.probabilities(logits)
    assert np.array_equal(got > 0, expected > 0), "a different set of tokens can be drawn"
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def _chi_square_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: upper 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def assert_draws_follow(counts: np.ndarray, probs: np.ndarray) -> None:
    """A chi-square test over every token (rare ones pooled into bins of >= 5 expected draws, so the
    tail is tested, not only the head), and the mass of the rarest half of the tokens within five
    standard deviations of its expectation."""
    draws = counts.sum()
    assert counts[probs == 0].sum() == 0, "drew a token outside the distribution"
    support = np.flatnonzero(probs > 0)
    order = support[np.argsort(probs[support], kind="stable")]
    expected, observed = probs[order] * draws, counts[order]
    edges = np.searchsorted(np.cumsum(expected), np.arange(5.0, expected.sum(), 5.0))
    starts = np.unique(np.r_[0, edges[edges < len(order)]])
    bins_expected, bins_observed = np.add.reduceat(expected, starts), np.add.reduceat(observed, starts)
    statistic = float(((bins_observed - bins_expected) ** 2 / bins_expected).sum())
    df = len(bins_expected) - 1
    if df >= 1:
        assert statistic < _chi_square_critical(df), f"chi-square {statistic:.1f} over {df} degrees of freedom"
    rare = order[: len(order) // 2]
    mass = probs[rare].sum()
    spread = np.sqrt(draws * mass * (1 - mass))
    assert abs(counts[rare].sum() - draws * mass) < 5 * spread + 1, (counts[rare].sum(), draws * mass)


@pytest.mark.parametrize("overrides", [dict(temperature=1.0), dict(temperature=0.9, top_k=12),
                                       dict(temperature=1.2, top_p=0.7), dict(temperature=1.5)],
                         ids=["whole vocabulary", "top_k", "top_p", "flat"])
def test_draws_follow_the_distribution(overrides):
    vocab, draws = 1000, 20000  # 15 whole blocks and a partial one
    logits = lm_like_logits(vocab, seed=3, peaked=True)
    sampler = Sampler(GenerationOptions(seed=5, **overrides), vocab, np.array([0]))
    probs = sampler.probabilities(logits)
    counts = np.bincount([sampler(logits.copy()) for _ in range(draws)], minlength=vocab)
    assert_draws_follow(counts, probs)


@pytest.mark.parametrize("damage", ["drop the rarest half", "halve the rarest tokens' odds"])
def test_the_check_sees_a_sampler_that_gets_the_tail_wrong(damage):
    vocab, draws = 1000, 20000
    logits = lm_like_logits(vocab, seed=3, peaked=False)  # a broad distribution: the tail carries mass
    probs = Sampler(GenerationOptions(seed=5, temperature=1.0), vocab, np.array([0])).probabilities(logits)
    wrong = probs.copy()
    rare = np.argsort(probs)[: vocab // 2]
    wrong[rare] *= 0.0 if damage.startswith("drop") else 0.5
    wrong /= wrong.sum()
    counts = np.bincount(np.random.default_rng(0).choice(vocab, draws, p=wrong), minlength=vocab)
    with pytest.raises(AssertionError):
        assert_draws_follow(counts, probs)


def test_repetition_penalty_applies_to_tokens_as_they_are_drawn():
    vocab = 300
    logits = np.zeros(vocab, np.float32)
    logits[[10, 20]] = [5.0, -5.0]
    sampler = Sampler(GenerationOptions(repetition_penalty=2.0), vocab, np.array([20]))
    assert sampler(logits.copy()) == 10  # greedy; 20 was seen and is pushed further down
    after = logits.copy()
    sampler._apply_penalty(after)
    assert after[10] == 2.5 and after[20] == -10.0 and after[11] == 0.0


def test_same_seed_same_draws_different_seed_different_draws():
    logits = lm_like_logits(GPT_NEO_VOCAB, seed=9, peaked=False)

    def draws(seed):
        sampler = Sampler(GenerationOptions(temperature=1.0, seed=seed), GPT_NEO_VOCAB, np.array([0]))
        return [sampler(logits.copy()) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
