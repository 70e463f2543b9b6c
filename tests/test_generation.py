"""Generation behaviour: options, sampling, stop strings, eos, the context end, finish reasons."""

from __future__ import annotations

import numpy as np
import pytest

from neoedge import ContextFullError, ContextPolicy, FinishReason, GenerationOptions, Model, SessionSettings


@pytest.fixture(scope="module")
def model(package) -> Model:
    return Model(package, settings=SessionSettings(intra_threads=1))


def test_stream_events_join_to_the_completion(model):
    events = list(model.stream("The file", max_new_tokens=30, stop_at_eos=False))
    completion = model.generate("The file", max_new_tokens=30, stop_at_eos=False)
    assert "".join(e.text for e in events) == completion.text
    assert [e.token for e in events if e.token is not None] == list(completion.tokens)
    assert [e.index for e in events] == list(range(30))
    assert [e.finish_reason for e in events] == [None] * 29 + [FinishReason.LENGTH]
    assert completion.finish_reason == FinishReason.LENGTH
    assert completion.usage.new_tokens == 30 and completion.usage.prompt_tokens == len(model.encode("The file"))


def test_max_new_tokens_bounds_output(model):
    for n in (1, 7):
        completion = model.sequence(tokens=model.encode("x")).generate(max_new_tokens=n, stop_at_eos=False)
        assert len(completion.tokens) == n and completion.finish_reason == FinishReason.LENGTH


def test_seeded_sampling_is_reproducible_and_seed_matters(model):
    options = dict(temperature=1.0, top_p=0.95, max_new_tokens=24)
    a = model.generate("A list", seed=1, **options).text
    assert a == model.generate("A list", seed=1, **options).text
    assert any(model.generate("A list", seed=s, **options).text != a for s in (2, 3, 4))


def test_top_k_one_is_greedy(model):
    greedy = model.generate("Return", max_new_tokens=20).tokens
    assert model.generate("Return", max_new_tokens=20, temperature=0.7, top_k=1, seed=3).tokens == greedy


def test_repetition_penalty_changes_greedy_output(model):
    plain = model.generate("it it it", max_new_tokens=30).tokens
    penalized = model.generate("it it it", max_new_tokens=30, repetition_penalty=1.5).tokens
    assert penalized != plain


def test_stop_string_ends_output_and_is_not_returned(model):
    full = model.generate("The", max_new_tokens=40, stop_at_eos=False).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = model.generate("The", max_new_tokens=40, stop=[stop], stop_at_eos=False)
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == FinishReason.STOP
    assert "".join(e.text for e in model.stream("The", max_new_tokens=40, stop=[stop], stop_at_eos=False)) == cut.text


def _sampled_run_with_eos(model):
    eos = model.info.eos_token_id
    prompt = model.encode("The")
    for seed in range(50):  # find a sampled run that produces eos
        free = model.sequence(tokens=prompt).generate(max_new_tokens=200, temperature=3.0, seed=seed,
                                                      stop_at_eos=False)
        if eos in free.tokens:
            return prompt, seed, list(free.tokens)
    pytest.fail("no sampled run produced eos")


def test_eos_ends_generation_and_is_not_returned(model):
    prompt, seed, free = _sampled_run_with_eos(model)
    eos = model.info.eos_token_id
    seq = model.sequence(tokens=prompt)
    stopped = seq.generate(max_new_tokens=200, temperature=3.0, seed=seed)
    assert list(stopped.tokens) == free[: free.index(eos)]
    assert stopped.finish_reason == FinishReason.EOS
    assert seq.tokens == tuple(prompt) + stopped.tokens  # eos is not part of the sequence


def test_empty_prompt_starts_from_bos(model):
    seq = model.sequence()
    completion = seq.generate(max_new_tokens=5, stop_at_eos=False)
    assert seq.tokens[0] == model.info.bos_token_id and len(completion.tokens) == 5


def test_context_end_is_an_error_by_default_and_keeps_the_tokens(model):
    context = model.info.context_length
    seq = model.sequence(tokens=[1] * (context - 3))
    with pytest.raises(ContextFullError, match="end of the model's context") as caught:
        seq.generate(max_new_tokens=50, stop_at_eos=False)
    partial = caught.value.completion
    assert len(partial.tokens) == 3 and partial.finish_reason == FinishReason.CONTEXT
    assert len(seq) == context and seq.tokens[-3:] == partial.tokens
    with pytest.raises(ContextFullError, match="do not fit"):
        seq.append(tokens=[1])


def test_context_end_with_policy_stop_is_a_finish_reason(model):
    context = model.info.context_length
    seq = model.sequence(tokens=[1] * (context - 3), policy=ContextPolicy(on_full="stop"))
    completion = seq.generate(max_new_tokens=50, stop_at_eos=False)
    assert len(completion.tokens) == 3 and completion.finish_reason == FinishReason.CONTEXT


def test_context_shift_keeps_the_pinned_start_and_the_recent_tokens(model):
    context = model.info.context_length
    prompt = np.random.default_rng(0).integers(1, model.info.vocab_size, size=context - 2).tolist()
    seq = model.sequence(tokens=prompt, policy=ContextPolicy(on_full="shift", keep=5))
    completion = seq.generate(max_new_tokens=10, stop_at_eos=False)
    assert len(completion.tokens) == 10 and completion.finish_reason == FinishReason.LENGTH
    # Shifted once, when the sequence was full: the first 5 tokens, then the most recent ones.
    assert seq.tokens[:5] == tuple(prompt[:5])
    assert seq.tokens[-10:] == completion.tokens
    assert len(seq) == context // 2 + 8  # 2 tokens filled the context, then 8 after the shift
    # What it computed after the shift is what a fresh sequence holding those tokens computes.
    fresh = model.sequence(tokens=list(seq.tokens[:-1]))
    last = [[seq.tokens[-1]]]
    seq.rewind(len(seq) - 1)
    np.testing.assert_allclose(fresh.score(last)[0].logprobs, seq.score(last)[0].logprobs, atol=1e-5)


