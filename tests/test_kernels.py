"""neoedge's MatMulNBits kernels: every dispatch path against a numpy reference of MatMulNBits'
accuracy_level-4 semantics, the op's error handling, the stock fallback, and the kernel graph.

The kernels run here as onnxruntime sees them: a one-node graph per case, the weights as
initializers (as in a package), the path forced by NEOEDGE_KERNELS_ISA at session creation.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import neoedge.kernels as kernels
from neoedge.export.blockwise import quantize_blockwise

ROOT = Path(__file__).resolve().parents[1]
# Without a compiler the library is not built and these tests have nothing to test; where it must
# have been built (CI with a compiler) a missing library is a failure, not a skip.
EXPECTED = os.environ.get("NEOEDGE_KERNELS_EXPECTED", "1") == "1"


@pytest.fixture(scope="module")
def library() -> str:
    path = kernels.library_path()
    if not path.exists():
        if EXPECTED:
            pytest.fail(f"{path} was not built (set NEOEDGE_KERNELS_EXPECTED=0 where no compiler exists)")
        pytest.skip("kernels not built")
    return str(path)


PATHS = list(kernels.runnable_paths()) or ["portable"]  # without the library those tests skip


# ---------------------------------------------------------------------------------------------
# Reference: MatMulNBits with accuracy_level 4 (MLAS CompInt8), in numpy


def quantize_activations(a: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 per block of `block` k: scale = amax / 127, q = round-half-even(a * (127 / amax))."""
    m, k = a.shape
    blocks = a.reshape(m, k // block, block).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1)
    scale = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return np.rint(blocks * inverse[..., None]).astype(np.int64), scale


def weights_and_zero_points(packed, zero_points, bits, n, k, block):
    blocks = k // block
    if bits == 4:
        w = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks, block)
    else:
        w = packed.reshape(n, blocks, block)
    if zero_points is None:
        z = np.full((n, blocks), 1 << (bits - 1))
    elif bits == 4:
        z = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(n, -1)[:, :blocks]
    else:
        z = zero_points.reshape(n, blocks)
    return w.astype(np.int64), z.astype(np.int64)


def reference(a, packed, scales, zero_points, bits, block, n, *, drop_zero_points=False, scale_shift=0):
    """(Y in float64, bound): bound[m, n] = sum_b |a_scale w_scale| sum_k |q| (w + zp) bounds every
    intermediate the kernels form (unsigned products and the zero-point correction), so a tolerance
    relative to it is one of fp32 rounding. The keyword arguments inject the bugs the tolerance
    must catch."""
    k = a.shape[1]
    q, a_scale = quantize_activations(a, block)
    w, z = weights_and_zero_points(packed, zero_points, bits, n, k, block)
    w_scale = scales.reshape(n, -1).astype(np.float64)
    if scale_shift:
        w_scale = np.roll(w_scale, scale_shift, axis=1)
    centred = w - (0 if drop_zero_points else z[..., None])
    sums = np.einsum("mbk,nbk->mnb", q, centred)
    factor = a_scale[:, None, :].astype(np.float64) * w_scale[None]
    bound = np.einsum("mbk,nbk->mnb", np.abs(q), w + z[..., None]).astype(np.float64)
    return (factor * sums).sum(-1), (np.abs(factor) * bound).sum(-1)


TOLERANCE = 5e-7  # x bound: the worst seen on every path is 4e-8


def within(y, expected, bound) -> float:
    return float(np.max(np.abs(y.astype(np.float64) - expected) / (bound + 1e-30)))


# ---------------------------------------------------------------------------------------------
# One-node graphs


def one_node(k, n, bits, block, packed, scales, zero_points, domain, *, flat_scales=True, rank=2, **attributes):
    """One MatMulNBits node. The kernel op's is marked as a kernel graph marks it when no stock op
    reads its weights (rearrange_weights: the AVX-512 VNNI path may then tile them in place)."""
    if domain == kernels.DOMAIN:
        attributes.setdefault("rearrange_weights", 1)
    inputs = ["A", "B", "scales"] + (["zero_points"] if zero_points is not None else [])
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain=domain, K=k, N=n, bits=bits, block_size=block,
                            **({"accuracy_level": 4} | attributes))
    initializers = [numpy_helper.from_array(packed, "B"),
                    numpy_helper.from_array(scales.reshape(-1) if flat_scales else scales, "scales")]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points.reshape(-1), "zero_points"))
    leading = ["batch", "M"][-(rank - 1):] if rank > 1 else []
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [*leading, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*leading, n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)],
                             ir_version=8)


