"""A package's generation defaults come from its checkpoint's generation_config.json, meaning what
transformers' generate() does with it; what neoedge cannot honour is named in a warning."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import GenerationConfig

from neoedge import ExportError, Manifest, Model
from neoedge.export import export_package
from neoedge.export.load import DEFAULT_MAX_NEW_TOKENS, generation_defaults
from neoedge.export.tiny import trained_checkpoint


def _defaults(caplog, **fields):
    with caplog.at_level(logging.INFO, logger="neoedge.export.load"):
        return generation_defaults(GenerationConfig(**fields), "ckpt", eos_token_id=0).as_options()


def test_without_a_generation_config_the_package_is_greedy():
    assert generation_defaults(None, "ckpt").as_options() == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}


def test_sampling_takes_transformers_defaults_for_what_the_file_leaves_out(caplog):
    # transformers samples with top_k 50, top_p 1, temperature 1 unless told otherwise.
    assert _defaults(caplog, do_sample=True) == {"max_new_tokens": 128, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    assert _defaults(caplog, do_sample=True, temperature=0.6, top_k=20, top_p=0.9, repetition_penalty=1.3,
                     max_new_tokens=64) == {"max_new_tokens": 64, "temperature": 0.6, "top_k": 20, "top_p": 0.9,
                                            "repetition_penalty": 1.3}
    assert _defaults(caplog, do_sample=True, top_k=0)["top_k"] == 0


def test_without_do_sample_sampling_fields_are_ignored_loudly(caplog):
    """transformers decodes greedily without do_sample whatever temperature says; the penalty applies."""
    defaults = _defaults(caplog, temperature=0.7, top_k=5, repetition_penalty=1.2)
    assert defaults == {"max_new_tokens": 128, "repetition_penalty": 1.2}
    assert "sets temperature=0.7, top_k=5 without do_sample" in caplog.text


@pytest.mark.parametrize("fields,named", [
    (dict(num_beams=4), "num_beams=4 is ignored"),
    (dict(no_repeat_ngram_size=3), "no_repeat_ngram_size=3 is ignored"),
    (dict(max_length=50), "max_length=50 (prompt and output together) is ignored"),
    (dict(eos_token_id=7), "eos_token_id 7 is ignored"),
])
def test_fields_neoedge_cannot_honour_are_named(caplog, fields, named):
    assert _defaults(caplog, **fields) == {"max_new_tokens": 128}
    assert named in caplog.text


def test_the_model_eos_is_not_reported_as_ignored(caplog):
    _defaults(caplog, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    assert "ignored" not in caplog.text


def test_a_value_neoedge_refuses_is_an_export_error():
    with pytest.raises(ExportError, match="generation_config.json cannot be the package's defaults: .*repetition_penalty"):
        generation_defaults(GenerationConfig(repetition_penalty=5000.0), "ckpt")


def test_export_writes_the_checkpoints_generation_config_into_the_manifest(checkpoints, tmp_path):
    source = shutil.copytree(checkpoints["window8"], tmp_path / "ckpt")
    (source / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "max_new_tokens": 40, "bos_token_id": 0,
         "eos_token_id": 0}))
    manifest = export_package(str(source), tmp_path / "pkg", progress=False, validate=False)
    expected = {"max_new_tokens": 40, "temperature": 0.7, "top_k": 50, "top_p": 0.8}
    assert manifest.generation.as_options() == expected == Manifest.read(tmp_path / "pkg").generation.as_options()
    options = Model(tmp_path / "pkg").options()
    assert (options.temperature, options.top_k, options.top_p, options.max_new_tokens) == (0.7, 50, 0.8, 40)


def test_the_shipped_tiny_model_samples_by_default():
    """Greedy decoding of the small shipped model loops on a few tokens; its package samples."""
    config = json.loads((trained_checkpoint() / "generation_config.json").read_text())
    assert {k: config[k] for k in ("do_sample", "temperature", "top_k", "repetition_penalty")} == \
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.3}
