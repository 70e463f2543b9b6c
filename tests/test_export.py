"""Export: the package's files, the optimized graph, and external data for models over 2 GB."""

from __future__ import annotations

import json

import onnx

from neoedge import Generator, Manifest
from neoedge.export import export_package, pipeline


def test_package_files_and_hashes(package):
    manifest = Manifest.read(package)
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}
    manifest.check_files(package, verify_hashes=True)
    assert manifest.validation["positions"] > 2 * manifest.model.window_size


def test_shipped_graph_is_already_fused(package):
    ops = {node.op_type for node in onnx.load(str(package / "model.onnx")).graph.node}
    assert "SkipLayerNormalization" in ops
    assert "GroupQueryAttention" in ops
    assert "LayerNormalization" not in ops or "SkipLayerNormalization" in ops


def test_external_data_for_large_models(checkpoints, tmp_path, monkeypatch):
    """Models over protobuf's 2 GB keep weights in model.onnx.data; forced here on a tiny model."""
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    export_package(str(checkpoints["window8"]), out, progress=False)
    manifest = json.loads((out / "neoedge.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert manifest["validation"]["max_abs_logit_diff_prefill"] < 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "neoedge.json", "tokenizer.json"]
    assert Generator(out).generate("Open", max_new_tokens=4, stop_at_eos=False)