def session(model, library=None, threads=2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def problem(rng, m, k, n, bits, block, symmetric, scale=1.0):
    weight = rng.standard_normal((n, k)).astype(np.float32)
    q = quantize_blockwise(weight, bits, block, symmetric=symmetric)
    packed, scales, zero_points = q.packed, q.scales, q.zero_points
    # Rows of very different magnitudes: each row's blocks get their own activation scales.
    a = (rng.standard_normal((m, k)) * rng.uniform(0.05, 20, (m, 1)) * scale).astype(np.float32)
    return a, packed, scales, zero_points


def cases() -> list[tuple[int, int, int, int, int, bool]]:
    """(M, K, N, bits, block, symmetric): M = 1 (decode), 2..16 (batched decode), 128+ (prompts) and
    odd sizes between; K at one to several blocks (tails of the 64/128-k vectors for small blocks);
    N odd, small and past the 32-row tiles; both widths, with and without zero points, every block."""
    rng = np.random.default_rng(7)
    out = []
    ms = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 128, 130]
    for bits in (4, 8):
        for block in (16, 32, 64, 128, 256):
            for symmetric in (True, False):
                for i, m in enumerate(ms[(block // 16) % 3::3] + [1, 128]):
                    k = block * int(rng.integers(1, 5 if block >= 128 else 9))
                    n = int(rng.choice([1, 5, 31, 32, 33, 67, 100]))
                    out.append((m, k, n, bits, block, symmetric))
    out += [(1, 768, 2304, 4, 128, True), (128, 768, 768, 4, 128, True), (16, 3072, 96, 8, 128, False),
            (300, 256, 40, 4, 32, False), (257, 128, 33, 8, 128, True), (4, 2048, 64, 4, 128, True)]
    return out


@pytest.fixture(scope="module")
def prepared_cases():
    """Inputs, model and reference of every case, built once for all paths."""
    rng = np.random.default_rng(0)
    out = []
    for m, k, n, bits, block, symmetric in cases():
        a, packed, scales, zero_points = problem(rng, m, k, n, bits, block, symmetric)
        expected, bound = reference(a, packed, scales, zero_points, bits, block, n)
        model = one_node(k, n, bits, block, packed, scales, zero_points, kernels.DOMAIN).SerializeToString()
        out.append(((m, k, n, bits, block, symmetric), a, model, expected, bound))
    return out


@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_reference(path, library, monkeypatch, prepared_cases):
    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(library)
    worst = 0.0
    for case, a, model, expected, bound in prepared_cases:
        y = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        assert y.shape == case[:1] + case[2:3] and np.isfinite(y).all()
        error = within(y, expected, bound)
        assert error <= TOLERANCE, (path, case, error)
        worst = max(worst, error)
    assert worst > 0  # the comparison ran on real differences, not on copies


def test_the_tolerance_catches_a_dropped_zero_point_or_a_wrong_block_scale(library):
    """The reference with either bug injected is outside the tolerance of the kernels' results, on
    the smallest signal a test case has (symmetric int4, one row)."""
    rng = np.random.default_rng(1)
    for bits, symmetric in ((4, True), (8, False)):
        a, packed, scales, zero_points = problem(rng, 1, 512, 16, bits, 128, symmetric)
        y = session(one_node(512, 16, bits, 128, packed, scales, zero_points, kernels.DOMAIN), library).run(None, {"A": a})[0]
        for bug in (dict(drop_zero_points=True), dict(scale_shift=1)):
            wrong, _ = reference(a, packed, scales, zero_points, bits, 128, 16, **bug)
            _, bound = reference(a, packed, scales, zero_points, bits, 128, 16)
            assert within(y, wrong, bound) > 100 * TOLERANCE, bug


def test_the_reference_is_what_stock_matmulnbits_computes():
    """The semantics the kernels reproduce are onnxruntime's own (accuracy_level 4, weights as
    initializers, so MLAS's int8 path runs): stock MatMulNBits agrees with the reference."""
    rng = np.random.default_rng(2)
    for m, k, n, bits, block, symmetric in [(1, 768, 64, 4, 128, True), (128, 768, 64, 4, 128, True),
                                            (5, 512, 48, 8, 64, False), (130, 384, 72, 4, 32, False)]:
        a, packed, scales, zero_points = problem(rng, m, k, n, bits, block, symmetric)
        expected, bound = reference(a, packed, scales, zero_points, bits, block, n)
        y = session(one_node(k, n, bits, block, packed, scales, zero_points, "com.microsoft")).run(None, {"A": a})[0]
        assert within(y, expected, bound) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_batch_dimensions_scale_layouts_and_edge_values(path, library, monkeypatch):
    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    rng = np.random.default_rng(3)
    a, packed, scales, zero_points = problem(rng, 6, 256, 40, 4, 64, False)
    a[1] = 0.0  # an all-zero row: scale 0, output 0
    a[2, :64] = 0.0  # one all-zero block
    a[3, 5] = 1e30  # one huge value: its block quantizes to 0 but for it
    expected, bound = reference(a, packed, scales, zero_points, 4, 64, 40)
    model = one_node(256, 40, 4, 64, packed, scales, zero_points, kernels.DOMAIN, flat_scales=False, rank=3)
    y = session(model, library).run(None, {"A": a.reshape(2, 3, 256)})[0]
    assert y.shape == (2, 3, 40)
    assert within(y.reshape(6, 40), expected, bound) <= TOLERANCE
    assert np.all(y.reshape(6, 40)[1] == 0.0)
    empty = session(model, library).run(None, {"A": np.zeros((2, 0, 256), np.float32)})[0]
    assert empty.shape == (2, 0, 40)


@pytest.mark.parametrize("path", PATHS)
def test_activations_round_half_to_even(path, library, monkeypatch):
    """amax = 127 makes 127 / amax exactly 1, so x.5 values are exact ties: MLAS rounds them to even
    (2.5 -> 2, -3.5 -> -4); rounding half away from zero would change these products by one step."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    k, block = 256, 64
    a = np.tile(np.array([2.5, -3.5, 0.5, -0.5, 1.5, 127.0, -126.5, 6.5], np.float32), (3, k // 8))
    a[1] *= -1
    a[2, :block] *= 0.5  # amax 63.5 in the first block: other ties
    rng = np.random.default_rng(9)
    for bits, symmetric in ((4, True), (8, False)):
        _, packed, scales, zero_points = problem(rng, 3, k, 24, bits, block, symmetric)
        expected, bound = reference(a, packed, scales, zero_points, bits, block, 24)
        y = session(one_node(k, 24, bits, block, packed, scales, zero_points, kernels.DOMAIN), library).run(None, {"A": a})[0]
        assert within(y, expected, bound) <= TOLERANCE, (path, bits)


def test_single_thread_and_pool_agree(library):
    rng = np.random.default_rng(4)
    a, packed, scales, zero_points = problem(rng, 64, 512, 100, 4, 128, True)
    model = one_node(512, 100, 4, 128, packed, scales, zero_points, kernels.DOMAIN)
    one = session(model, library, threads=1).run(None, {"A": a})[0]
    two = session(model, library, threads=2).run(None, {"A": a})[0]
    np.testing.assert_array_equal(one, two)  # each output is computed by one task, in one order


def outputs_by_switch(path, m, k, n, bits, block, symmetric, seed, variable, library, monkeypatch):
    """One node's outputs with `variable` set to "1" and to "0" (read when the session creates the
    kernel), each checked against the reference."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    a, packed, scales, zero_points = problem(np.random.default_rng(seed), m, k, n, bits, block, symmetric)
    expected, bound = reference(a, packed, scales, zero_points, bits, block, n)
    model = one_node(k, n, bits, block, packed, scales, zero_points, kernels.DOMAIN)
    outputs = {}
    for value in ("1", "0"):
        monkeypatch.setenv(variable, value)
        outputs[value] = session(model, library).run(None, {"A": a})[0]
        assert within(outputs[value], expected, bound) <= TOLERANCE, (variable, value)
    return outputs


@pytest.mark.parametrize("path", [p for p in PATHS if p in ("avx512vnni", "amx")] or ["none"])
@pytest.mark.parametrize("m, bits, block, symmetric", [(4, 4, 128, True), (8, 4, 256, False), (16, 8, 128, False),
                                                       (11, 8, 64, True)])
def test_batched_decode_rows_switch_paths_and_both_match_the_reference(path, m, bits, block, symmetric, library,
                                                                       monkeypatch):
    """4-16 rows (a batch of decoding sequences) run the batched GEMV, or with NEOEDGE_KERNELS_BATCHED=0
    the one-row GEMV in passes: both equal the reference, and they are different code (not equal bits)."""
    if path == "none":
        pytest.skip("no AVX-512 VNNI path on this CPU")
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")  # tiled weights have one decode path for every M
    outputs = outputs_by_switch(path, m, 4 * block, 50, bits, block, symmetric, m, "NEOEDGE_KERNELS_BATCHED",
                                library, monkeypatch)
    assert not np.array_equal(outputs["1"], outputs["0"])


@pytest.mark.parametrize("path", [p for p in PATHS if p in ("avx512vnni", "amx")] or ["none"])
@pytest.mark.parametrize("bits, block, symmetric", [(4, 128, True), (4, 32, False), (8, 128, False), (8, 64, True)])
def test_one_row_gemv_streaming_rows_or_eight_side_by_side_both_match_the_reference(path, bits, block, symmetric,
                                                                                   library, monkeypatch):
    """A decode step's GEMV reads one weight row at a time on AMD, 8 side by side elsewhere
    (NEOEDGE_KERNELS_STREAM_ROWS forces either): both equal the reference and each other up to the
    order of the final horizontal sum (8-row tiles reduce 4 rows at once), so they are different
    code, not equal bits (N = 53: tiles of 8 and a remainder)."""
    if path == "none":
        pytest.skip("no AVX-512 VNNI path on this CPU")
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")
    outputs = outputs_by_switch(path, 1, 6 * block, 53, bits, block, symmetric, bits + block,
                                "NEOEDGE_KERNELS_STREAM_ROWS", library, monkeypatch)
    scale = np.abs(outputs["0"]).max()
    np.testing.assert_allclose(outputs["1"], outputs["0"], rtol=0, atol=1e-6 * scale)
    assert not np.array_equal(outputs["1"], outputs["0"])


VNNI = "avx512vnni" in PATHS


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
@pytest.mark.parametrize("m", [1, 2, 5, 8, 13, 16, 40])
@pytest.mark.parametrize("k, n, bits, block", [(256, 53, 4, 32), (768, 40, 4, 128), (48, 17, 4, 16),
                                               (512, 33, 8, 64), (64, 1, 8, 16), (192, 37, 4, 16),
                                               (640, 37, 8, 32)])
def test_tiled_weights_match_the_reference_and_the_untiled_paths(m, k, n, bits, block, library, monkeypatch):
    """AVX-512 VNNI sessions rearrange symmetric B and scales into 16-row tiles in place, each tile
    by the first call that reads it (NEOEDGE_KERNELS_TILED=0: kept as they are). Decode rows (M <= 16) and the
    prompt GEMM (M = 40) read the tiles; both layouts equal the reference, on tails of the last tile
    (N = 53, 17, 33, 1) and of the 64-k vectors (K = 48, 64), and rows of B or scales that the
    rearrangement copies 16 dwords at a time with a tail (24 dwords of B at K = 192; 20 scales at
    K = 640)."""
    outputs = outputs_by_switch("avx512vnni", m, k, n, bits, block, True, m + k + n, "NEOEDGE_KERNELS_TILED",
                                library, monkeypatch)
    if m > 16:  # the same staged GEMM, from either layout: the same bits
        np.testing.assert_array_equal(outputs["1"], outputs["0"])
    elif outputs["1"].size >= 32:  # other code than the untiled GEMVs (so the tiles were read): other rounding
        assert not np.array_equal(outputs["1"], outputs["0"])


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_weights_are_tiled_only_where_the_graph_allows_it(library, monkeypatch):
    """Without rearrange_weights (a stock op may read the same initializer) the weights keep
    MatMulNBits' layout: the output is the untiled path's, bit for bit."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    a, packed, scales, _ = problem(np.random.default_rng(3), 1, 256, 40, 4, 64, True)
    outputs = {}
    for allowed, tiled in ((0, "1"), (1, "0"), (1, "1")):
        monkeypatch.setenv("NEOEDGE_KERNELS_TILED", tiled)
        model = one_node(256, 40, 4, 64, packed, scales, None, kernels.DOMAIN, rearrange_weights=allowed)
        outputs[allowed, tiled] = session(model, library).run(None, {"A": a})[0]
    np.testing.assert_array_equal(outputs[0, "1"], outputs[1, "0"])
    assert not np.array_equal(outputs[0, "1"], outputs[1, "1"])


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
@pytest.mark.parametrize("bits, block", [(4, 32), (4, 128), (8, 64)])
def test_tiled_decode_rows_equal_one_row_at_a_time_bit_for_bit(bits, block, library, monkeypatch):
    """Every activation row of a tiled decode call runs the same instructions whatever M is: a
    batch's rows are the bits of each row alone (what batched greedy decoding relies on)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    rng = np.random.default_rng(bits + block)
    a, packed, scales, zero_points = problem(rng, 16, 4 * block, 70, bits, block, True)
    s = session(one_node(4 * block, 70, bits, block, packed, scales, zero_points, kernels.DOMAIN), library)
    together = s.run(None, {"A": a})[0]
    for rows in (slice(0, 1), slice(3, 4), slice(0, 5), slice(8, 16)):
        np.testing.assert_array_equal(s.run(None, {"A": a[rows]})[0], together[rows])


def two_node_model(k, n, bits, block, packed, scales, *, b_as_input=False):
    """Y = A W^T twice: two MatMulNBits nodes reading the same B and scales (or B as a graph input)."""
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "scales"], [out], domain=kernels.DOMAIN, K=k, N=n, bits=bits,
                              block_size=block, accuracy_level=4, rearrange_weights=1) for out in ("Y1", "Y2")]
    initializers = [numpy_helper.from_array(scales.reshape(-1), "scales")]
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])]
    if b_as_input:
        inputs.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(packed.shape)))
    else:
        initializers.append(numpy_helper.from_array(packed, "B"))
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", n]) for y in ("Y1", "Y2")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)],
                             ir_version=8)


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
@pytest.mark.parametrize("b_as_input", [False, True])
def test_weights_two_nodes_share_or_a_graph_input_b_are_read_right(b_as_input, library, monkeypatch):
    """Shared initializers are rearranged once (twice would scramble them); a B fed at run time is
    not an initializer, so it is neither rearranged nor written to (the caller's array is unchanged)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    rng = np.random.default_rng(11)
    a, packed, scales, _ = problem(rng, 3, 256, 37, 4, 64, True)
    expected, bound = reference(a, packed, scales, None, 4, 64, 37)
    s = session(two_node_model(256, 37, 4, 64, packed, scales, b_as_input=b_as_input), library)
    original = packed.copy()
    feeds = {"A": a} | ({"B": packed} if b_as_input else {})
    for _ in range(2):  # and again: nothing is rearranged a second time
        for y in s.run(None, feeds):
            assert within(y, expected, bound) <= TOLERANCE
    np.testing.assert_array_equal(packed, original)


@pytest.mark.parametrize("m, bits, block, symmetric", [(4, 4, 128, True), (8, 4, 256, False), (16, 8, 128, False),
                                                       (11, 8, 64, True), (13, 4, 128, False)])
def test_batched_decode_on_amx_tiles_equals_the_vector_path_bit_for_bit(m, bits, block, symmetric, library,
                                                                        monkeypatch):
    """The AMX path's batched GEMV multiplies the same staged weights on tiles: its int32 sums are
    exact and its epilogue is the vector path's, so the outputs are the same bits (not just close)."""
    if not {"amx", "avx512vnni"} <= set(PATHS):
        pytest.skip("no AMX path on this CPU")
    rng = np.random.default_rng(100 + m)
    a, packed, scales, zero_points = problem(rng, m, 4 * block, 70, bits, block, symmetric)
    model = one_node(4 * block, 70, bits, block, packed, scales, zero_points, kernels.DOMAIN)
    outputs = {}
    for path in ("amx", "avx512vnni"):
        monkeypatch.setenv(kernels.ISA_VARIABLE, path)
        outputs[path] = session(model, library).run(None, {"A": a})[0]
    np.testing.assert_array_equal(outputs["amx"], outputs["avx512vnni"])


