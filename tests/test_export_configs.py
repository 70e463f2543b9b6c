"""Every GPT-Neo config transformers loads either exports exactly or is refused (the refusals are in
test_bad_export_input.py): head sizes GroupQueryAttention cannot take (plain attention instead, with a
notice), every parameter-free activation, an untied lm_head, odd shapes and windows, tiny vocabularies,
other bos/eos ids. Exact means: the package's logits equal transformers' GPTNeoForCausalLM to 1e-4,
for the prefill at every position and step-wise through the KV cache from several prefill lengths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from neoedge import Generator, Manifest
from neoedge.export import export_package
from neoedge.export.activations import ACTIVATIONS
from neoedge.export.tiny import save_checkpoint, tiny_config

TOLERANCE = 1e-4


def _checkpoint(root, tokenizer, name, seed=0, **overrides):
    import torch
    from transformers import GPTNeoForCausalLM

    settings = dict(num_layers=2, hidden_size=16, num_heads=2, window_size=4, max_position_embeddings=48,
                    attention_types=[[["global", "local"], 1]])
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(tiny_config(settings.pop("vocab_size", tokenizer.get_vocab_size()), **settings)).eval()
    return save_checkpoint(model, tokenizer, root / name), model


def _max_error(package, model, seed=1) -> float:
    """Largest |Δlogit| against transformers: prefill at every position of a sequence filling the
    context, and step-wise decoding from prefills of 1, window - 1, window + 1 and half the context."""
    import torch

    generator = Generator(package)
    info = generator.manifest.model
    ids = np.random.default_rng(seed).integers(0, info.vocab_size, size=info.context_length)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids[None])).logits[0].numpy()
    worst = float(np.abs(generator.logits(ids) - reference).max())
    for start in sorted({min(max(1, start), len(ids)) for start in
                         (1, info.window_size - 1, info.window_size + 1, len(ids) // 2)}):
        worst = max(worst, float(np.abs(generator.stepwise_logits(ids, prefill=start) - reference).max()))
    return worst


def _export(source, out, **options) -> Manifest:
    manifest = export_package(str(source), out, progress=False, **options)
    assert manifest.validation.passed
    return manifest


@pytest.mark.parametrize("head_size", [4, 12])
def test_head_sizes_gqa_cannot_take_export_exactly_through_plain_attention(head_size, bpe_tokenizer,
                                                                         tmp_path, caplog):
    # 4 heads: a width the int8 quantizer's smallest block (16) divides.
    source, model = _checkpoint(tmp_path, bpe_tokenizer, "src", num_layers=3, num_heads=4,
                                hidden_size=4 * head_size, attention_types=[[["local", "global"], 1], [["local"], 1]])
    manifest = _export(source, tmp_path / "pkg")
    assert manifest.graph.attention == "plain" and manifest.graph.kv_cache == "float32"
    assert any(f"this model's is {head_size}" in note for note in manifest.notes)
    assert f"this model's is {head_size}" in caplog.text  # the notice is logged as well
    assert Manifest.read(tmp_path / "pkg").notes == manifest.notes
    assert _max_error(tmp_path / "pkg", model) <= TOLERANCE
    # Quantized too: the KV cache stays float32 (int8 needs gqa), and it says so.
    quantized = _export(source, tmp_path / "int8", quantize="int8")
    assert quantized.graph.attention == "plain" and quantized.graph.kv_cache == "float32"
    assert any("KV cache is float32" in note for note in quantized.notes)


@pytest.mark.parametrize("head_size", [8, 24])
def test_head_sizes_that_are_multiples_of_8_get_gqa(head_size, bpe_tokenizer, tmp_path):
    source, model = _checkpoint(tmp_path, bpe_tokenizer, "src", hidden_size=2 * head_size)
    manifest = _export(source, tmp_path / "pkg")
    assert manifest.graph.attention == "gqa" and manifest.notes == ()
    assert _max_error(tmp_path / "pkg", model) <= TOLERANCE


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_parameter_free_activation_exports_exactly(activation, bpe_tokenizer, tmp_path):
    # Larger weights than GPT-Neo's init, so that the MLP's inputs reach well into both signs and
    # past gelu_10's clip and relu6's cap.
    source, model = _checkpoint(tmp_path, bpe_tokenizer, "src", activation_function=activation,
                                initializer_range=0.25, intermediate_size=32)
    assert float(model.transformer.h[0].mlp.c_fc.weight.detach().abs().max()) > 0.5
    manifest = _export(source, tmp_path / "pkg")
    assert manifest.validation.max_abs_logit_diff <= TOLERANCE
    assert _max_error(tmp_path / "pkg", model) <= TOLERANCE


def test_untied_lm_head_is_stored_separately_and_exports_exactly(bpe_tokenizer, tmp_path):
    source, model = _checkpoint(tmp_path, bpe_tokenizer, "src", tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    _export(source, tmp_path / "fp32")
    graph = onnx.load(str(tmp_path / "fp32" / "model.onnx"), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    assert {"lm_head.weight", "transformer.wte.weight"} <= names
    assert _max_error(tmp_path / "fp32", model) <= TOLERANCE
    for scheme in ("int8", "int4"):
        manifest = _export(source, tmp_path / scheme, quantize=scheme)
        assert manifest.quantization.settings.embedding == "untied: lm_head stored separately"
        graph = onnx.load(str(tmp_path / scheme / "model.onnx"), load_external_data=False).graph
        assert "lm_head.qweight" in {t.name for t in graph.initializer}


CONFIGS = {
    "intermediate_size 40": dict(intermediate_size=40),
    "one layer": dict(num_layers=1, attention_types=[[["local"], 1]]),
    "five layers": dict(num_layers=5, attention_types=[[["global", "local"], 2], [["global"], 1]]),
    "all local": dict(num_layers=2, attention_types=[[["local"], 2]]),
    "all global": dict(num_layers=2, attention_types=[[["global"], 2]]),
    "window beyond the context": dict(window_size=64, max_position_embeddings=24),
    "window of one": dict(window_size=1),
    "one head": dict(num_heads=1, hidden_size=16),
    "context of two": dict(max_position_embeddings=2),
    "layer_norm_epsilon 1e-3": dict(layer_norm_epsilon=1e-3),
}


@pytest.mark.parametrize("attention", ["auto", "plain"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_exports_exactly(name, attention, bpe_tokenizer, tmp_path):
    source, model = _checkpoint(tmp_path, bpe_tokenizer, "src", **CONFIGS[name])
    manifest = _export(source, tmp_path / "pkg", attention=attention)
    assert manifest.model.attention_layers == tuple(model.config.attention_layers)
    assert _max_error(tmp_path / "pkg", model) <= TOLERANCE


def test_tiny_vocabulary_and_other_bos_eos_ids(tmp_path):
    from neoedge.export.tiny import stdlib_docstrings, train_tokenizer

    tokenizer = train_tokenizer(stdlib_docstrings()[:50], vocab_size=260)  # bytes, <|endoftext|>, 3 merges
    source, model = _checkpoint(tmp_path, tokenizer, "src", bos_token_id=3, eos_token_id=5,
                                vocab_size=tokenizer.get_vocab_size())
    manifest = _export(source, tmp_path / "pkg")
    assert manifest.model.vocab_size == tokenizer.get_vocab_size() <= 260
    assert (manifest.model.bos_token_id, manifest.model.eos_token_id) == (3, 5)
    assert _max_error(tmp_path / "pkg", model) <= TOLERANCE
