"""Weights stored tiled (`export --tiled-weights`): the package's third graph reads its MatMulNBits
weights already in the layout the AVX-512 VNNI kernels would rearrange them into, from a weights
file of its own. It must give exactly what the kernel graph gives after tiling in place, run only
where that path runs, and be checked like every other file of the package."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import neoedge.kernels as kernels
from neoedge import IntegrityError, Model, SessionSettings
from neoedge.export.tiled_weights import TILE_HEIGHT, tile_rows

TILED_PATH = "avx512vnni" in kernels.runnable_paths()


@pytest.fixture(scope="module")
def pair(checkpoints, tmp_path_factory):
    """The same int4 export without and with tiled weights (round-to-nearest: deterministic)."""
    from neoedge.export import export_package

    root = tmp_path_factory.mktemp("tiled-weights")
    out = {}
    for tiled in (False, True):
        path = root / ("tiled" if tiled else "in-place")
        export_package(str(checkpoints["window8"]), path, quantize="int4", algorithm="rtn", progress=False,
                       tiled_weights=tiled)
        out[tiled] = path
    return out


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 48, 50])
def test_the_stored_layout_is_the_one_the_kernels_tile_into(rows):
    """tiled.h: rows in tiles of 16 (the last one the rest), element d of a tile's row r at d h + r,
    h the tile's height; elements of 4 bytes, whose own bytes keep their order."""
    width = 6
    rng = np.random.default_rng(rows)
    array = rng.integers(0, 256, (rows, width * 4), dtype=np.uint8)
    got = tile_rows(array, rows)
    expected = np.empty_like(array.reshape(-1))
    for first in range(0, rows, TILE_HEIGHT):
        h = min(TILE_HEIGHT, rows - first)
        for r in range(h):
            for d in range(width):
                at = first * width * 4 + (d * h + r) * 4
                expected[at: at + 4] = array[first + r, d * 4: d * 4 + 4]
    np.testing.assert_array_equal(got, expected)


def test_a_package_with_tiled_weights_adds_two_files_and_changes_no_other(pair):
    from neoedge.manifest import Manifest

    plain, tiled = Manifest.read(pair[False]), Manifest.read(pair[True])
    assert plain.graph.tiled_kernel_file is None
    assert tiled.graph.tiled_kernel_file == "model.kernels.tiled.onnx"
    assert set(tiled.files) - set(plain.files) == {"model.kernels.tiled.onnx", "model.kernels.tiled.onnx.data"}
    for name in plain.files:
        if name != "neoedge.json":
            assert (pair[False] / name).read_bytes() == (pair[True] / name).read_bytes(), name


@pytest.mark.skipif(not TILED_PATH, reason="this CPU does not run the kernels' tiled path")
def test_weights_stored_tiled_give_exactly_the_logits_and_tokens_of_weights_tiled_in_place(pair):
    in_place, stored = Model(pair[False]), Model(pair[True])
    assert "weights tiled in place" in in_place.kernels.describe()
    assert "weights stored tiled" in stored.kernels.describe()
    ids = list(range(3, 90))
    np.testing.assert_array_equal(stored.logits(ids), in_place.logits(ids))
    np.testing.assert_array_equal(stored.stepwise_logits(ids, prefill=40), in_place.stepwise_logits(ids, prefill=40))
    prompt = "def open_file(path):"
    assert stored.sequence(prompt).generate(max_new_tokens=24, temperature=0.0).tokens == \
        in_place.sequence(prompt).generate(max_new_tokens=24, temperature=0.0).tokens


def test_where_the_tiled_path_does_not_run_the_kernel_graph_or_stock_runs_instead(pair, monkeypatch):
    """With tiling off (or another path) the tiled graph is not loaded: the same logits as the
    package without it under the same setting."""
    monkeypatch.setenv("NEOEDGE_KERNELS_TILED", "0")
    a, b = Model(pair[True]), Model(pair[False])
    assert "stored tiled" not in a.kernels.describe()
    ids = list(range(3, 60))
    np.testing.assert_array_equal(a.logits(ids), b.logits(ids))
    stock = Model(pair[True], settings=SessionSettings(kernels="off"))
    assert stock.kernels.isa == kernels.STOCK
    assert np.isfinite(stock.logits(ids)).all()


