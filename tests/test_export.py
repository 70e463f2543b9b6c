"""Export: the package's files (graph, weights beside it, tokenizer), the optimized graph, weights
written to disk as the graph is built."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neoedge import Manifest
from neoedge.export import export_package
from neoedge.export.graph import build_decoder
from neoedge.export.load import load_checkpoint
from neoedge.export.scheme import make_scheme
from neoedge.export.weight_quantization import quantize_weights
from neoedge.export.weights_file import ExternalWeights
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
    weights = quantize_weights(checkpoint.weights(), make_scheme("int4", algorithm="rtn"), checkpoint.info.num_layers).weights

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


def test_export_is_deterministic(checkpoints, tmp_path):
    """The same checkpoint and options give the same package, byte for byte: every file."""
    def export(name):
        return export_package(str(checkpoints["window8"]), tmp_path / name, quantize="int4", block_size=32,
                              progress=False) and tmp_path / name

    first, second = export("a"), export("b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert Manifest.read(first).quantization.settings.algorithm == "gptq"


def test_export_does_not_read_the_standard_library(checkpoints, tmp_path, monkeypatch):
    """Calibration comes from the corpus that ships with neoedge, never from the running Python's
    own modules (whose docstrings change between versions)."""
    import neoedge.export.tiny as tiny

    def forbidden():
        raise AssertionError("the export read the standard library's docstrings")

    monkeypatch.setattr(tiny, "stdlib_docstrings", forbidden)
    manifest = export_package(str(checkpoints["window8"]), tmp_path / "q", quantize="int4", block_size=32,
                              progress=False, validate=False)
    calibration = manifest.quantization.settings.calibration
    assert calibration.text == "built-in: stdlib-docstrings.txt"
    assert calibration.sha256 == hashlib.sha256(tiny.CALIBRATION_CORPUS.read_bytes()).hexdigest()


def test_calibration_text_is_the_one_given(checkpoints, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("Open the file, read every line and count the words in it.\n" * 80, encoding="utf-8")
    default = export_package(str(checkpoints["window8"]), tmp_path / "default", quantize="int4", block_size=32,
                             progress=False, validate=False)
    custom = export_package(str(checkpoints["window8"]), tmp_path / "custom", quantize="int4", block_size=32,
                            calibration=text, progress=False, validate=False)
    info = custom.quantization.settings.calibration
    assert (info.text, info.sha256) == ("calibration.txt", hashlib.sha256(text.read_bytes()).hexdigest())
    assert info.sequences * info.tokens_per_sequence <= len(text.read_text()) // 2
    # Different text, different weights (and KV cache scales).
    assert default.files["model.onnx.data"].sha256 != custom.files["model.onnx.data"].sha256


def test_round_to_nearest_needs_no_calibration_text(checkpoints, tmp_path):
    manifest = export_package(str(checkpoints["window8"]), tmp_path / "q", quantize="int4", block_size=32,
                              algorithm="rtn", kv_cache="float32", progress=False, validate=False)
    assert manifest.quantization.settings.algorithm == "rtn"
    assert manifest.quantization.settings.calibration is None


@pytest.mark.parametrize("content,options,message", [
    (None, dict(quantize="int4"), "calibration text not found"),
    (b"\xff\xfe not text", dict(quantize="int4"), "is not UTF-8"),
    (b"   \n", dict(quantize="int4"), "is empty"),
    (b"too short", dict(quantize="int4"), "at least 64 are needed"),
    (b"any text " * 100, dict(quantize="none"), "has no effect here"),
    (b"any text " * 100, dict(quantize="int4", algorithm="rtn", kv_cache="float32"), "has no effect here"),
])
def test_unusable_calibration_text_is_refused(checkpoints, tmp_path, content, options, message):
    from click.testing import CliRunner

    from neoedge.cli import main
    from neoedge.errors import ExportError

    path = tmp_path / "calibration.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ExportError, match=message):
        export_package(str(checkpoints["window8"]), tmp_path / "q", calibration=path, progress=False, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["calibration.txt"] if content is not None else [])
    args = ["export", str(checkpoints["window8"]), str(tmp_path / "q"), "--calibration", str(path)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output
    # A text too short is known only once the checkpoint's tokenizer has read it: the progress bar
    # has started by then, and the error is its last line.
    assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith("Error: ")
    if "at least 64" not in message:
        assert len(result.output.strip().splitlines()) == 1
