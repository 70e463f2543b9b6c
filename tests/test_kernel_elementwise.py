"""neoedge.kernels' SkipLayerNormalization and FastGelu against onnxruntime's com.microsoft ops on
the same inputs (the kernel graph swaps one for the other): rows of one to hundreds, widths that are
and are not multiples of a vector, the optional inputs and output present and absent, every kernel
path this CPU runs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import neoedge.kernels as kernels

PATHS = list(kernels.runnable_paths())
pytestmark = pytest.mark.skipif(not PATHS, reason="the native kernel library is not built")


def _sessions(node_for, inputs, outputs, initializers):
    """(stock session, neoedge session) of a one-node graph built by node_for(domain)."""
    made = []
    for domain in ("com.microsoft", kernels.DOMAIN):
        graph = helper.make_graph([node_for(domain)], "g", inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)],
                                  ir_version=8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        if domain == kernels.DOMAIN:
            options.register_custom_ops_library(str(kernels.library_path()))
        made.append(ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]))
    return made


def _skip_norm(width, beta, bias, with_sum, seed):
    rng = np.random.default_rng(seed)
    init = [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np.float32), "gamma")]
    names = ["x", "skip", "gamma"]
    for present, name in ((beta, "beta"), (bias, "bias")):
        if present:
            init.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), name))
        names.append(name if present else "")
    while names and not names[-1]:
        names.pop()
    outs = ["out", "", "", "sum"] if with_sum else ["out"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", width]) for n in ("x", "skip")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs if n]
    return _sessions(lambda d: helper.make_node("SkipLayerNormalization", names, outs, domain=d, epsilon=1e-5),
                     inputs, outputs, init)


@pytest.mark.parametrize("width", [768, 64, 24, 2048])
def test_skip_layer_norm_equals_onnxruntimes(width, monkeypatch):
    rng = np.random.default_rng(width)
    for path in PATHS:
        monkeypatch.setenv(kernels.ISA_VARIABLE, path)
        for beta, bias, with_sum in ((True, True, True), (True, True, False), (False, False, True), (True, False, False)):
            stock, ours = _skip_norm(width, beta, bias, with_sum, width)
            for rows in (1, 3, 130):
                feeds = {"x": (rng.standard_normal((1, rows, width)) * 3 + 1).astype(np.float32),
                         "skip": rng.standard_normal((1, rows, width)).astype(np.float32)}
                expected, got = stock.run(None, feeds), ours.run(None, feeds)
                assert len(got) == len(expected) == (2 if with_sum else 1)
                # fp32 sums in another order than onnxruntime's: ~1e-6 of a normalised value.
                np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=1e-5, err_msg=path)
                if with_sum:
                    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("width", [3072, 64, 40])
def test_fast_gelu_equals_onnxruntimes(width, monkeypatch):
    rng = np.random.default_rng(width)
    bias = rng.standard_normal(width).astype(np.float32)
    for path in PATHS:
        monkeypatch.setenv(kernels.ISA_VARIABLE, path)
        for with_bias in (True, False):
            inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", width])]
            outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
            init = [numpy_helper.from_array(bias, "bias")] if with_bias else []
            stock, ours = _sessions(lambda d: helper.make_node("FastGelu", ["x", "bias"] if with_bias else ["x"], ["y"],
                                                               domain=d), inputs, outputs, init)
            for rows in (1, 5, 40):
                # Large magnitudes too: both tails (y -> 0 and y -> x) must come out right.
                x = (rng.standard_normal((1, rows, width)) * 4).astype(np.float32)
                x[0, 0, :4] = [-30.0, -9.0, 9.0, 30.0]
                expected, got = stock.run(None, {"x": x}), ours.run(None, {"x": x})
                np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=2e-6, err_msg=path)


def test_skip_layer_norm_refuses_what_it_does_not_compute(monkeypatch):
    """A node asking for the mean or inverse deviation (outputs 1 and 2) stays stock in the kernel
    graph; given to the kernel anyway, a skip of the wrong shape is an error, not a wrong answer."""
    from neoedge.export.kernel_graph import _elementwise_why_not

    node = helper.make_node("SkipLayerNormalization", ["x", "s", "g"], ["o", "mean"], domain="com.microsoft")
    assert _elementwise_why_not(node, {}) == "SkipLayerNormalization with other attributes or outputs"
    monkeypatch.setenv(kernels.ISA_VARIABLE, PATHS[0])
    _, ours = _skip_norm(32, True, True, False, 0)
    with pytest.raises(Exception, match="skip must have the input's shape"):
        ours.run(None, {"x": np.zeros((1, 2, 32), np.float32), "skip": np.zeros((1, 1, 32), np.float32)})


def test_parameters_of_the_wrong_width_are_errors(monkeypatch):
    """gamma (or beta, bias) of another width than the rows, or a FastGelu bias that is: an error
    naming the op, not rows normalised with the wrong channels' parameters."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, PATHS[0])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", 32]) for n in ("x", "skip")]
    _, ours = _sessions(lambda d: helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["out"], domain=d),
                        inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                        [numpy_helper.from_array(np.ones(31, np.float32), "gamma")])
    with pytest.raises(Exception, match="SkipLayerNormalization: gamma, beta and bias must hold one value per channel"):
        ours.run(None, {"x": np.zeros((1, 2, 32), np.float32), "skip": np.zeros((1, 2, 32), np.float32)})
    _, ours = _sessions(lambda d: helper.make_node("FastGelu", ["x", "bias"], ["y"], domain=d), inputs[:1],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                        [numpy_helper.from_array(np.ones(33, np.float32), "bias")])
    with pytest.raises(Exception, match="FastGelu: bias must hold one value per channel"):
        ours.run(None, {"x": np.zeros((1, 2, 32), np.float32)})
    # The same check where the parameter is not a constant the kernel read at creation but a graph
    # input, whose shape is then read at each run.
    inputs_with_gamma = inputs + [helper.make_tensor_value_info("gamma", TensorProto.FLOAT, ["W"])]
    _, ours = _sessions(lambda d: helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["out"], domain=d),
                        inputs_with_gamma, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [])
    feeds = {"x": np.ones((1, 2, 32), np.float32), "skip": np.zeros((1, 2, 32), np.float32)}
    np.testing.assert_array_equal(ours.run(None, {**feeds, "gamma": np.ones(32, np.float32)})[0], 0.0)
    with pytest.raises(Exception, match="SkipLayerNormalization: gamma, beta and bias must hold one value per channel"):
        ours.run(None, {**feeds, "gamma": np.ones(31, np.float32)})