def test_a_shift_that_cannot_keep_every_pinned_token_is_refused(model):
    """A shift keeps half the context in all: pinning more than that was silently cut down, and the
    shift dropped tokens it promised to keep."""
    from neoedge import OptionsError

    half = model.info.context_length // 2
    with pytest.raises(OptionsError, match=f"keep={half + 1} cannot be honoured"):
        model.sequence(policy=ContextPolicy(on_full="shift", keep=half + 1))
    model.sequence(policy=ContextPolicy(on_full="shift", keep=half))
    model.sequence(policy=ContextPolicy(on_full="stop", keep=half + 1))  # keep only matters to shifts


@pytest.mark.parametrize("empty", [[], (), range(0), np.array([], np.int64)], ids=["list", "tuple", "range", "ndarray"])
def test_appending_no_tokens_is_the_same_whatever_holds_them(model, empty):
    seq = model.sequence("Open the file")
    assert seq.append(tokens=empty) == 0


def test_a_stop_string_after_a_context_shift_is_cut_out(model):
    """A shift drops tokens from the front while generating; the stop string found after it is still
    cut from the right place (the rewind counts the generated tokens, not the length at the start)."""
    context = model.info.context_length
    prompt = np.random.default_rng(0).integers(1, model.info.vocab_size, size=context - 4).tolist()
    policy = ContextPolicy(on_full="shift")
    free = model.sequence(tokens=prompt, policy=policy).generate(max_new_tokens=30, stop_at_eos=False)
    pieces = [model.decode([t]) for t in free.tokens]
    for token in range(6, len(pieces) - 1):  # the shift happens at token 4
        start = len("".join(pieces[:token]))
        stop = free.text[start:start + 3]
        if len(stop) == 3 and free.text.find(stop) == start:
            break
    else:
        pytest.skip("no stop string found that first appears after the shift")
    seq = model.sequence(tokens=prompt, policy=policy)
    completion = seq.generate(max_new_tokens=30, stop_at_eos=False, stop=[stop])
    assert completion.finish_reason == FinishReason.STOP
    assert completion.text == free.text[:start]
    assert seq.text.endswith(completion.text) and not seq.text.endswith(stop)


def test_package_generation_defaults_apply(model):
    assert model.options().max_new_tokens == model.manifest.generation.max_new_tokens
    assert model.options(max_new_tokens=3).max_new_tokens == 3


def test_options_are_checked_when_the_call_is_made(model):
    with pytest.raises(ValueError, match="temperature"):
        model.stream("x", temperature=-1)  # not on the first next()
    with pytest.raises(ValueError, match="unknown generation option"):
        model.sequence().stream("x", temprature=0.5)
    with pytest.raises(ValueError, match="either a GenerationOptions or keyword options"):
        model.generate("x", GenerationOptions(), max_new_tokens=3)


def test_logprobs_are_the_models_log_softmax(model):
    seq = model.sequence("Open the")
    prompt = list(seq.tokens)
    completion = seq.generate(max_new_tokens=6, stop_at_eos=False, top_logprobs=3)
    logits = model.logits(prompt + list(completion.tokens)[:-1])[len(prompt) - 1:]
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = logp[np.arange(6), list(completion.tokens)]
    np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)
    events = list(model.sequence(tokens=prompt).stream(max_new_tokens=6, stop_at_eos=False, top_logprobs=3))
    for row, event in zip(logp, events):
        best = np.argsort(-row)[:3]
        assert [t.token for t in event.top_logprobs] == best.tolist()
        np.testing.assert_allclose([t.logprob for t in event.top_logprobs], row[best], atol=1e-4)
    assert model.generate("x", max_new_tokens=2).logprobs is None  # not asked for: not computed


def test_unpacked_weights_give_the_same_logits(package, model):
    """prepack=False runs the MatMuls on the memory-mapped weights as stored: the same model."""
    ids = np.random.default_rng(3).integers(0, 512, size=40)
    unpacked = Model(package, settings=SessionSettings(intra_threads=1, prepack=False))
    np.testing.assert_allclose(unpacked.logits(ids), model.logits(ids), atol=1e-5, rtol=0)
    assert unpacked.generate("The file", max_new_tokens=12).tokens == model.generate("The file", max_new_tokens=12).tokens


def test_usage_counts_every_generated_token_even_those_a_stop_string_cut(model):
    free = model.generate("Open the", max_new_tokens=20, stop_at_eos=False)
    stop = free.text[len(free.text) // 2:][:3]
    events = list(model.stream("Open the", max_new_tokens=20, stop_at_eos=False, stop=[stop]))
    completion = model.generate("Open the", max_new_tokens=20, stop_at_eos=False, stop=[stop])
    sampled = sum(e.token is not None for e in events)
    assert completion.finish_reason == FinishReason.STOP
    assert completion.usage.new_tokens == sampled >= len(completion.tokens)


def test_a_generation_that_shifted_past_the_context_decodes(model):
    context = model.info.context_length
    seq = model.sequence(policy=ContextPolicy(on_full="shift"))
    completion = seq.generate("Open the", max_new_tokens=context + 40, stop_at_eos=False)
    assert len(completion.tokens) > context
    assert model.decode(completion.tokens) == completion.text