# ---------------------------------------------------------------------------------------------
# Errors: refused at session creation or at run, with what and where


@pytest.mark.parametrize("name, value, message", [
    ("bits", 3, "bits must be 4 or 8"),
    ("block_size", 48, "block_size must be a power of two"),
    ("accuracy_level", 1, "only accuracy_level 4"),
    ("K", 100, "multiple of block_size"),
])
def test_bad_attributes_are_refused(library, name, value, message):
    rng = np.random.default_rng(5)
    _, packed, scales, zero_points = problem(rng, 1, 128, 8, 4, 32, True)
    model = one_node(128, 8, 4, 32, packed, scales, zero_points, kernels.DOMAIN)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    with pytest.raises(Exception, match=message):
        session(model, library)


def test_a_node_without_accuracy_level_is_refused(library):
    """MatMulNBits' default accuracy_level is 0 (fp32 compute), which these kernels do not run."""
    rng = np.random.default_rng(5)
    _, packed, scales, zero_points = problem(rng, 1, 128, 8, 4, 32, True)
    model = one_node(128, 8, 4, 32, packed, scales, zero_points, kernels.DOMAIN)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "accuracy_level"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with pytest.raises(Exception, match="only accuracy_level 4 is implemented, got 0"):
        session(model, library)


def test_inputs_of_the_wrong_size_are_refused_at_run(library):
    rng = np.random.default_rng(6)
    a, packed, scales, zero_points = problem(rng, 2, 128, 8, 4, 32, True)
    model = one_node(128, 8, 4, 32, packed[:4], scales, zero_points, kernels.DOMAIN)
    with pytest.raises(Exception, match="B must hold"):
        session(model, library).run(None, {"A": a})
    model = one_node(128, 8, 4, 32, packed, scales, zero_points, kernels.DOMAIN)
    model.graph.input[0].type.tensor_type.shape.dim[-1].dim_param = "K"  # let a wrong width through to the op
    with pytest.raises(Exception, match="last dimension must be K"):
        session(model, library).run(None, {"A": a[:, :64]})


