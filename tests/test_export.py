"""Export: the package's files (graph, weights beside it, tokenizer), the optimized graph."""

from __future__ import annotations

import onnx

from neoedge import Manifest


def test_package_files_and_hashes(package):
    manifest = Manifest.read(package)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    manifest.check_files(package, verify_hashes=True)
    assert manifest.validation["positions"] > 2 * manifest.model.window_size


def test_shipped_graph_is_already_fused(package):
    ops = {node.op_type for node in onnx.load(str(package / "model.onnx")).graph.node}
    assert "SkipLayerNormalization" in ops
    assert "GroupQueryAttention" in ops
    assert "LayerNormalization" not in ops or "SkipLayerNormalization" in ops


def test_weights_live_beside_the_graph(package):
    """The graph file holds the structure only; every weight is read from model.onnx.data."""
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and not [t.name for t in graph.initializer if len(t.raw_data) >= 1024]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert (package / "model.onnx").stat().st_size < (package / "model.onnx.data").stat().st_size
    assert sorted(p.name for p in package.iterdir()) == ["model.onnx", "model.onnx.data", "neoedge.json",
                                                         "tokenizer.json"]
