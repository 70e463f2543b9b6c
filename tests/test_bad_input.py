"""Bad input to export gets a clear, specific error and loses nothing. (Bad packages, prompts, token
ids, options and settings: tests/test_package_integrity.py and tests/test_input_bounds.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neoedge import Generator
from neoedge.errors import ExportError
from neoedge.export import export_package, pipeline


def test_export_of_a_non_gpt_neo_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(src)
    with pytest.raises(ExportError, match="'gpt2' model; neoedge exports GPT-Neo"):
        export_package(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_export_of_a_missing_directory(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export_package(str(tmp_path / "missing"), tmp_path / "out", progress=False)


def test_interrupted_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "validate_package", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_package(str(checkpoints["window8"]), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_the_old_package(package, checkpoints, tmp_path, monkeypatch):
    out = Path(shutil.copytree(package, tmp_path / "out"))
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(pipeline, "validate_package", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_package(str(checkpoints["window8"]), out, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    Generator(out).generate("still works", max_new_tokens=3)


def test_failed_validation_is_loud(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "validate_package", lambda *a, **k: {
        "positions": 32, "max_abs_logit_diff_prefill": 0.5, "max_abs_logit_diff_stepwise": 0.0,
        "tolerance": 1e-4, "passed": False,
        "float64": {"max_abs_error_transformers": 1e-6, "max_abs_error_prefill": 0.5,
                    "max_abs_error_stepwise": 0.0, "margin": 2.0}})
    with pytest.raises(ExportError, match=r"validation failed: .* differ from transformers by 0\.5 .* from the "
                                          r"exact float64 logits by 0\.5"):
        export_package(str(checkpoints["window8"]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_int8_kv_cache_needs_fused_attention(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="int8 KV cache needs --attention gqa"):
        export_package(str(checkpoints["window8"]), tmp_path / "out", attention="plain", kv_cache="int8",
                       progress=False)
    assert not (tmp_path / "out").exists()