def test_a_path_this_cpu_cannot_run_is_refused(library, monkeypatch):
    rng = np.random.default_rng(7)
    _, packed, scales, zero_points = problem(rng, 1, 128, 8, 4, 32, True)
    model = one_node(128, 8, 4, 32, packed, scales, zero_points, kernels.DOMAIN)
    foreign = "neon" if "neon" not in PATHS else "amx"
    if foreign in PATHS:
        pytest.skip("this CPU runs every path")
    monkeypatch.setenv(kernels.ISA_VARIABLE, foreign)
    assert not kernels.info().available and "cannot run" in kernels.info().reason
    with pytest.raises(Exception, match="cannot run that path"):
        session(model, library)
    monkeypatch.setenv(kernels.ISA_VARIABLE, "sse9")
    assert "not one of" in kernels.info().reason
    with pytest.raises(Exception, match="is not a kernel path"):
        session(model, library)


# ---------------------------------------------------------------------------------------------
# The Python side: which kernels run, and the stock fallback in one log line


def test_info_reports_the_best_path(library, monkeypatch):
    monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
    info = kernels.info()
    assert info.available and info.isa == PATHS[0] and info.library == library
    assert info.preferred == (info.isa in kernels.FASTER_THAN_STOCK)
    assert kernels.register(ort.SessionOptions()) == info
    monkeypatch.setenv(kernels.ISA_VARIABLE, "portable")
    assert kernels.info().isa == "portable" and kernels.info().preferred  # forced: the caller asked for it


