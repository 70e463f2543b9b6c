"""Generation behaviour: options, sampling, stop strings, streaming text."""

from __future__ import annotations

import pytest

from neoedge import GenerationOptions, Generator


@pytest.fixture(scope="module")
def generator(package) -> Generator:
    return Generator(package, intra_threads=1)


def test_stream_joins_to_generate(generator):
    assert "".join(generator.stream("The file", max_new_tokens=30)) == \
        generator.generate("The file", max_new_tokens=30)


def test_max_new_tokens_bounds_output(generator):
    prompt = generator.encode_prompt("x")
    for n in (1, 7):
        assert len(list(generator.generate_tokens(prompt, GenerationOptions(max_new_tokens=n, stop_at_eos=False)))) == n


def test_seeded_sampling_is_reproducible_and_seed_matters(generator):
    options = dict(temperature=1.0, top_p=0.95, max_new_tokens=24)
    a = generator.generate("A list", seed=1, **options)
    assert a == generator.generate("A list", seed=1, **options)
    assert any(generator.generate("A list", seed=s, **options) != a for s in (2, 3, 4))


def test_top_k_one_is_greedy(generator):
    greedy = generator.generate("Return", max_new_tokens=20)
    assert generator.generate("Return", max_new_tokens=20, temperature=0.7, top_k=1, seed=3) == greedy


def test_repetition_penalty_changes_greedy_output(generator):
    plain = generator.generate("it it it", max_new_tokens=30)
    penalized = generator.generate("it it it", max_new_tokens=30, repetition_penalty=1.5)
    assert penalized != plain


def test_stop_string_ends_output_and_is_not_returned(generator):
    full = generator.generate("The", max_new_tokens=40)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    cut = generator.generate("The", max_new_tokens=40, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(generator.stream("The", max_new_tokens=40, stop=[stop])) == cut


def test_eos_ends_generation_and_is_not_returned(generator):
    eos = generator.manifest.model.eos_token_id
    prompt = generator.encode_prompt("The")
    for seed in range(50):  # find a sampled run that produces eos
        free = list(generator.generate_tokens(
            prompt, GenerationOptions(max_new_tokens=200, temperature=3.0, seed=seed, stop_at_eos=False)))
        if eos in free:
            break
    else:
        pytest.fail("no sampled run produced eos")
    stopped = list(generator.generate_tokens(
        prompt, GenerationOptions(max_new_tokens=200, temperature=3.0, seed=seed, stop_at_eos=True)))
    assert stopped == free[: free.index(eos)]


def test_empty_prompt_starts_from_bos(generator):
    assert generator.encode_prompt("") == [generator.manifest.model.bos_token_id]
    assert generator.generate("", max_new_tokens=5, stop_at_eos=False)


def test_generation_stops_at_context_end(generator):
    context = generator.manifest.model.context_length
    prompt = [1] * (context - 3)
    tokens = list(generator.generate_tokens(prompt, GenerationOptions(max_new_tokens=50, stop_at_eos=False)))
    # Each of the last 3 positions takes one generated token; the last position's logits give a 4th.
    assert len(tokens) == 4


def test_package_generation_defaults_apply(generator):
    assert generator.options().max_new_tokens == generator.manifest.generation.max_new_tokens
    assert generator.options(max_new_tokens=3).max_new_tokens == 3


def test_unpacked_weights_give_the_same_logits(package, generator):
    """prepack=False runs the MatMuls on the memory-mapped weights as stored: the same model."""
    import numpy as np

    ids = np.random.default_rng(3).integers(0, 512, size=40)
    unpacked = Generator(package, intra_threads=1, prepack=False)
    np.testing.assert_allclose(unpacked.logits(ids), generator.logits(ids), atol=1e-5, rtol=0)
    assert unpacked.generate("The file", max_new_tokens=12) == generator.generate("The file", max_new_tokens=12)
