"""Export: the package's files (graph, weights beside it, tokenizer), the optimized graph, weights
written to disk as the graph is built."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from neoedge import Manifest
from neoedge.export.graph import ExternalWeights, build_decoder
from neoedge.export.load import load_checkpoint
from neoedge.export.quantize import make_quantizer
from neoedge.manifest import GraphInfo
from neoedge.package import open_package


def test_package_files_and_hashes(package):
    manifest = Manifest.read(package)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert open_package(package, verify="full").manifest == manifest
    assert manifest.validation.passed and manifest.validation.positions > 2 * manifest.model.window_size


def test_shipped_graph_is_already_fused(package, tmp_path):
    """Every residual Add and LayerNorm is one SkipLayerNormalization, every MLP activation one
    FastGelu, and onnxruntime's extended optimization (what export runs) finds nothing left to fuse."""
    import collections

    import onnxruntime as ort

    layers = Manifest.read(package).model.num_layers
    ops = collections.Counter(node.op_type for node in onnx.load(str(package / "model.onnx"),
                                                                 load_external_data=False).graph.node)
    assert ops["SkipLayerNormalization"] == 2 * layers
    assert ops["GroupQueryAttention"] == ops["FastGelu"] == layers
    # The first block's ln_1 has no residual before it to fuse with; no other LayerNorm is left.
    assert ops["LayerNormalization"] == 1 and ops["Add"] == 1  # token + position embeddings
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "again.onnx")
    ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])
    again = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "again.onnx"),
                                                                   load_external_data=False).graph.node)
    assert again == ops


def test_weights_live_beside_the_graph(package):
    """The graph file holds the structure only; every weight is read from model.onnx.data."""
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and not [t.name for t in graph.initializer if len(t.raw_data) >= 1024]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert (package / "model.onnx").stat().st_size < (package / "model.onnx.data").stat().st_size
    assert sorted(p.name for p in package.iterdir()) == ["model.onnx", "model.onnx.data", "neoedge.json",
                                                         "tokenizer.json"]


def test_weights_are_written_as_the_graph_is_built(checkpoints, tmp_path):
    """With a weights file the graph never holds the weights in memory: each initializer is written
    as it is made (page-aligned), and reading them back gives exactly the in-memory graph's arrays."""
    checkpoint = load_checkpoint(str(checkpoints["window8"]))
    quantizer = make_quantizer("int4")

    def build(weights_file=None):
        return build_decoder(checkpoint.info, checkpoint.weights(), GraphInfo(file="model.onnx", attention="gqa"), quantizer,
                             layer_norm_eps=checkpoint.layer_norm_eps, weights_file=weights_file)

    in_memory = {t.name: numpy_helper.to_array(t) for t in build().graph.initializer}
    with ExternalWeights(tmp_path / "model.onnx.data") as weights_file:
        streamed = build(weights_file)
    assert not [t.name for t in streamed.graph.initializer if len(t.raw_data) >= ExternalWeights.MIN_SIZE]
    offsets = [int(e.value) for t in streamed.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) > 10 and all(offset % ExternalWeights.ALIGNMENT == 0 for offset in offsets)

    onnx.save_model(streamed, str(tmp_path / "model.onnx"))
    loaded = onnx.load(str(tmp_path / "model.onnx"))
    assert [t.name for t in loaded.graph.initializer] == list(in_memory)
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), in_memory[tensor.name], err_msg=tensor.name)