def test_a_missing_library_falls_back_to_stock_in_one_log_line(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(kernels, "library_path", lambda: tmp_path / "libneoedge_kernels.so")
    monkeypatch.setattr(kernels, "_reported", set())
    with caplog.at_level(logging.INFO, logger="neoedge.kernels"):
        first = kernels.register(ort.SessionOptions())
        second = kernels.register(ort.SessionOptions())
    assert first == second and not first.available and first.isa == "stock"
    assert "not built" in first.reason
    assert len([r for r in caplog.records if r.name == "neoedge.kernels"]) == 1


def test_a_broken_library_falls_back_to_stock(monkeypatch, caplog, tmp_path):
    broken = tmp_path / "libneoedge_kernels.so"
    broken.write_bytes(b"not a shared library")
    monkeypatch.setattr(kernels, "library_path", lambda: broken)
    monkeypatch.setattr(kernels, "_reported", set())
    with caplog.at_level(logging.WARNING, logger="neoedge.kernels"):
        info = kernels.register(ort.SessionOptions())
    assert not info.available and "cannot load" in info.reason
    assert len(caplog.records) == 1


def test_a_library_without_the_attention_report_leaves_it_out():
    """A library of this interface version built before the attention report (the symbol missing)
    still loads: `info` just says nothing about prompt attention instead of failing."""
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc is None:
        pytest.skip("no C library to stand in for an older kernel library")
    assert kernels._attention(libc, "amx") == ""
    assert "prompt attention" not in kernels.KernelInfo(True, "amx", "", libc, attention="").describe()


def test_info_matches_the_installation(monkeypatch):
    """Built: the kernels are available. Not built (no compiler): stock, saying why. Either way the
    package imports and reports, which is what the runtime relies on."""
    monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
    monkeypatch.delenv(kernels.DISABLE_VARIABLE, raising=False)
    info = kernels.info()
    if kernels.library_path().exists():
        assert info.available and info.isa in kernels.PATHS
    else:
        assert not EXPECTED, "the kernels were expected to be built here"
        assert not info.available and info.isa == "stock" and "not built" in info.reason


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    info = kernels.info()
    assert not info.available and info.isa == "stock"


def test_a_failing_build_still_installs(tmp_path):
    """setup.py's build with a compiler that fails: the build command succeeds, no library."""
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                             "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "lib").rglob("*neoedge_kernels*"))


# ---------------------------------------------------------------------------------------------
# The kernel graph: the stock graph with MatMulNBits on the kernels, same weights file


@pytest.fixture(scope="module")
def quantized_plain(checkpoints, tmp_path_factory):
    """int4 (blocks 64 and 128, symmetric) and int8 (block 32, zero points) packages with the
    portable attention, so that a whole sequence runs in one call (M = its length) and the cache is
    fp32: the comparison sees the kernels' differences, not the int8 cache re-rounding them."""
    from neoedge.export import export_package

    root = tmp_path_factory.mktemp("kernel-graphs")
    out = {}
    for scheme, block in (("int4", None), ("int8", 32)):
        path = root / scheme
        export_package(str(checkpoints["window8"]), path, quantize=scheme, block_size=block, attention="plain",
                       progress=False, validate=False)
        out[scheme] = path
    return out


def _run_plain(graph: Path, library, ids: np.ndarray, steps: int) -> np.ndarray:
    """Logits of a prompt in one call (the GEMM paths), then `steps` one-token calls (the GEMV)."""
    import json

    manifest = json.loads((graph.parent / "neoedge.json").read_text())
    model = manifest["model"]
    heads, head_size = model["num_heads"], model["hidden_size"] // model["num_heads"]
    sess = session_from_file(graph, library)
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((1, heads, 0, head_size), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    logits = []
    position = 0
    for chunk in [ids[:-steps]] + [ids[i:i + 1] for i in range(len(ids) - steps, len(ids))]:
        count = len(chunk)
        outputs = dict(zip(names, sess.run(None, {
            "input_ids": chunk.reshape(1, -1), "position_ids": np.arange(position, position + count).reshape(1, -1),
            "logits_positions": np.arange(count), **past})))
        past = {name.replace("present", "past"): value for name, value in outputs.items() if name.startswith("present")}
        logits.append(outputs["logits"][0])
        position += count
    return np.concatenate(logits)


def session_from_file(graph: Path, library) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def test_the_kernel_graph_reads_the_same_weights_and_converts_every_matmulnbits(quantized_plain):
    import onnx

    from neoedge.export.kernel_graph import write_kernel_graph

    for scheme, path in quantized_plain.items():
        report = write_kernel_graph(path / "model.onnx", path / "model.kernels.onnx")
        stock = onnx.load(str(path / "model.onnx"), load_external_data=False)
        fast = onnx.load(str(path / "model.kernels.onnx"), load_external_data=False)
        stock_nodes = [n for n in stock.graph.node if n.op_type == "MatMulNBits"]
        assert report.converted == len(stock_nodes) > 0 and not report.kept
        assert all(n.domain == kernels.DOMAIN for n in fast.graph.node if n.op_type == "MatMulNBits")
        assert [n.input for n in fast.graph.node] == [n.input for n in stock.graph.node]
        # The tied embedding reads the lm_head's table through the kernels' gather; so only kernels
        # read any MatMulNBits' weights, and symmetric ones (int4 here) may be tiled in place.
        gathers = [n for n in fast.graph.node if n.op_type == "GatherBlockQuantized"]
        assert report.gathers == len(gathers) == 1 and gathers[0].domain == kernels.DOMAIN
        marked = [any(a.name == "rearrange_weights" and a.i == 1 for a in n.attribute)
                  for n in fast.graph.node if n.op_type == "MatMulNBits"]
        assert all(marked) if scheme == "int4" else not any(marked), scheme
        locations = {e.value for t in fast.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"model.onnx.data"}
        assert (path / "model.kernels.onnx").stat().st_size < 2 * (path / "model.onnx").stat().st_size
    with pytest.raises(ValueError, match="beside"):
        write_kernel_graph(path / "model.onnx", path.parent / "elsewhere.onnx")


def test_weights_a_stock_op_also_reads_are_not_marked_for_rearranging(quantized_plain, tmp_path):
    """If the embedding's gather stays stock (here: int32 ids, which the kernels' gather does not
    take), the lm_head's table keeps MatMulNBits' layout: no rearrange_weights on that node only."""
    import onnx
    from onnx import helper as onnx_helper

    from neoedge.export.kernel_graph import write_kernel_graph

    source = quantized_plain["int4"]
    stock = onnx.load(str(source / "model.onnx"), load_external_data=False)
    gather = next(n for n in stock.graph.node if n.op_type == "GatherBlockQuantized")
    cast = onnx_helper.make_node("Cast", [gather.input[1]], ["ids_int32"], to=TensorProto.INT32)
    gather.input[1] = "ids_int32"
    stock.graph.node.insert(0, cast)
    stock.graph.value_info.append(onnx_helper.make_tensor_value_info("ids_int32", TensorProto.INT32, None))
    for f in source.iterdir():
        if f.name == "model.onnx.data":
            (tmp_path / f.name).symlink_to(f)
    onnx.save(stock, str(tmp_path / "model.onnx"))
    report = write_kernel_graph(tmp_path / "model.onnx", tmp_path / "model.kernels.onnx")
    fast = onnx.load(str(tmp_path / "model.kernels.onnx"), load_external_data=False)
    assert report.gathers == 0
    table = gather.input[0]
    for node in fast.graph.node:
        if node.op_type == "MatMulNBits":
            marked = any(a.name == "rearrange_weights" for a in node.attribute)
            assert marked == (node.input[1] != table), node.name


@pytest.mark.parametrize("path", PATHS)
def test_kernel_graph_logits_match_the_stock_graph(quantized_plain, library, monkeypatch, path):
    """Both graphs quantize activations the same way and differ only in the order of fp32 additions
    (~1e-7 relative). Now and then that moves a later activation across an int8 rounding boundary,
    and from that position on the logits differ by about one int8 step (measured up to 7e-3 here;
    otherwise ~1e-7). A graph that lost a node, read the wrong weights or scales, or dropped zero
    points is off by far more than 0.05. The exact semantics are the one-node tests' business."""
    from neoedge.export.kernel_graph import write_kernel_graph

    monkeypatch.setenv(kernels.ISA_VARIABLE, path)
    ids = np.random.default_rng(8).integers(0, 512, size=48)
    for scheme, package in quantized_plain.items():
        write_kernel_graph(package / "model.onnx", package / "model.kernels.onnx")
        stock = _run_plain(package / "model.onnx", None, ids, steps=4)
        fast = _run_plain(package / "model.kernels.onnx", library, ids, steps=4)
        difference = np.abs(stock - fast)
        assert difference.max() < 0.05 and difference.mean() < 5e-3, (scheme, difference.max(), difference.mean())
        assert (stock.argmax(-1) == fast.argmax(-1)).mean() >= 0.97, scheme


# ---------------------------------------------------------------------------------------------
# Packages: export writes the kernel graph, the runtime loads it where the kernels are preferred


@pytest.fixture(scope="module")
def int4_package(checkpoints, tmp_path_factory):
    from neoedge.export import export_package

    path = tmp_path_factory.mktemp("kernel-package") / "int4"
    export_package(str(checkpoints["window8"]), path, quantize="int4", progress=False)
    return path


def test_a_quantized_export_lists_its_kernel_graph_and_validates_it(int4_package):
    from neoedge.manifest import Manifest

    import onnx

    manifest = Manifest.read(int4_package)
    assert manifest.graph.kernel_file == "model.kernels.onnx"
    # Every MatMulNBits and every attention over the int8 cache runs on the kernels (an optimized
    # graph's spelled-out default attributes must not keep them stock).
    stock = onnx.load(str(int4_package / "model.onnx"), load_external_data=False).graph.node
    fast = onnx.load(str(int4_package / "model.kernels.onnx"), load_external_data=False).graph.node
    attention = [n for n in fast if n.op_type == "Attention" and n.domain == kernels.DOMAIN]
    assert len(attention) == len([n for n in stock if n.op_type == "GroupQueryAttention"]) > 0
    assert not [n for n in fast if n.op_type in ("GroupQueryAttention", "MatMulNBits") and n.domain != kernels.DOMAIN]
    assert manifest.files["model.kernels.onnx"].bytes == (int4_package / "model.kernels.onnx").stat().st_size
    if kernels.info().available and kernels.info().preferred:
        check = manifest.validation.kernel_graph
        assert check is not None and not check.problems
        # The kernel graph is judged by the stock graph's own bounds, and lands next to it.
        assert abs(check.mean_kl - manifest.validation.quality.mean_kl) < 0.01


def test_an_fp32_export_has_no_kernel_graph(package):
    from neoedge.manifest import Manifest

    assert Manifest.read(package).graph.kernel_file is None
    assert not (package / "model.kernels.onnx").exists()


def test_the_model_runs_the_kernel_graph_where_preferred_and_stock_when_off(int4_package, library, monkeypatch):
    from neoedge import Model, SessionSettings

    monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
    fast = Model(int4_package)
    stock = Model(int4_package, settings=SessionSettings(kernels="off"))
    assert not stock.kernels.available and "kernels='off'" in stock.kernels.reason
    assert fast.kernels == kernels.info() if kernels.info().preferred else not fast.kernels.available
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    assert not Model(int4_package).kernels.available
    monkeypatch.delenv(kernels.DISABLE_VARIABLE)
    # Forcing the portable path makes it preferred: the kernel graph runs, and agrees with stock to
    # within the int8 KV cache's re-rounding (measured 0.05 on this model; a lost node or wrong
    # scales move logits by whole units).
    monkeypatch.setenv(kernels.ISA_VARIABLE, "portable")
    portable = Model(int4_package)
    assert portable.kernels.available and portable.kernels.isa == "portable"
    ids = list(range(3, 120))
    a, b = portable.logits(ids), stock.logits(ids)
    assert np.abs(a - b).max() < 0.25
    # A random model has near-ties that the int8 cache's re-rounding can flip: measured 0.966-1.0.
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    assert portable.generate("the", max_new_tokens=16).tokens == stock.generate("the", max_new_tokens=16).tokens


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_tiling_one_model_leaves_another_model_of_the_same_package_alone(int4_package, library, monkeypatch):
    """Each session maps the weights file privately: a model whose kernels tiled the weights in
    place (and wrote to them) leaves another model of the same package, loaded before or after,
    reading MatMulNBits' layout: its logits are the same bits as before the tiled one ran."""
    from neoedge import Model

    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    ids = list(range(3, 60))
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")
    before = Model(int4_package)
    clean = before.logits(ids)
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "1")
    tiled = Model(int4_package)
    tiled_logits = tiled.logits(ids)
    assert tiled.generate("the", max_new_tokens=8).tokens  # every tile rearranged by now
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")
    after = Model(int4_package)
    np.testing.assert_array_equal(before.logits(ids), clean)
    np.testing.assert_array_equal(after.logits(ids), clean)
    assert np.abs(tiled_logits - clean).max() < 0.05 and not np.array_equal(tiled_logits, clean)


def test_a_corrupt_kernel_graph_is_refused_before_it_is_parsed(int4_package, tmp_path):
    import shutil

    from neoedge import Model
    from neoedge.errors import IntegrityError

    copy = tmp_path / "pkg"
    shutil.copytree(int4_package, copy)
    data = bytearray((copy / "model.kernels.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.kernels.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.kernels.onnx"):
        Model(copy)


def test_the_attention_kernel_alone_gives_the_stock_graphs_greedy_tokens(checkpoints, library, relist,
                                                                         monkeypatch, tmp_path):
    # The kernel graph with only its attention nodes on the kernels (MatMulNBits and the elementwise
    # ops kept stock, so that their rounding cannot differ): the same greedy tokens as the stock graph over the
    # whole context and past it (shifted), crossing the 8-position window dozens of times; batched
    # with ragged prompts (one of one token) whose rows prefill, decode and finish at different
    # lengths; and through fork and rewind (within the local cache and past it).
    # Greedy tokens can part at a tie within the int8 cache's rounding (the default GPTQ weights of
    # this checkpoint have one, 8.5e-4 nats, where even the stock graph batched and one row at a time
    # pick different tokens): the runs are compared by their log-probs up to such a tie.
    import onnx

    from neoedge import Model, SessionSettings
    from neoedge.engine import generate_batch
    from neoedge.export import export_package
    from neoedge.options import ContextPolicy

    copy = tmp_path / "pkg"
    export_package(str(checkpoints["window8"]), copy, quantize="int4", progress=False)
    graph = onnx.load(str(copy / "model.kernels.onnx"), load_external_data=False)
    for node in graph.graph.node:
        if node.op_type in ("MatMulNBits", "SkipLayerNormalization", "FastGelu", "GatherBlockQuantized"):
            node.domain = "com.microsoft"
            kept = [a for a in node.attribute if a.name != "rearrange_weights"]  # neoedge's own
            del node.attribute[:]
            node.attribute.extend(kept)
    onnx.save(graph, str(copy / "model.kernels.onnx"))
    relist(copy, "model.kernels.onnx")
    stock = Model(copy, settings=SessionSettings(kernels="off"))
    policy = ContextPolicy(on_full="shift", keep=3)
    prompts = [[5], list(range(3, 40)), [7, 8, 9], list(range(9, 90)), [11, 12]]

    def runs(model):
        greedy = dict(stop_at_eos=False, logprobs=True)
        out = [model.sequence(policy=policy).generate("the", max_new_tokens=320, **greedy)]
        out += generate_batch(model, prompts, max_new_tokens=100, **greedy)
        seq = model.sequence(tokens=list(range(20, 120)))
        out.append(seq.generate(max_new_tokens=40, **greedy))
        fork = seq.fork()
        seq.rewind(130)
        out.append(seq.generate(max_new_tokens=30, **greedy))
        out.append(fork.generate(max_new_tokens=30, **greedy))
        seq.rewind(20)
        out.append(seq.generate(max_new_tokens=30, **greedy))
        return [(c.tokens, c.logprobs) for c in out]

    def agreeing_steps(got, expected):
        """Steps where both pick the same token with log-probs within the int8 cache's rounding (the
        two ops' fp32 sums in other orders put a cached value one rounding step apart now and then:
        up to ~5e-3 nats here; a wrong window or position moves them by 2e-2 to whole nats), up to
        the first step where they pick different tokens, which must then be a tie: each pick's
        log-prob within that rounding of the other's."""
        steps = 0
        for (tokens, logprobs), (tokens_e, logprobs_e) in zip(got, expected):
            for token, lp, token_e, lp_e in zip(tokens, logprobs, tokens_e, logprobs_e):
                assert abs(lp - lp_e) < 1e-2, (token, lp, token_e, lp_e)
                if token != token_e:
                    break
                steps += 1
            else:
                assert len(tokens) == len(tokens_e)
        return steps

    expected = runs(stock)
    total = sum(len(t) for t, _ in expected)
    for path in dict.fromkeys(["portable", PATHS[0]]):
        monkeypatch.setenv(kernels.ISA_VARIABLE, path)
        fast = Model(copy)
        assert fast.kernels.available and fast.kernels.isa == path
        steps = agreeing_steps(runs(fast), expected)
        # A tie ends the comparison of its run (and of the runs that continue it: the rewinds), so
        # demand that most steps were compared (88% on the portable path, all on the others).
        assert steps >= 0.8 * total, (path, steps, total)


def test_a_library_of_another_interface_version_is_refused_in_one_line(library, monkeypatch):
    """A library built from older sources (without the attention and elementwise ops the kernel
    graph now uses) is not loaded: the stock graph runs, and the reason says what to do."""
    monkeypatch.setattr(kernels, "INTERFACE_VERSION", kernels.INTERFACE_VERSION + 1)
    kernels._probe.cache_clear()
    try:
        found = kernels.info()
        assert not found.available and found.isa == kernels.STOCK
        assert found.reason == (f"{kernels.library_path()} is interface version {kernels.INTERFACE_VERSION - 1}, "
                                f"this neoedge needs {kernels.INTERFACE_VERSION}: rebuild it")
    finally:
        kernels._probe.cache_clear()


@pytest.mark.parametrize("value, off", [("0", True), ("off", True), ("False", True), ("no", True),
                                        ("1", False), ("on", False), ("", False), ("maybe", True)])
def test_the_kernel_switch_reads_every_usual_spelling(monkeypatch, value, off):
    """NEOEDGE_KERNELS=off/false/no turns the kernels off like 0 (before, only "0" did, and the rest
    silently meant on); a value that is no switch turns them off too, with a reason that says so."""
    if not kernels.library_path().exists():
        pytest.skip("no kernel library")
    monkeypatch.delenv(kernels.ISA_VARIABLE, raising=False)
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, value)
    info = kernels.info()
    assert info.available is not off
    if off:
        assert kernels.DISABLE_VARIABLE in info.reason
        assert ("unrecognised" in info.reason) is (value == "maybe")


# ---------------------------------------------------------------------------------------------
# GatherBlockQuantized: the tied embedding's rows, read from the lm_head's table in either layout


def table_model(domain, vocab, k, bits, block, packed, scales, zero_points, *, with_matmul):
    """ids -> GatherBlockQuantized rows of the table [vocab, blocks, bytes]; with_matmul adds the
    lm_head reading the same B (marked rearrange_weights, so the kernel tiles it where it can)."""
    blocks = k // block
    table = packed.reshape(vocab, blocks, -1)
    inputs = ["B", "ids", "row_scales"] + (["row_zeros"] if zero_points is not None else [])
    nodes = [helper.make_node("GatherBlockQuantized", inputs, ["rows"], domain=domain, gather_axis=0, quantize_axis=2,
                              block_size=block, bits=bits)]
    initializers = [numpy_helper.from_array(table, "B"),
                    numpy_helper.from_array(scales.reshape(vocab, blocks, 1), "row_scales")]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points.reshape(vocab, blocks, 1), "row_zeros"))
    graph_inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["S"])]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["S", blocks, block])]
    if with_matmul:
        matmul_inputs = ["A", "B", "scales"] + (["zero_points"] if zero_points is not None else [])
        nodes.append(helper.make_node("MatMulNBits", matmul_inputs, ["Y"], domain=kernels.DOMAIN, K=k, N=vocab,
                                      bits=bits, block_size=block, accuracy_level=4, rearrange_weights=1))
        initializers.append(numpy_helper.from_array(scales.reshape(-1), "scales"))
        if zero_points is not None:
            initializers.append(numpy_helper.from_array(zero_points.reshape(-1), "zero_points"))
        graph_inputs.append(helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k]))
        outputs.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", vocab]))
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(kernels.DOMAIN, 1)]
    return helper.make_model(helper.make_graph(nodes, "g", graph_inputs, outputs, initializers), opset_imports=opsets,
                             ir_version=8)


