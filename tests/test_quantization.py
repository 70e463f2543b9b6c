"""int8/int4 packages: the packing is exact, the tied table is stored once, and they run torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from neoedge import Generator
from neoedge.export import export_package
from neoedge.export.blockwise import QuantizedTensor, minmax_grid, quantize_blockwise, quantize_codes
from neoedge.export.graph import build_decoder
from neoedge.export.load import load_checkpoint
from neoedge.export.quantize import WeightStorage
from neoedge.export.scheme import QuantizationScheme
from neoedge.export.weight_quantization import quantize_weights
from neoedge.manifest import GraphInfo


def _dequantize(q: QuantizedTensor) -> np.ndarray:
    """MatMulNBits' dequantization written out from its packed inputs (not QuantizedTensor's own)."""
    packed, scales, zeros, bits = q.packed, q.scales, q.zero_points, q.bits
    if bits == 4:
        packed = np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1)
    if zeros is None:  # symmetric: MatMulNBits' implicit zero point is mid-range
        zeros = np.full(scales.shape, 1 << (bits - 1), np.uint8)
    elif bits == 4:
        zeros = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(zeros.shape[0], -1)[:, : scales.shape[1]]
    values = (packed.astype(np.float32) - zeros[..., None]) * scales[..., None]
    return values.reshape(packed.shape[0], -1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_blockwise_quantization_error(bits, block):
    weight = np.random.default_rng(bits).standard_normal((24, 96)).astype(np.float32)
    weight[3, 5] = 9.0  # an outlier stretches its block's range
    quantized = quantize_blockwise(weight, bits, block)
    scales = quantized.scales
    restored = _dequantize(quantized)
    np.testing.assert_array_equal(restored, quantized.dequantize())
    error = np.square(restored - weight).reshape(24, -1, block).sum(-1)
    blocks = weight.reshape(24, -1, block)
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    s, z = minmax_grid(low, high, (1 << bits) - 1)
    q = quantize_codes(blocks, s, z, (1 << bits) - 1)
    minmax_error = np.square((q - z[..., None].astype(np.float32)) * s[..., None] - blocks).sum(-1)
    assert np.all(error <= minmax_error + 1e-6)  # never worse than plain min/max, block by block
    if bits == 8:  # min/max grid: every weight within half a step
        assert np.all(np.abs(restored - weight) <= np.repeat(scales, block, axis=1) / 2 + 1e-6)
    else:
        assert error.sum() < minmax_error.sum()  # the clipping search found something better


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_quantization_puts_the_extreme_on_the_grid(bits):
    weight = np.random.default_rng(bits).standard_normal((24, 96)).astype(np.float32)
    weight[3, 5] = 9.0  # positive extreme: the scale turns negative so it lands on -mid
    weight[7, 40] = -9.0
    quantized = quantize_blockwise(weight, bits, 32, symmetric=True)
    assert quantized.zero_points is None
    scales = quantized.scales
    restored = _dequantize(quantized)
    if bits == 8:  # no clipping search at 8 bits: the extremes exact, every weight within a step
        # (within half a step, except on the grid's short side, which ends one step early)
        assert np.all(np.abs(restored - weight) <= np.repeat(np.abs(scales), 32, axis=1) + 1e-6)
        assert restored[3, 5] == pytest.approx(9.0) and restored[7, 40] == pytest.approx(-9.0)
    relative = np.square(restored - weight).sum() / np.square(weight).sum()
    assert relative < (1e-2 if bits == 4 else 1e-4)


@pytest.mark.parametrize("bits,lm_head_bits,block,symmetric", [
    (4, 4, 32, False), (8, 8, 32, False), (4, 8, 32, False), (4, 4, 64, False), (8, 8, 16, False),
    (4, 4, 32, True), (4, 8, 64, True), (8, 8, 16, True)])
def test_quantized_graph_equals_the_model_with_dequantized_weights(checkpoints, bits, lm_head_bits, block, symmetric):
    """accuracy_level 0 computes in fp32 on the dequantized weights: then the graph must reproduce
    transformers run with those same weights (checks packing, zero points — also an odd number of
    blocks per row (64 = 1 block), whose packed zero points are padded — the embedding lookup from
    the shared table and the lm_head)."""
    checkpoint = load_checkpoint(str(checkpoints["window8"]))
    scheme = QuantizationScheme(bits, block, lm_head_bits, symmetric)
    quantized = quantize_weights(checkpoint.weights(), scheme, checkpoint.info.num_layers).weights
    graph = build_decoder(checkpoint.info, quantized, GraphInfo(file="m", attention="plain"),
                          WeightStorage(accuracy_level=0))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    model = checkpoint.model
    state = model.state_dict()
    stored = 0
    for name, tensor in state.items():
        if name.endswith(("proj.weight", "c_fc.weight")) or name == "transformer.wte.weight":
            assert isinstance(quantized[name], QuantizedTensor), name
            tensor.copy_(torch.from_numpy(_dequantize(quantized[name])))
            stored += 1
    assert stored == 6 * checkpoint.info.num_layers + 1  # every weight MatMul and the table
    ids = np.random.default_rng(0).integers(0, checkpoint.info.vocab_size, size=40)
    feeds = {"input_ids": ids[None], "position_ids": np.arange(40)[None], "logits_positions": np.arange(40)}
    for layer in range(checkpoint.info.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{layer}"] = np.zeros((1, 4, 0, 16), np.float32)
    logits = session.run(["logits"], feeds)[0][0]
    with torch.no_grad():
        expected = model(torch.from_numpy(ids[None])).logits[0].numpy()
    assert np.abs(logits - expected).max() < 1e-4


@pytest.fixture(scope="module")
def quantized(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {q: export_package(str(checkpoints["window8"]), root / q, quantize=q, block_size=32, progress=False)
            and root / q for q in ("int8", "int4")}


def test_tied_table_is_stored_once(quantized):
    import onnx
    from onnx import numpy_helper

    for scheme, path in quantized.items():
        model = onnx.load(str(path / "model.onnx"))
        tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if "wte" in t.name}
        assert "transformer.wte.weight" not in tables
        packed = tables.pop("transformer.wte.qweight")
        readers = [n for n in model.graph.node if "transformer.wte.qweight" in n.input]
        assert sorted(n.op_type for n in readers) == ["GatherBlockQuantized", "MatMulNBits"], scheme
        # Only the small per-block scales (and zero points) may exist twice, shaped for the lookup.
        assert sum(a.nbytes for a in tables.values()) < packed.nbytes, scheme


def test_manifest_records_the_scheme(quantized):
    for scheme, path in quantized.items():
        data = json.loads((path / "neoedge.json").read_text())
        assert data["quantization"]["scheme"] == scheme
        assert data["quantization"]["settings"]["bits"] == int(scheme[3:])
        assert data["quantization"]["settings"]["block_size"] == 32
        assert data["validation"]["top1_agreement"] > 0.5


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_packages_run_without_torch(quantized, scheme):
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'optimum', 'onnx'): sys.modules[m] = None\n"
        "from neoedge import Generator\n"
        f"print(Generator({str(quantized[scheme])!r}).generate('Open a file', max_new_tokens=8, stop_at_eos=False))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_quantized_logits_stay_close_to_fp32(quantized, package):
    ids = np.random.default_rng(1).integers(0, 512, size=64)
    fp32 = Generator(package).logits(ids)
    for scheme, path in quantized.items():
        logits = Generator(path).logits(ids)
        agreement = (logits.argmax(-1) == fp32.argmax(-1)).mean()
        assert agreement >= (0.9 if scheme == "int8" else 0.6), (scheme, agreement)


def test_default_block_size_fits_the_model(checkpoints, tmp_path):
    """The tiny model's hidden width (64) is not a multiple of the default 128, its MLP's (256) is:
    the default halves where needed, and the manifest records the blocks actually used."""
    manifest = export_package(str(checkpoints["window8"]), tmp_path / "q", quantize="int4", progress=False,
                              validate=False)
    assert manifest.quantization.settings["block_size"] == [64, 128]
    assert manifest.quantization.settings["zero_point"] == "symmetric"
    ids = np.random.default_rng(2).integers(0, 512, size=16)
    assert np.isfinite(Generator(tmp_path / "q").logits(ids)).all()


def test_block_size_that_does_not_divide_is_refused(checkpoints, tmp_path):
    from neoedge.errors import ExportError

    with pytest.raises(ExportError, match="blocks of 128"):
        export_package(str(checkpoints["window8"]), tmp_path / "q", quantize="int8", block_size=128, progress=False)
    assert not (tmp_path / "q").exists()


def test_unpacked_quantized_package_warns_and_still_computes_the_same(quantized, caplog):
    """Quantized kernels without their packed weights are many times slower: say so, stay correct."""
    ids = np.random.default_rng(4).integers(0, 512, size=24)
    packed = Generator(quantized["int4"]).logits(ids)
    with caplog.at_level("WARNING", logger="neoedge.generator"):
        unpacked = Generator(quantized["int4"], prepack=False)
    assert "many times slower" in caplog.text
    assert (unpacked.logits(ids).argmax(-1) == packed.argmax(-1)).mean() > 0.9
