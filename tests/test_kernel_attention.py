"""neoedge.kernels::Attention against onnxruntime's own GroupQueryAttention on the same inputs: the
kernel graph swaps one for the other, so the stock op is the reference. Ragged first prompts,
batched decode at different lengths, prompts over a past, local windows crossed, every kernel path
this CPU runs, and the cache updated in place through IOBinding as the runtime binds it."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import neoedge.kernels as kernels

PATHS = list(kernels.runnable_paths())
pytestmark = pytest.mark.skipif(not PATHS, reason="the native kernel library is not built")


def graphs(heads: int, head_size: int, capacity: int, window: int, seed: int):
    """(stock GroupQueryAttention model, neoedge Attention model) sharing their cache scales."""
    rng = np.random.default_rng(seed)
    k_scale = rng.uniform(0.01, 0.05, (heads, 1, head_size)).astype(np.float32)
    v_scale = rng.uniform(0.01, 0.05, (heads, 1, head_size)).astype(np.float32)
    hd = heads * head_size
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", 3 * hd]),
              helper.make_tensor_value_info("past_k", TensorProto.INT8, ["B", heads, capacity, head_size]),
              helper.make_tensor_value_info("past_v", TensorProto.INT8, ["B", heads, capacity, head_size]),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", hd]),
               helper.make_tensor_value_info("present_k", TensorProto.INT8, ["B", heads, capacity, head_size]),
               helper.make_tensor_value_info("present_v", TensorProto.INT8, ["B", heads, capacity, head_size])]
    scales = [numpy_helper.from_array(k_scale, "k_scale"), numpy_helper.from_array(v_scale, "v_scale")]
    stock = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_k", "past_v", "seqlens", "total", "", "", "", "", "",
                                "k_scale", "v_scale"], ["out", "present_k", "present_v"], domain="com.microsoft",
        num_heads=heads, kv_num_heads=heads, scale=1.0, local_window_size=window, kv_cache_bit_width=8,
        k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL")
    ours = helper.make_node("Attention", ["qkv", "past_k", "past_v", "seqlens", "total", "k_scale", "v_scale"],
                            ["out", "present_k", "present_v"], domain=kernels.DOMAIN, num_heads=heads,
                            local_window_size=window)
    models = []
    for node, domain in ((stock, "com.microsoft"), (ours, kernels.DOMAIN)):
        graph = helper.make_graph([node], "g", inputs, outputs, scales)
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                              helper.make_opsetid(domain, 1)], ir_version=8))
    return models


def sessions(heads, head_size, capacity, window, seed):
    stock_model, our_model = graphs(heads, head_size, capacity, window, seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    stock = ort.InferenceSession(stock_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(kernels.library_path()))
    ours = ort.InferenceSession(our_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return stock, ours


def run_in_place(session, qkv, cache_k, cache_v, seqlens, total):
    """As the runtime runs it: the present caches bound to the past's arrays, updated in place."""
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", qkv)
    for name, array in (("past_k", cache_k), ("past_v", cache_v)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    binding.bind_cpu_input("seqlens", seqlens)
    binding.bind_cpu_input("total", np.array(total, np.int32))
    out = np.zeros((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3), np.float32)
    binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_numpy(out))
    binding.bind_ortvalue_output("present_k", ort.OrtValue.ortvalue_from_numpy(cache_k))
    binding.bind_ortvalue_output("present_v", ort.OrtValue.ortvalue_from_numpy(cache_v))
    session.run_with_iobinding(binding)
    return out