@pytest.mark.parametrize("bits, block, symmetric", [(4, 32, True), (4, 128, True), (8, 64, True), (8, 32, False)])
def test_the_table_gather_equals_stock_in_either_layout(bits, block, symmetric, library, monkeypatch):
    """Rows of a table the lm_head's kernel tiled (VNNI path) or left as it is: the same bits as
    com.microsoft's GatherBlockQuantized (exact: one multiply per value), with the lm_head right too."""
    vocab, k = 53, 4 * block
    rng = np.random.default_rng(bits * block)
    a, packed, scales, zero_points = problem(rng, 2, k, vocab, bits, block, symmetric)
    ids = np.array([0, 52, 17, 16, 15, 48, 3], dtype=np.int64)  # both sides of a 16-row tile, the last tile
    stock = session(table_model("com.microsoft", vocab, k, bits, block, packed, scales, zero_points,
                                with_matmul=False)).run(None, {"ids": ids})[0]
    expected, bound = reference(a, packed, scales, zero_points, bits, block, vocab)
    heads = {}
    for tiled in ("1", "0"):
        monkeypatch.setenv("NEOEDGE_KERNELS_TILED", tiled)
        model = table_model(kernels.DOMAIN, vocab, k, bits, block, packed, scales, zero_points, with_matmul=True)
        s = session(model, library)
        s.run(None, {"ids": ids, "A": a[:1]})  # a decode row first: it rearranges every tile it may
        rows, heads[tiled] = s.run(None, {"ids": ids, "A": a})
        np.testing.assert_array_equal(rows, stock)
        assert within(heads[tiled], expected, bound) <= TOLERANCE
    if symmetric and "avx512vnni" in PATHS and not os.environ.get(kernels.ISA_VARIABLE):
        assert not np.array_equal(heads["1"], heads["0"])  # the lm_head did read tiles


