"""Sequences and scoring on packages built without torch: cache reuse, rewind, fork, save/load,
the context policies, and scores that are the log-softmax of the logits."""

from __future__ import annotations

import numpy as np
import pytest

from neoedge import ContextFullError, ContextPolicy, FinishReason, StateFileError

GREEDY = dict(max_new_tokens=10, stop_at_eos=False)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_turns_reuse_the_cache_and_equal_one_shot_generation(tier_model):
    seq = tier_model.sequence()
    for turn, message in enumerate(["User: open it\nAI:", "\nUser: close it\nAI:", "\nUser: thanks\nAI:"]):
        before = len(seq)
        reply = seq.generate(message, max_new_tokens=6, stop_at_eos=False)
        prompt = list(seq.tokens[: len(seq) - len(reply.tokens)])
        one_shot = tier_model.sequence(tokens=prompt).generate(max_new_tokens=6, stop_at_eos=False)
        assert reply.tokens == one_shot.tokens, turn
        assert reply.usage.prompt_tokens == len(prompt) and reply.usage.cached_tokens == max(0, before - 1)


def test_rewind_fork_and_save_load_continue_exactly(tier_models, tmp_path):
    model = tier_models("gqa")
    seq = model.sequence("Return a list of the words")
    prompt = len(seq)
    first = seq.generate(max_new_tokens=30, stop_at_eos=False, logprobs=True)
    seq.rewind(prompt + 12)  # back past more than one local window
    again = seq.generate(max_new_tokens=18, stop_at_eos=False, logprobs=True)
    assert again.tokens == first.tokens[12:]
    np.testing.assert_allclose(again.logprobs, first.logprobs[12:], atol=1e-5)

    fork = seq.fork()
    seq.save(tmp_path / "state")
    loaded = model.load_sequence(tmp_path / "state")
    a, b, c = (s.generate(max_new_tokens=15, stop_at_eos=False, logprobs=True) for s in (seq, fork, loaded))
    assert a.tokens == b.tokens == c.tokens and a.logprobs == b.logprobs == c.logprobs
    fork.generate(" but", **GREEDY)
    assert seq.tokens == loaded.tokens != fork.tokens


def test_a_state_is_refused_by_another_package(tier_models, tmp_path):
    seq = tier_models("gqa").sequence("Open")
    seq.save(tmp_path / "state")
    with pytest.raises(StateFileError, match="another model package"):
        tier_models("plain").load_sequence(tmp_path / "state")


def test_context_policies(tier_models):
    model = tier_models("plain-h12")
    context = model.info.context_length
    with pytest.raises(ContextFullError) as raised:
        model.sequence("Return the").generate(max_new_tokens=context, stop_at_eos=False)
    assert len(raised.value.completion.tokens) == context - len(model.encode("Return the"))
    stopped = model.sequence(policy=ContextPolicy(on_full="stop")).generate(
        "Return the", max_new_tokens=context, stop_at_eos=False)
    assert stopped.finish_reason == FinishReason.CONTEXT
    shifting = model.sequence("Return the", policy=ContextPolicy(on_full="shift", keep=2))
    shifted = shifting.generate(max_new_tokens=2 * context, stop_at_eos=False)
    assert shifted.finish_reason == FinishReason.LENGTH and len(shifted.tokens) == 2 * context
    assert len(shifting) <= context and shifting.tokens[:2] == tuple(model.encode("Return the")[:2])


def test_scores_are_the_log_softmax_of_the_logits(tier_model):
    rng = np.random.default_rng(2)
    vocab = tier_model.info.vocab_size
    prompt = rng.integers(0, vocab, 11).tolist()
    continuations = [rng.integers(0, vocab, n).tolist() for n in (1, 3, 30)]
    scores = tier_model.score(prompt, continuations)
    tolerance = 0.3 if tier_model.manifest.quantization.scheme == "int4" else 2e-4
    for continuation, score in zip(continuations, scores):
        logp = _log_softmax(tier_model.logits(prompt + continuation))[len(prompt) - 1: -1]
        assert score.tokens == tuple(continuation)
        np.testing.assert_allclose(score.logprobs, logp[np.arange(len(continuation)), continuation],
                                   atol=tolerance, rtol=0)
        assert score.greedy is False  # random tokens are not the argmax everywhere


def test_a_greedy_continuation_is_flagged_greedy(tier_models):
    model = tier_models("gqa")
    completion = model.generate("Open the", **GREEDY)
    (score, other) = model.score("Open the", [list(completion.tokens), list(completion.tokens[:-1]) +
                                              [(completion.tokens[-1] + 1) % model.info.vocab_size]])
    assert score.greedy and not other.greedy
    np.testing.assert_allclose(score.logprobs[:-1], other.logprobs[:-1], atol=1e-6)
