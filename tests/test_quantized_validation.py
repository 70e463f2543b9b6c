"""Quantized packages are judged: a package outside the bounds of its precision (mean KL, relative
logit error, top-1 agreement where the reference is decisive, against transformers' fp32 logits) is
refused and nothing is written. Deliberately broken graphs prove the bounds catch breakage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from neoedge import Manifest
from neoedge.errors import ExportError
from neoedge.export import calibrate, export_package, quantize, weight_quantization
from neoedge.export.tiny import trained_checkpoint
from neoedge.export.validate import QUALITY_BOUNDS
from neoedge.manifest import ValidationReport


def _scramble_scales_of(monkeypatch, shape_of):
    """Permute the block scales of the first weight stored whose [out, in] shape is shape_of(weight)
    (as the graph stores it, whichever algorithm chose the codes)."""
    original = quantize.WeightStorage._initializers
    done = []

    def scrambled(g, prefix, weight):
        if not done and shape_of(weight):
            done.append(weight.shape)
            scales = np.random.default_rng(0).permutation(weight.scales.ravel()).reshape(weight.scales.shape)
            weight = replace(weight, scales=scales)
        return original(g, prefix, weight)
    monkeypatch.setattr(quantize.WeightStorage, "_initializers", staticmethod(scrambled))
    return done


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_trained_model_with_one_attention_weights_scales_scrambled_is_refused(scheme, tmp_path, monkeypatch):
    hidden = 128  # the trained model's width: its first [3 * hidden, hidden] weight is layer 0's qkv
    done = _scramble_scales_of(monkeypatch, lambda w: w.shape == (3 * hidden, hidden))
    with pytest.raises(ExportError, match=rf"validation failed: mean KL .* nats > {QUALITY_BOUNDS[scheme].max_mean_kl:g}"
                                          r".*; .*/out was not written"):
        # float32 KV cache: no calibration pass, the fault is in the weights.
        export_package(str(trained_checkpoint()), tmp_path / "out", quantize=scheme, kv_cache="float32",
                       progress=False)
    assert done == [(3 * hidden, hidden)]
    assert list(tmp_path.iterdir()) == []


def test_random_model_with_the_tables_scales_scrambled_is_refused(checkpoints, tmp_path, monkeypatch):
    """Random weights predict nearly uniformly (no decisive position): quality cannot be judged, but
    garbage can, by the logits' correlation."""
    done = _scramble_scales_of(monkeypatch, lambda w: w.shape == (512, 64))  # the tied embedding/lm_head
    with pytest.raises(ExportError, match=r"validation failed: logit correlation .* < 0\.3 "):
        export_package(str(checkpoints["window8"]), tmp_path / "out", quantize="int4", kv_cache="float32",
                       progress=False)
    assert done and list(tmp_path.iterdir()) == []


def test_a_broken_kv_cache_is_caught_by_the_decode_steps(tmp_path, monkeypatch):
    """Cache scales 16x too small clip the cached keys and values: only cached decoding reads them
    (the prefill attends to the fresh values), so only the step-wise figures show it."""
    original = calibrate.kv_cache_scales
    monkeypatch.setattr(weight_quantization, "kv_cache_scales",
                        lambda *a, **k: [(k_ / 16, v / 16) for k_, v in original(*a, **k)])
    with pytest.raises(ExportError, match="validation failed: mean KL"):
        export_package(str(trained_checkpoint()), tmp_path / "out", kv_cache="int8", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained_int4(tmp_path_factory):
    out = tmp_path_factory.mktemp("judged") / "int4"
    return export_package(str(trained_checkpoint()), out, quantize="int4", progress=False), out


def test_a_correct_quantized_package_passes_within_its_bounds(trained_int4):
    manifest, out = trained_int4
    report = manifest.validation
    assert report.passed and report.tolerance is None and report.float64 is None
    quality = report.quality
    bounds = QUALITY_BOUNDS["int4"]
    assert quality.bounds == "int4" and quality.max_mean_kl == bounds.max_mean_kl  # judged in full
    assert 0 < quality.mean_kl < bounds.max_mean_kl / 3  # measured 0.009-0.016 on this model
    assert 0 < quality.relative_error < bounds.max_relative_error / 3
    assert quality.decisive_positions >= 16 and quality.decisive_agreement >= 0.95
    assert quality.correlation > 0.99 and quality.min_correlation == bounds.min_correlation
    assert report.positions >= 256
    assert Manifest.read(out).validation == report  # typed, round-tripped through neoedge.json


def test_one_renderer_for_export_and_info(trained_int4):
    from neoedge.cli import main

    manifest, out = trained_int4
    lines = manifest.validation.lines()
    assert any(line.startswith("int4 bounds: mean KL") for line in lines)
    info = CliRunner().invoke(main, ["info", str(out)])
    assert info.exit_code == 0, info.output
    for line in lines:
        assert line in info.stdout


def test_a_random_model_is_judged_by_correlation_only(checkpoints, tmp_path):
    manifest = export_package(str(checkpoints["window8"]), tmp_path / "out", quantize="int4", progress=False)
    quality = manifest.validation.quality
    assert manifest.validation.passed and quality.decisive_positions < 16
    assert quality.max_mean_kl is None and quality.max_relative_error is None
    assert 0.3 < quality.correlation < 0.999
    assert any("judged by logit correlation only" in line for line in manifest.validation.lines())


def test_report_of_an_older_neoedge_reads_as_not_judged():
    old = {"positions": 80, "window_size": 32, "decode_steps": 32, "max_abs_logit_diff_prefill": 0.3,
           "max_abs_logit_diff_stepwise": 0.4, "top1_agreement": 0.9, "tolerance": None}
    report = ValidationReport.from_json(old)
    assert report.passed is None and report.max_abs_logit_diff == 0.4
    assert report.lines()[-1] == "not judged (exported by an older neoedge)"