def test_the_table_gather_refuses_an_id_outside_the_table(library):
    _, packed, scales, _ = problem(np.random.default_rng(1), 1, 64, 10, 4, 32, True)
    s = session(table_model(kernels.DOMAIN, 10, 64, 4, 32, packed, scales, None, with_matmul=False), library)
    for bad in (10, -1):
        with pytest.raises(Exception, match=f"index {bad} at position 1 is outside the table's 10 rows"):
            s.run(None, {"ids": np.array([2, bad], dtype=np.int64)})


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_concurrent_first_runs_of_one_session_read_the_tiles_right(library, monkeypatch):
    """Tiles are rearranged by whichever call reads them first: two threads running one fresh
    session at once (a prompt and a decode row) both get the reference, on every first run."""
    import threading

    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    rng = np.random.default_rng(21)
    a, packed, scales, _ = problem(rng, 40, 512, 1000, 4, 128, True)
    expected, bound = reference(a, packed, scales, None, 4, 128, 1000)
    model = one_node(512, 1000, 4, 128, packed, scales, None, kernels.DOMAIN)
    for _ in range(3):
        s = session(model, library)
        results: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i, lo=lo, hi=hi: results.__setitem__(i, s.run(None, {"A": a[lo:hi]})[0]))
                   for i, (lo, hi) in enumerate(((0, 40), (7, 8)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert within(results[0], expected, bound) <= TOLERANCE
        assert within(results[1], expected[7:8], bound[7:8]) <= TOLERANCE


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
@pytest.mark.parametrize("k, n, bits, block", [(256, 53, 4, 32), (512, 33, 8, 64), (768, 100, 4, 128)])
def test_a_prompt_reads_tiles_before_and_after_decode_rearranged_them(k, n, bits, block, library, monkeypatch):
    """Whichever call reads a tile first rearranges it: a session's first prompt (the GEMM's staging)
    or a first decode row, then the other; the same bits either way, equal to the reference."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    rng = np.random.default_rng(k + n)
    a, packed, scales, _ = problem(rng, 40, k, n, bits, block, True)
    expected, bound = reference(a, packed, scales, None, bits, block, n)
    model = one_node(k, n, bits, block, packed, scales, None, kernels.DOMAIN)
    prompt_first = session(model, library)
    first = prompt_first.run(None, {"A": a})[0]
    row = prompt_first.run(None, {"A": a[:1]})[0]
    decode_first = session(model, library)
    np.testing.assert_array_equal(decode_first.run(None, {"A": a[:1]})[0], row)
    np.testing.assert_array_equal(decode_first.run(None, {"A": a})[0], first)
    assert within(first, expected, bound) <= TOLERANCE


def shared_weights_model(k, n, bits, block, packed, scales, zero_points, nodes_spec):
    """Y1, Y2 = two MatMulNBits nodes on the same B and scales; nodes_spec: (rearrange_weights,
    with zero points) of each."""
    nodes, initializers = [], [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")]
    for out, (allowed, zp) in zip(("Y1", "Y2"), nodes_spec):
        inputs = ["A", "B", "scales"] + (["zero_points"] if zp else [])
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], domain=kernels.DOMAIN, K=k, N=n, bits=bits,
                                      block_size=block, accuracy_level=4, rearrange_weights=allowed))
    if any(zp for _, zp in nodes_spec):
        initializers.append(numpy_helper.from_array(zero_points.reshape(-1), "zero_points"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", n]) for y in ("Y1", "Y2")],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)],
                             ir_version=8)


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
@pytest.mark.parametrize("tiling_first", [True, False])
@pytest.mark.parametrize("plain", [(0, False), (1, True)], ids=["unmarked", "zero points"])
def test_weights_a_node_reads_as_they_are_are_never_rearranged_for_another(tiling_first, plain, library, monkeypatch):
    """One node may tile B and scales, another reads them in MatMulNBits' layout (not marked, or
    with explicit zero points, here all 8, which equal the implicit ones): whichever is created
    first, nothing is rearranged, and both nodes stay right over several runs (prompt and decode)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    k, n, bits, block = 256, 40, 4, 64
    a, packed, scales, _ = problem(np.random.default_rng(8), 5, k, n, bits, block, True)
    expected, bound = reference(a, packed, scales, None, bits, block, n)
    eights = np.full((n, k // block // 2), 0x88, np.uint8)
    spec = [(1, False), plain] if tiling_first else [plain, (1, False)]
    s = session(shared_weights_model(k, n, bits, block, packed, scales, eights, spec), library)
    for rows in (slice(0, 5), slice(2, 3), slice(0, 5)):
        for y in s.run(None, {"A": a[rows]}):
            assert within(y, expected[rows], bound[rows]) <= TOLERANCE, (spec, rows)


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_a_gather_reading_the_lm_heads_own_scales_keeps_them_as_they_are(library, monkeypatch):
    """The table gather reads its scales in MatMulNBits' layout: if they are the lm_head's own
    initializer, the lm_head must not tile them (the gather pins them), and both stay right."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    vocab, k, bits, block = 53, 128, 4, 32
    a, packed, scales, _ = problem(np.random.default_rng(9), 2, k, vocab, bits, block, True)
    ids = np.array([0, 52, 17, 16], dtype=np.int64)
    stock = session(table_model("com.microsoft", vocab, k, bits, block, packed, scales, None,
                                with_matmul=False)).run(None, {"ids": ids})[0]
    model = table_model(kernels.DOMAIN, vocab, k, bits, block, packed, scales, None, with_matmul=True)
    matmul = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    matmul.input[2] = "row_scales"  # the gather's [V, C, 1] scales: the same values, one initializer
    expected, bound = reference(a, packed, scales, None, bits, block, vocab)
    s = session(model, library)
    for _ in range(2):
        rows, y = s.run(None, {"ids": ids, "A": a})
        np.testing.assert_array_equal(rows, stock)
        assert within(y, expected, bound) <= TOLERANCE


def test_the_kernel_graph_marks_only_weights_every_reader_of_which_reads_tiles():
    """rearrange_weights only where every reader of B and scales reads the tiled layout: not when a
    node with zero points shares them, not when the gather reads the lm_head's scales, not in a
    graph with subgraphs (their nodes may read the outer initializers)."""
    from neoedge.export.kernel_graph import _allow_rearranged_weights

    def graph(*nodes, subgraph=False):
        nodes = list(nodes)
        if subgraph:
            body = helper.make_graph([helper.make_node("Identity", ["B"], ["b_out"])], "body", [],
                                     [helper.make_tensor_value_info("b_out", TensorProto.UINT8, None)])
            nodes.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=body, else_branch=body))
        return helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])

    def matmul(out, *inputs):
        return helper.make_node("MatMulNBits", ["A", *inputs], [out], domain=kernels.DOMAIN)

    def marked(g):
        _allow_rearranged_weights(g)
        return [any(a.name == "rearrange_weights" for a in n.attribute) for n in g.node if n.op_type == "MatMulNBits"]

    gather = helper.make_node("GatherBlockQuantized", ["B", "ids", "row_scales"], ["rows"], domain=kernels.DOMAIN)
    assert marked(graph(matmul("Y", "B", "scales"), gather)) == [True]
    assert marked(graph(matmul("Y", "B", "scales"), matmul("Z", "B", "scales"))) == [True, True]
    assert marked(graph(matmul("Y", "B", "scales"), matmul("Z", "B", "scales", "zp"))) == [False, False]
    lm_scales = helper.make_node("GatherBlockQuantized", ["B", "ids", "scales"], ["rows"], domain=kernels.DOMAIN)
    assert marked(graph(matmul("Y", "B", "scales"), lm_scales)) == [False]
    assert marked(graph(matmul("Y", "B", "scales"), gather, subgraph=True)) == [False]


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_the_model_and_info_say_whether_weights_are_tiled(int4_package, library, monkeypatch, tmp_path):
    """`model.kernels` (and so `neoedge bench`/`info`) says "weights tiled in place" where the path
    tiles and the package's kernel graph allows it; not with NEOEDGE_KERNELS_TILED=0."""
    from click.testing import CliRunner

    from neoedge import Model
    from neoedge.cli import main

    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    assert Model(int4_package).kernels.tiled_weights
    assert "weights tiled in place" in Model(int4_package).kernels.describe()
    assert "weights tiled in place" in CliRunner().invoke(main, ["info", str(int4_package)]).output
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")
    assert not Model(int4_package).kernels.tiled_weights
    assert "weights tiled" not in CliRunner().invoke(main, ["info", str(int4_package)]).output


@pytest.mark.skipif(not VNNI, reason="no AVX-512 VNNI path on this CPU")
def test_a_plain_reader_of_weights_another_session_already_tiled_is_refused(library, monkeypatch):
    """Sessions share an initializer only when the caller supplies it (add_initializer). Once one
    session's kernel rearranged it, a second session reading it in MatMulNBits' layout would be
    wrong: its creation is refused, naming why."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx512vnni")
    a, packed, scales, _ = problem(np.random.default_rng(1), 1, 256, 40, 4, 64, True)
    expected, bound = reference(a, packed, scales, None, 4, 64, 40)
    shared = ort.OrtValue.ortvalue_from_numpy(packed.copy())  # rearrange_weights lets kernels write it

    def with_shared_b(allowed):
        options = ort.SessionOptions()
        options.register_custom_ops_library(library)
        options.add_initializer("B", shared)
        model = one_node(256, 40, 4, 64, packed, scales, None, kernels.DOMAIN, rearrange_weights=allowed)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    tiling = with_shared_b(1)
    assert within(tiling.run(None, {"A": a})[0], expected, bound) <= TOLERANCE
    with pytest.raises(Exception, match="already rearranged by another node's kernel"):
        with_shared_b(0)
    assert within(tiling.run(None, {"A": a})[0], expected, bound) <= TOLERANCE


def test_the_vnni_peak_probe_measures_where_the_avx512_path_runs_and_refuses_bad_arguments(library):
    """benchmarks/decode_floor.py's compute floor of a first token divides by this rate: a positive
    multiply-accumulate rate on a CPU whose AVX-512 VNNI path runs, -1 elsewhere and for arguments
    out of range (never a rate from a loop that did not run)."""
    import ctypes

    peak = ctypes.CDLL(library).neoedge_vnni_peak
    peak.restype, peak.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_double]
    assert peak(0, 0.05) == -1.0 and peak(1, 0.0) == -1.0 and peak(1, 100.0) == -1.0
    rate = peak(1, 0.05)
    if "avx512vnni" in kernels.runnable_paths() and sys.platform != "win32":  # MSVC builds have no probe
        # One vpdpbusd is 64 multiply-accumulates; any AVX-512 VNNI core issues well over one every
        # ten nanoseconds and fewer than four a cycle (at most ~8 a nanosecond at 2 GHz, ~24 at 6).
        assert 6.4e9 < rate < 64 * 4 * 6e9
    else:
        assert rate == -1.0