@pytest.mark.skipif(not TILED_PATH, reason="this CPU does not run the kernels' tiled path")
def test_the_kernels_refuse_weights_stored_tiled_where_they_would_read_them_as_they_are(pair, monkeypatch):
    """Forced onto a path that reads MatMulNBits' own layout (or with tiling switched off), a
    session over the tiled graph fails at creation, naming why: never a run on rearranged bytes."""
    for variable, value in (("NEOEDGE_KERNELS_TILED", "0"), (kernels.ISA_VARIABLE, "avx2")):
        monkeypatch.setenv(variable, value)
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(kernels.library_path()))
        with pytest.raises(Exception, match="stored in the tiled layout"):
            ort.InferenceSession(str(pair[True] / "model.kernels.tiled.onnx"), options,
                                 providers=["CPUExecutionProvider"])
        monkeypatch.delenv(variable)


def test_a_changed_byte_of_the_tiled_weights_is_refused(pair, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pair[True], copy)
    data = copy / "model.kernels.tiled.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="model.kernels.tiled.onnx.data"):
        Model(copy, verify="full")


def test_tiled_weights_need_a_quantized_package_and_its_kernel_graph():
    from neoedge.errors import ExportError, ManifestError
    from neoedge.export import ExportOptions
    from neoedge.manifest import GraphInfo

    with pytest.raises(ExportError, match="tiled_weights applies to int8/int4"):
        ExportOptions(tiled_weights=True)
    with pytest.raises(ManifestError, match="tiled_kernel_file needs graph.kernel_file"):
        GraphInfo(file="model.onnx", attention="gqa", tiled_kernel_file="model.kernels.tiled.onnx")


def test_a_package_without_tiled_weights_writes_no_key_older_readers_would_refuse(pair):
    """Readers of format_version 2 from before tiled weights refuse unknown graph keys: a package
    exported without them must not carry the key at all (not even as null)."""
    import json

    plain = json.loads((pair[False] / "neoedge.json").read_bytes())
    tiled = json.loads((pair[True] / "neoedge.json").read_bytes())
    assert "tiled_kernel_file" not in plain["graph"]
    assert tiled["graph"]["tiled_kernel_file"] == "model.kernels.tiled.onnx"


@pytest.mark.skipif(not TILED_PATH, reason="this CPU does not run the kernels' tiled path")
def test_symmetric_int8_weights_and_an_8_bit_lm_head_stored_tiled_give_the_same_logits(checkpoints, tmp_path):
    from neoedge.export import export_package

    paths = {}
    for tiled in (False, True):
        paths[tiled] = tmp_path / str(tiled)
        export_package(str(checkpoints["window8"]), paths[tiled], quantize="int8", symmetric=True, algorithm="rtn",
                       lm_head_bits=8, progress=False, validate=False, tiled_weights=tiled)
    in_place, stored = Model(paths[False]), Model(paths[True])
    assert "weights stored tiled" in stored.kernels.describe()
    ids = list(range(7, 70))
    np.testing.assert_array_equal(stored.logits(ids), in_place.logits(ids))


def test_a_forced_path_that_reads_plain_weights_loads_the_kernel_graph_not_the_tiled_one(pair, monkeypatch):
    if "avx2" not in kernels.runnable_paths():
        pytest.skip("no AVX2 path here")
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx2")
    forced, plain = Model(pair[True]), Model(pair[False])
    assert forced.kernels.isa == "avx2" and "tiled" not in forced.kernels.describe()
    ids = list(range(3, 40))
    np.testing.assert_array_equal(forced.logits(ids), plain.logits(ids))


def test_an_int8_export_with_zero_points_cannot_ask_for_tiled_weights():
    from neoedge.errors import ExportError
    from neoedge.export import ExportOptions

    with pytest.raises(ExportError, match="needs symmetric weights"):
        ExportOptions(quantize="int8", tiled_weights=True)
    with pytest.raises(ExportError, match="needs symmetric weights"):
        ExportOptions(quantize="int4", symmetric=False, tiled_weights=True)
    assert ExportOptions(quantize="int8", symmetric=True, tiled_weights=True).tiled_weights