def conversation(heads, head_size, capacity, window, steps, seed, path, monkeypatch, tolerance=2e-5, spread=2.0):
    """Runs both ops through the same sequence of calls on their own caches; compares every output
    (valid positions) and the caches' written positions after each call. `spread` scales the
    random q, k and v (so the scores' spread goes with its square)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    stock, ours = sessions(heads, head_size, capacity, window, seed)
    rng = np.random.default_rng(seed + 1)
    hd = heads * head_size
    caches = {}
    worst = 0.0
    for batch, new, lengths, first in steps:
        if first:
            caches = {name: [np.zeros((batch, heads, capacity, head_size), np.int8) for _ in range(2)]
                      for name in ("stock", "ours")}
        qkv = (rng.standard_normal((batch, new, 3 * hd)) * spread).astype(np.float32)
        seqlens = np.array([n - 1 for n in lengths], np.int32)
        total = new if first else max(lengths)
        results = {name: run_in_place(session, qkv, *caches[name], seqlens, total)
                   for name, session in (("stock", stock), ("ours", ours))}
        for b, length in enumerate(lengths):
            valid = min(new, length) if first else new
            expected, got = results["stock"][b, :valid], results["ours"][b, :valid]
            error = float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-6))
            assert error <= tolerance, (path, batch, new, lengths, b, error)
            worst = max(worst, error)
            for which in range(2):
                np.testing.assert_array_equal(caches["ours"][which][b, :, :length],
                                              caches["stock"][which][b, :, :length])
    return worst


def test_ragged_prompts_then_batched_decode_across_the_window(monkeypatch):
    # Rows of 7, 3 and 12 positions decode together until each has crossed the 8-position window.
    steps = [(3, 12, [7, 3, 12], True)]
    lengths = [7, 3, 12]
    for _ in range(10):
        lengths = [n + 1 for n in lengths]
        steps.append((3, 1, list(lengths), False))
    for path in PATHS:
        for window in (-1, 8):
            assert conversation(4, 64, 40, window, steps, 3, path, monkeypatch) < 2e-5


@pytest.mark.parametrize("head_size", [16, 32, 64, 128, 24])
def test_prompt_chunks_over_a_past_for_every_head_size(head_size, monkeypatch):
    # A 20-token prompt, then chunks of 9, 16 and 1 over it: queries past the 16-key blocks and the
    # 32-query tasks; head size 24 takes the portable path everywhere.
    steps = [(1, 20, [20], True), (1, 9, [29], False), (1, 16, [45], False), (1, 1, [46], False),
             (1, 40, [86], False)]
    for path in PATHS:
        for window in (-1, 16):
            conversation(3, head_size, 100, window, steps, head_size, path, monkeypatch)


def test_without_binding_the_present_starts_as_a_copy_of_the_past(monkeypatch):
    monkeypatch.setenv(kernels.ISA_VARIABLE, PATHS[0])
    stock, ours = sessions(2, 16, 12, -1, 5)
    rng = np.random.default_rng(0)
    past = [rng.integers(-100, 100, (1, 2, 12, 16), dtype=np.int8) for _ in range(2)]
    feeds = {"qkv": rng.standard_normal((1, 1, 96)).astype(np.float32), "past_k": past[0], "past_v": past[1],
             "seqlens": np.array([5], np.int32), "total": np.array(6, np.int32)}
    expected, got = stock.run(None, feeds), ours.run(None, feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=2e-5, atol=1e-6)
    for e, g in zip(expected[1:], got[1:]):
        np.testing.assert_array_equal(g[:, :, :6], e[:, :, :6])
    np.testing.assert_array_equal(past[0][0, :, 5], feeds["past_k"][0, :, 5])  # the input is untouched


def test_a_row_that_would_overflow_the_cache_is_refused(monkeypatch):
    _, ours = sessions(2, 16, 8, -1, 5)
    feeds = {"qkv": np.zeros((1, 1, 96), np.float32), "past_k": np.zeros((1, 2, 8, 16), np.int8),
             "past_v": np.zeros((1, 2, 8, 16), np.int8), "seqlens": np.array([8], np.int32),
             "total": np.array(9, np.int32)}
    with pytest.raises(Exception, match="would hold 9 positions with 1 new in a cache of 8"):
        ours.run(None, feeds)


@pytest.mark.parametrize("head_size", [16, 24, 64, 128])
def test_rows_filling_the_cache_with_windows_of_one_and_wider_than_the_context(head_size, monkeypatch):
    # A ragged prompt with a one-token row, decoded until the longest row's last position is the
    # cache's last (capacity - 1); then one row's prompt filling the whole cache at once, and a
    # long prompt whose chunks span several converted key tiles (256 keys at head size 16) and end
    # exactly at the capacity. Head size 24 runs the portable path.
    ragged = [(3, 6, [6, 1, 3], True)] + [(3, 1, [6 + k, 1 + k, 3 + k], False) for k in range(1, 15)]
    full = [(2, 20, [20, 1], True)]
    tiles = [(1, 300, [300], True), (1, 3, [303], False), (1, 33, [336], False), (1, 364, [700], False)]
    for path in PATHS:
        for window in (-1, 1, 5, 1000):
            conversation(2, head_size, 20, window, ragged, 13, path, monkeypatch)
            conversation(2, head_size, 20, window, full, 14, path, monkeypatch)
            # spread 1.5 at head size 128: the default puts the plain fp32 loop's rounding at the tolerance
            conversation(1, head_size, 700, window, tiles, 15, path, monkeypatch, spread=1.5 if head_size > 64 else 2.0)


@pytest.mark.parametrize("head_size", [64, 128])
def test_long_ragged_prompts_over_many_key_blocks_tasks_and_windows(head_size, monkeypatch):
    # The tile path's shapes (head sizes 64 and 128): a ragged batch whose rows span many 32-key
    # blocks and more than one 128-query task, ending mid-block and mid-tile, decoded a few steps;
    # then (stock takes prompts over a past one row at a time) one row's chunks of 5 (too few
    # for tiles), 130 (a task and a remainder of 2) and 47 queries (32, then 15 in lanes of 16).
    # Windows cut blocks mid-way.
    ragged = [(2, 261, [261, 150], True)] + [(2, 1, [261 + k, 150 + k], False) for k in range(1, 4)]
    chunks = [(1, 150, [150], True), (1, 5, [155], False), (1, 130, [285], False), (1, 47, [332], False),
              (1, 1, [333], False)]
    for path in PATHS:
        for window in (-1, 45, 256):
            # spread 1.5: at head size 128 the default 2 puts the plain fp32 loop's own rounding at
            # the 2e-5 tolerance
            conversation(2, head_size, 450, window, ragged, 21, path, monkeypatch, spread=1.5)
            conversation(2, head_size, 450, window, chunks, 23, path, monkeypatch, spread=1.5)


@pytest.mark.parametrize("head_size", [64, 128])
def test_scores_spread_over_thousands_stay_within_fp32_noise(head_size, monkeypatch):
    # GPT-Neo does not scale its scores, and they spread over hundreds: most keys' probabilities
    # are then far below the maximum's (the tile path drops those below exp(-70) rather than
    # compute denormal parts of them). Here scores reach the thousands, where fp32's own rounding
    # of a score moves its exp by ~1e-5: measured against stock, the plain fp32 loop (portable)
    # differs by 4.6e-5 at head size 64 and 3.2e-5 at 128, the tile path by 2.2e-5 and 5.6e-5. A
    # lost or NaN probability would move outputs by orders of magnitude more. At head size 128 this
    # seed also writes a key whose k / scale is exactly -104.5 in fp32 division but -104.50001 as k
    # times the reciprocal, as onnxruntime's quantizer computes it: the caches must still match.
    steps = [(1, 200, [200], True), (1, 64, [264], False)]
    for path in PATHS:
        conversation(2, head_size, 300, -1, steps, 22, path, monkeypatch, tolerance=8e-5, spread=6.0)


def test_the_tile_path_runs_where_the_cpu_has_amx_bf16():
    # Otherwise the tests above would pass on the AVX-512 path alone.
    flags = set()
    for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if "amx" not in PATHS:
        pytest.skip("no AMX path on this CPU")
    expected = "amx-bf16 tiles" if "amx_bf16" in flags else "avx512"
    os.environ[kernels.ISA_VARIABLE] = "amx"
    try:
        assert kernels.info().attention == expected
    finally:
        del os.environ[kernels.ISA_VARIABLE]
    os.environ[kernels.ISA_VARIABLE] = "avx512vnni"
    try:
        assert kernels.info().attention == "avx512"
    finally:
        del os.environ[kernels.ISA_VARIABLE]


@pytest.mark.parametrize("head_size", [64, 128])
def test_a_query_with_nan_gives_nan_and_a_nan_key_is_cached_as_zero(head_size, monkeypatch):
    # A NaN in one query makes that query's output NaN on every path (as stock's fp32 softmax
    # does), not zeros or finite values; the others are unchanged. A NaN key is cached as 0 by
    # every path's write (a cast of NaN would be undefined).
    heads, capacity, new = 2, 64, 40
    rng = np.random.default_rng(7)
    qkv = (rng.standard_normal((1, new, 3 * heads * head_size)) * 2).astype(np.float32)
    qkv[0, 17, 5] = np.nan                               # query 17, head 0
    qkv[0, 30, heads * head_size + head_size + 3] = np.nan  # key 30, head 1, channel 3
    outputs, caches = {}, {}
    for path in PATHS:
        monkeypatch.setenv(kernels.ISA_VARIABLE, path)
        _, ours = sessions(heads, head_size, capacity, -1, 8)
        k, v = (np.zeros((1, heads, capacity, head_size), np.int8) for _ in range(2))
        outputs[path] = run_in_place(ours, qkv, k, v, np.array([new - 1], np.int32), new)
        caches[path] = k
    for path, out in outputs.items():
        assert np.isnan(out[0, 17, :head_size]).all(), path
        assert caches[path][0, 1, 30, 3] == 0, path
        np.testing.assert_array_equal(caches[path], caches["portable"])
        finite = np.ones(out.shape[1], bool)
        finite[17] = False
        assert np.isfinite(out[0, finite]).all() and np.isfinite(out[0, 17, head_size:]).all(), path
        np.testing.assert_allclose(out[0, finite], outputs["portable"][0, finite], rtol=0,
                                   atol=2e-5 * np.abs(outputs["portable"][0, finite]).max())


def _model_with(stock_or_ours: int, heads: int, head_size: int, capacity: int, **changes):
    """One of graphs()'s two models with some inputs' initializers or attributes replaced."""
    model = graphs(heads, head_size, capacity, -1, 5)[stock_or_ours]
    for initializer in model.graph.initializer:
        if initializer.name in changes:
            initializer.CopyFrom(numpy_helper.from_array(changes.pop(initializer.name), initializer.name))
    node = model.graph.node[0]
    for attribute in node.attribute:
        if attribute.name in changes:
            attribute.CopyFrom(helper.make_attribute(attribute.name, changes.pop(attribute.name)))
    assert not changes
    return model


def _session(model):
    # Symbolic widths and no shape for the total: what a malformed graph could feed, past
    # onnxruntime's own checks of declared shapes.
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "W"
    model.graph.input[4].type.tensor_type.ClearField("shape")
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(qkv_width: int, heads: int = 2, head_size: int = 16, capacity: int = 8, total=6):
    return {"qkv": np.zeros((1, 1, qkv_width), np.float32),
            "past_k": np.zeros((1, heads, capacity, head_size), np.int8),
            "past_v": np.zeros((1, heads, capacity, head_size), np.int8),
            "seqlens": np.array([5], np.int32), "total": np.asarray(total, np.int32)}


@pytest.mark.parametrize("feeds, changes, message", [
    (_feeds(90), {}, r"qkv \[1, 1, 90\] does not match the cache's \[B, H, C, D\] = \[1, 2, 8, 16\]"),
    (_feeds(96), {"v_scale": np.ones((2, 1, 15), np.float32)}, "k_scale and v_scale must hold H \\* D values"),
    (_feeds(96, total=[6, 6]), {}, "total_sequence_length must be one value"),
])
def test_inputs_that_do_not_fit_are_refused_naming_the_op(feeds, changes, message):
    session = _session(_model_with(1, 2, 16, 8, **changes))
    with pytest.raises(Exception, match="neoedge.kernels Attention: " + message):
        session.run(None, feeds)


def test_the_kernel_graph_converts_an_int8_cache_attention_and_keeps_others_stock_with_the_reason(tmp_path):
    import onnx

    from neoedge.export.kernel_graph import write_kernel_graph

    cases = {"int8": ({}, None), "scaled": ({"scale": 0.125}, "attention with grouped heads or scaled scores"),
             "softcap": ({"softcap": 30.0}, "attention with softcap=30.0"),
             "fp32 cache": ({"kv_cache_bit_width": 4}, "attention without an int8 per-channel cache")}
    for name, (changes, reason) in cases.items():
        model = _model_with(0, 2, 16, 8, **({k: v for k, v in changes.items() if k != "softcap"}))
        if "softcap" in changes:
            model.graph.node[0].attribute.append(helper.make_attribute("softcap", changes["softcap"]))
        directory = tmp_path / name.replace(" ", "-")
        directory.mkdir()
        onnx.save(model, str(directory / "model.onnx"))
        report = write_kernel_graph(directory / "model.onnx", directory / "model.kernels.onnx")
        node = onnx.load(str(directory / "model.kernels.onnx")).graph.node[0]
        if reason is None:
            assert report.attention == 1 and not report.kept
            assert (node.op_type, node.domain) == ("Attention", kernels.DOMAIN)
            assert list(node.input) == ["qkv", "past_k", "past_v", "seqlens", "total", "k_scale", "v_scale"]
        else:
            assert report.attention == 0 and report.kept == {reason: 1}, name
            assert (node.op_type, node.domain) == ("GroupQueryAttention", "com.microsoft")
