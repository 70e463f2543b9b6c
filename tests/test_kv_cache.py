"""The in-place KV cache: local layers keep a bounded window, and sliding it keeps results exact."""

from __future__ import annotations

import numpy as np

from neoedge import Generator, Manifest
from neoedge.kv_cache import InPlaceKVCache, local_chunk


def test_local_layers_are_bounded(package):
    manifest = Manifest.read(package)
    model = manifest.model
    cache = InPlaceKVCache(model, manifest.graph, capacity=model.context_length)
    assert cache.local_capacity == model.window_size - 1 + local_chunk(model.window_size)
    per_position = 2 * model.num_heads * model.head_size * 4
    local_layers = model.attention_layers.count("local")
    global_layers = model.num_layers - local_layers
    assert cache.nbytes == per_position * (global_layers * model.context_length + local_layers * cache.local_capacity)
    assert cache.nbytes < 0.6 * per_position * model.num_layers * model.context_length


def test_sliding_happens_and_generation_stays_exact(packages):
    """Greedy tokens from the bounded cache equal those of the plain graph (full concatenated past)."""
    fast, plain = Generator(packages[("window8", "gqa")]), Generator(packages[("window8", "plain")])
    prompt = fast.encode_prompt("Return a list of the words")
    from neoedge import GenerationOptions

    options = GenerationOptions(max_new_tokens=200, stop_at_eos=False)
    tokens = list(fast.generate_tokens(prompt, options))
    cache = fast._runner._cache
    assert cache.length == len(prompt) + 199
    assert cache.local_length < cache.length  # the local buffers slid many times
    assert tokens == list(plain.generate_tokens(prompt, options))


def test_chunked_prefill_equals_one_pass(packages):
    plain = Generator(packages[("window8", "plain")])
    fast = Generator(packages[("window8", "gqa")])
    ids = np.random.default_rng(3).integers(0, 512, size=150)  # many prefill chunks of 16
    assert np.abs(fast.logits(ids) - plain.logits(ids)).max() < 1e-4
