"""Export: the package's files (graph, weights beside it, tokenizer), the optimized graph, weights
written to disk as the graph is built."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from neoedge import Manifest
from neoedge.export.graph import build_decoder
from neoedge.export.load import load_checkpoint
from neoedge.export.scheme import make_scheme
from neoedge.export.weight_quantization import quantize_weights
from neoedge.export.weights_file import ExternalWeights
from neoedge.manifest import GraphInfo


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


def test_weights_are_written_as_the_graph_is_built(checkpoints, tmp_path):
    """With a weights file the graph never holds the weights in memory: each initializer is written
    as it is made (page-aligned), and reading them back gives exactly the in-memory graph's arrays."""
    checkpoint = load_checkpoint(str(checkpoints["window8"]))
    weights = quantize_weights(checkpoint.weights(), make_scheme("int4"), checkpoint.info.num_layers).weights

    def build(weights_file=None):
        return build_decoder(checkpoint.info, weights, GraphInfo(file="model.onnx", attention="gqa"),
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


def test_no_two_export_modules_import_each_other():
    """The export's modules form a one-way graph: no cycle, not even through an import inside a
    function or under TYPE_CHECKING."""
    import ast
    from pathlib import Path

    import neoedge.export

    root = Path(neoedge.export.__file__).parent
    modules = {path.stem for path in root.glob("*.py")}
    imports: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:  # from .x import y
                    found.add(node.module.split(".")[0])
                elif node.level == 1:  # from . import x
                    found.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("neoedge.export."):
                    found.add(node.module.split(".")[2])
        imports[path.stem] = found & modules - {path.stem}
    assert imports["quantize"] <= {"blockwise", "graph_builder", "weights"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and not seen.add(m) and reaches(m, goal, seen))
                   for m in imports[start])

    cycles = sorted(m for m in modules if reaches(m, m, set()))
    assert not cycles, f"modules in an import cycle: {cycles}"
