"""Quantization quality on the trained tiny GPT-Neo: what int8/int4 cost in perplexity stays small.

Random weights cannot show quantization damage; the committed trained model can. Deterministic:
same checkpoint, same held-out text, same windows.
"""

from __future__ import annotations

import numpy as np
import pytest

from neoedge import Generator
from neoedge.evaluate import score
from neoedge.export import export_package
from neoedge.export.tiny import HELDOUT_FILE, trained_checkpoint

TOKENS = 6000  # a prefix of the held-out text keeps the test fast


@pytest.fixture(scope="module")
def trained_packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    source = str(trained_checkpoint())
    packages = {q: export_package(source, root / q, quantize=q, progress=False) and root / q
                for q in ("none", "int8", "int4")}
    for q in ("int8", "int4"):  # round-to-nearest: what the data-aware default must beat
        packages[f"{q}-rtn"] = export_package(source, root / f"{q}-rtn", quantize=q, algorithm="rtn",
                                              progress=False) and root / f"{q}-rtn"
    return packages


@pytest.fixture(scope="module")
def heldout_ids(trained_packages):
    generator = Generator(trained_packages["none"])
    text = (trained_checkpoint() / HELDOUT_FILE).read_text(encoding="utf-8")
    ids = [generator.manifest.model.bos_token_id] + generator.tokenizer.encode(text)
    return np.asarray(ids[:TOKENS], dtype=np.int64)


@pytest.fixture(scope="module")
def fp32_perplexity(trained_packages, heldout_ids):
    return score(Generator(trained_packages["none"]).logits, heldout_ids, window=256).perplexity


def test_trained_model_is_a_real_language_model(fp32_perplexity, trained_packages):
    vocab = Generator(trained_packages["none"]).manifest.model.vocab_size
    assert fp32_perplexity < vocab / 10  # far better than chance (uniform: perplexity = vocab)


@pytest.mark.parametrize("scheme,budget", [("int8", 0.005), ("int4", 0.02)])
def test_quantized_perplexity_within_budget(trained_packages, heldout_ids, fp32_perplexity, scheme, budget):
    fp32 = Generator(trained_packages["none"])
    report = score(Generator(trained_packages[scheme]).logits, heldout_ids, window=256, reference=fp32.logits)
    change = report.perplexity / fp32_perplexity - 1
    assert change <= budget, f"{scheme}: perplexity {report.perplexity:.3f} vs fp32 {fp32_perplexity:.3f} ({change:+.2%})"
    assert report.top1_agreement >= (0.97 if scheme == "int8" else 0.85)


def test_int8_kv_cache_costs_no_measurable_quality(trained_packages, heldout_ids, fp32_perplexity, tmp_path):
    """Quantized packages default to an int8 KV cache with calibrated per-channel scales."""
    from neoedge import Manifest

    assert Manifest.read(trained_packages["int8"]).graph.kv_cache == "int8"
    assert Manifest.read(trained_packages["none"]).graph.kv_cache == "float32"
    fp32_kv8 = export_package(str(trained_checkpoint()), tmp_path / "kv8", kv_cache="int8", progress=False)
    assert fp32_kv8.graph.kv_cache == "int8" and fp32_kv8.validation.quality.bounds == "int8"
    report = score(Generator(tmp_path / "kv8").logits, heldout_ids, window=256)
    assert abs(report.perplexity / fp32_perplexity - 1) <= 0.001


def test_int8_kv_cache_decodes_like_its_prefill(trained_packages, heldout_ids):
    """Step-wise decoding reads the int8 cache (sliding on local layers); it must pick the same
    tokens as the prefill, which attends to the fresh float keys within the chunk."""
    generator = Generator(trained_packages["int8"])
    ids = heldout_ids[:400]
    prefill, stepwise = generator.logits(ids), generator.stepwise_logits(ids, prefill=10)
    assert (prefill.argmax(-1) == stepwise.argmax(-1)).mean() >= 0.99
    # Measured 0.074 over 400 positions (logits of std 3.2); a misplaced int8 cache row moves them by whole units.
    assert np.abs(prefill - stepwise).max() < 0.2


def _judged(trained_packages, heldout_ids, fp32_perplexity, name):
    fp32 = Generator(trained_packages["none"])
    report = score(Generator(trained_packages[name]).logits, heldout_ids, window=256, reference=fp32.logits)
    return report.perplexity / fp32_perplexity - 1, report.top1_agreement


def test_default_int4_is_data_aware_and_beats_round_to_nearest(trained_packages, heldout_ids, fp32_perplexity):
    """The default int4 (GPTQ from the built-in calibration text, same MatMulNBits layout as
    round-to-nearest) on held-out text that is not the calibration text. Measured on this prefix
    (6000 tokens, windows of 256): RTN +1.15% / 88.6% top-1 agreement, GPTQ +0.36% / 94.5%."""
    from neoedge import Manifest

    assert Manifest.read(trained_packages["int4"]).quantization.settings.algorithm == "gptq"
    rtn_change, rtn_agreement = _judged(trained_packages, heldout_ids, fp32_perplexity, "int4-rtn")
    change, agreement = _judged(trained_packages, heldout_ids, fp32_perplexity, "int4")
    print(f"int4 rtn {rtn_change:+.3%} {rtn_agreement:.2%}; gptq {change:+.3%} {agreement:.2%}")
    assert change <= 0.005 and agreement >= 0.93  # issue 15's targets
    assert change <= rtn_change - 0.005 and agreement >= rtn_agreement + 0.04


def test_int8_data_aware_is_no_worse_than_round_to_nearest(trained_packages, heldout_ids, fp32_perplexity):
    """Measured: RTN -0.003% / 98.92%, GPTQ +0.011% / 99.02% (both within noise of fp32)."""
    rtn_change, rtn_agreement = _judged(trained_packages, heldout_ids, fp32_perplexity, "int8-rtn")
    change, agreement = _judged(trained_packages, heldout_ids, fp32_perplexity, "int8")
    print(f"int8 rtn {rtn_change:+.3%} {rtn_agreement:.2%}; default {change:+.3%} {agreement:.2%}")
    assert abs(change) <= max(abs(rtn_change), 0.001) and agreement >= rtn_agreement - 0.005
