"""The in-place KV cache: local layers keep a bounded window, and sliding it keeps results exact."""

from __future__ import annotations

import numpy as np

from neoedge import Manifest, Model
from neoedge.kv_cache import InPlaceKVCache, local_chunk


def test_local_layers_are_bounded(package):
    manifest = Manifest.read(package)
    model = manifest.model
    cache = InPlaceKVCache(model, manifest.graph, capacity=model.context_length)
    chunk = local_chunk(model.window_size)
    # The window before the next position, a margin to rewind into, and one chunk of new positions.
    assert cache.local_capacity == model.window_size - 1 + chunk + chunk
    per_position = 2 * model.num_heads * model.head_size * 4
    local_layers = model.attention_layers.count("local")
    global_layers = model.num_layers - local_layers
    full = sum(a.nbytes for a in cache.arrays)
    assert full == per_position * (global_layers * model.context_length + local_layers * cache.local_capacity)
    assert full < 0.7 * per_position * model.num_layers * model.context_length
    cache.advance(100)
    cache.local_length = 30
    assert cache.nbytes_used() == per_position * (global_layers * 100 + local_layers * 30)


def test_sliding_happens_and_generation_stays_exact(packages):
    """Greedy tokens from the bounded cache equal those of the plain graph (full concatenated past)."""
    fast, plain = Model(packages[("window8", "gqa")]), Model(packages[("window8", "plain")])
    options = dict(max_new_tokens=200, stop_at_eos=False)
    seq = fast.sequence("Return a list of the words")
    tokens = seq.generate(**options).tokens
    cache = seq._state.cache
    assert cache.length == len(seq) - 1  # the last token is pending
    assert cache.local_length < cache.length  # the local buffers slid many times
    assert tokens == plain.generate("Return a list of the words", **options).tokens


def test_chunked_prefill_equals_one_pass(packages):
    plain = Model(packages[("window8", "plain")])
    fast = Model(packages[("window8", "gqa")])
    ids = np.random.default_rng(3).integers(0, 512, size=150)  # many prefill chunks of 16
    assert np.abs(fast.logits(ids) - plain.logits(ids)).max() < 1e-4


def test_rewind_inside_the_margin_needs_no_recomputation(package):
    model = Model(package)
    seq = model.sequence(tokens=np.random.default_rng(1).integers(0, 512, 100).tolist())
    seq.process()
    cache = seq._state.cache
    margin = cache.margin
    assert cache.can_rewind(len(seq) - margin)  # always, even right after a slide
    seq.rewind(len(seq) - margin)
    assert seq._state.cache is cache and seq.cached == len(seq) - 1
