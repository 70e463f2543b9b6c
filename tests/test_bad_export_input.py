"""Export's bad input: every case gets its own specific ExportError, and nothing is written, changed
or lost (the tree under the test's directory and the source checkpoint are identical before and
after, byte for byte and mode for mode)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from neoedge.errors import ExportError
from neoedge.export import OutputExistsError, export_package, pipeline
from neoedge.export.lock import output_lock

# -- building bad sources ----------------------------------------------------------------------------


def _copy(checkpoints, tmp_path, name: str = "window8") -> Path:
    return Path(shutil.copytree(checkpoints[name], tmp_path / "src"))


def _edit_config(src: Path, **changes: Any) -> Path:
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    return src


_DELETE = object()


def _config_case(**changes: Any) -> Callable:
    def make(checkpoints, tmp_path):
        return _edit_config(_copy(checkpoints, tmp_path), **changes)
    return make


def _gpt2(checkpoints, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def _without(*names: str) -> Callable:
    def make(checkpoints, tmp_path):
        src = _copy(checkpoints, tmp_path)
        for name in names:
            (src / name).unlink()
        return src
    return make


def _truncated_weights(checkpoints, tmp_path):
    src = _copy(checkpoints, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    return src


def _garbage_weights(checkpoints, tmp_path):
    src = _copy(checkpoints, tmp_path)
    size = (src / "model.safetensors").stat().st_size
    (src / "model.safetensors").write_bytes(b"\x7f" * size)
    return src


def _corrupt_tokenizer(checkpoints, tmp_path):
    src = _copy(checkpoints, tmp_path)
    (src / "tokenizer.json").write_text("{not json")
    return src


def _model(tmp_path, *, bpe_vocab: int | None = None, weights: Callable | None = None, base: bool = False,
           **overrides):
    """A small random GPT-Neo saved with a tokenizer (of `bpe_vocab` tokens, default the config's)."""
    import torch
    from transformers import GPTNeoForCausalLM, GPTNeoModel

    from neoedge.export.tiny import save_checkpoint, stdlib_docstrings, tiny_config, train_tokenizer

    tokenizer = train_tokenizer(stdlib_docstrings()[:200], vocab_size=bpe_vocab or 300)
    settings = dict(num_layers=1, hidden_size=16, num_heads=2, window_size=4,
                    attention_types=[[["global"], 1]], max_position_embeddings=32)
    settings.update(overrides)
    config = tiny_config(settings.pop("vocab_size", tokenizer.get_vocab_size()), **settings)
    torch.manual_seed(0)
    model = (GPTNeoModel if base else GPTNeoForCausalLM)(config).eval()
    if weights is not None:
        with torch.no_grad():
            weights(model)
    return save_checkpoint(model, tokenizer, tmp_path / "src")


def _nan_weights(checkpoints, tmp_path):
    def poison(model):
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    return _model(tmp_path, weights=poison)


def _headless_untied(checkpoints, tmp_path):
    """A base GPTNeoModel checkpoint whose config unties the lm_head: transformers would invent one."""
    return _model(tmp_path, base=True, tie_word_embeddings=False)


def _tokenizer_larger_than_vocab(checkpoints, tmp_path):
    return _model(tmp_path, bpe_vocab=300, vocab_size=200)


def _wrong_shapes(checkpoints, tmp_path):
    return _edit_config(_copy(checkpoints, tmp_path), hidden_size=32)


def _a_file(checkpoints, tmp_path):
    (tmp_path / "src").write_text("not a checkpoint")
    return tmp_path / "src"


def _empty_dir(checkpoints, tmp_path):
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


def _head_size(size: int) -> Callable:
    def make(checkpoints, tmp_path):
        return _model(tmp_path, hidden_size=2 * size, num_heads=2)
    return make


def _shared(name: str = "window8") -> Callable:
    return lambda checkpoints, tmp_path: checkpoints[name]


# -- building bad outputs -----------------------------------------------------------------------------


def _user_folder(out: Path, package: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "figures").mkdir()
    (out / "figures" / "a.png").write_bytes(b"\x89PNG")


def _package_plus(extra: str) -> Callable:
    def make(out: Path, package: Path) -> None:
        shutil.copytree(package, out)
        if extra.endswith("/"):
            (out / extra).mkdir()
        else:
            (out / extra).write_text("mine")
    return make


def _foreign_manifest(out: Path, package: Path) -> None:
    out.mkdir()
    (out / "neoedge.json").write_text(json.dumps({"format": "something-else", "files": {}}))


def _corrupt_manifest(out: Path, package: Path) -> None:
    shutil.copytree(package, out)
    (out / "neoedge.json").write_text("{half a manif")


def _symlinked_file_in_package(out: Path, package: Path) -> None:
    shutil.copytree(package, out)
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(package / "tokenizer.json")


def _symlink_to_package(out: Path, package: Path) -> None:
    out.symlink_to(package, target_is_directory=True)


def _dangling_symlink(out: Path, package: Path) -> None:
    out.symlink_to(out.parent / "nowhere")


def _file(out: Path, package: Path) -> None:
    out.write_text("a file")


def _empty_folder(out: Path, package: Path) -> None:
    out.mkdir()


def _package(out: Path, package: Path) -> None:
    shutil.copytree(package, out)


def _foreign_lock(out: Path, package: Path) -> None:
    (out.parent / f".{out.name}.neoedge-lock").write_text("someone else's file")


@dataclass(frozen=True)
class Case:
    source: Callable = _shared()
    out: Callable | None = None  # makes what is at OUT before the export
    out_path: Callable[[Path], Path] | None = None  # OUT, if not tmp_path/"out"
    options: dict | None = None
    error: type[Exception] = ExportError


CASES: dict[str, tuple[Case, str]] = {
    # sources
    "missing directory": (Case(lambda c, t: t / "nowhere" / "ckpt"), "checkpoint directory not found"),
    "source is a file": (Case(_a_file), "is a file, not a checkpoint directory"),
    "empty directory": (Case(_empty_dir), r"not a Hugging Face checkpoint directory \(no config.json\)"),
    "config is not json": (Case(lambda c, t: _write(_copy(c, t) / "config.json", "{oops").parent),
                           "cannot load the config of"),
    "config without model_type": (Case(_config_case(model_type=_DELETE)), "cannot load the config of"),
    "a GPT-2 checkpoint": (Case(_gpt2), "'gpt2' model; neoedge exports GPT-Neo"),
    "a BERT model_type": (Case(_config_case(model_type="bert")), "cannot load the config of|'bert' model"),
    "no weights file": (Case(_without("model.safetensors")), "cannot load the weights of"),
    "truncated safetensors": (Case(_truncated_weights), "cannot load the weights of"),
    "garbage safetensors": (Case(_garbage_weights), "cannot load the weights of"),
    "weights of another shape": (Case(_wrong_shapes), "cannot load the weights of"),
    "no tokenizer files": (Case(_without("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
                           "cannot load the tokenizer of|no fast tokenizer"),
    "corrupt tokenizer.json": (Case(_corrupt_tokenizer), "cannot load the tokenizer of"),
    "tokenizer larger than the vocabulary": (Case(_tokenizer_larger_than_vocab),
                                             "the tokenizer has 300 tokens but vocab_size is 200"),
    "eos id outside the vocabulary": (Case(_config_case(eos_token_id=50256)),
                                      r"eos_token_id must be one token id in \[0, 512\), got 50256"),
    "bos id a list": (Case(_config_case(bos_token_id=[0, 1])), "bos_token_id must be one token id"),
    "negative eos id": (Case(_config_case(eos_token_id=-1)), "eos_token_id must be one token id"),
    "activation with parameters (prelu)": (Case(_config_case(activation_function="prelu")),
                                           "activation_function 'prelu' is not supported"),
    "activation with parameters (xielu)": (Case(_config_case(activation_function="xielu")),
                                           "activation_function 'xielu' is not supported"),
    "unknown attention type": (Case(_config_case(attention_types=[[["global", "sparse"], 2]],
                                                 attention_layers=["global", "sparse"] * 2)),
                               r"attention_types may name only 'global' and 'local' layers, not \['sparse'\]"),
    "window_size 0": (Case(_config_case(window_size=0)), "window_size must be an integer >= 1, got 0"),
    "context of one position": (Case(_config_case(max_position_embeddings=1)),
                                "max_position_embeddings must be an integer >= 2, got 1"),
    "hidden_size not a multiple of num_heads": (Case(_config_case(num_heads=3)),
                                                "hidden_size 64 is not a multiple of num_heads 3"),
    "layer_norm_epsilon 0": (Case(_config_case(layer_norm_epsilon=0)), "layer_norm_epsilon must be a positive"),
    "NaN in a weight": (Case(_nan_weights), r"weight transformer.h.0.mlp.c_fc.weight holds NaN or infinite"),
    "untied lm_head missing from the checkpoint": (Case(_headless_untied), "lacks weights for lm_head.weight"),
    "empty source": (Case(lambda c, t: ""), "source must be a hub id or a checkpoint directory"),
    # what is at OUT
    "a folder of user files": (Case(out=_user_folder), r"is not a neoedge package \(it has no neoedge.json\)"),
    "a folder of user files, forced": (Case(out=_user_folder, options=dict(force=True)),
                                       r"is not a neoedge package \(it has no neoedge.json\)"),
    "an empty folder, forced": (Case(out=_empty_folder, options=dict(force=True)), "is not a neoedge package"),
    "a file, forced": (Case(out=_file, options=dict(force=True)), "exists and is not a directory"),
    "a symlink to a package, forced": (Case(out=_symlink_to_package, options=dict(force=True)),
                                       "is a symbolic link"),
    "a dangling symlink": (Case(out=_dangling_symlink, options=dict(force=True)), "is a symbolic link"),
    "a package with a user file, forced": (Case(out=_package_plus("notes.txt"), options=dict(force=True)),
                                           "also holds notes.txt, which its manifest does not list"),
    "a package with a subfolder, forced": (Case(out=_package_plus("runs/"), options=dict(force=True)),
                                           "also holds runs, which its manifest does not list"),
    "a package whose file is a symlink, forced": (Case(out=_symlinked_file_in_package, options=dict(force=True)),
                                                  "also holds tokenizer.json"),
    "another tool's neoedge.json, forced": (Case(out=_foreign_manifest, options=dict(force=True)),
                                            "is not a neoedge package manifest"),
    "a corrupt manifest, forced": (Case(out=_corrupt_manifest, options=dict(force=True)),
                                   "neoedge.json cannot be read"),
    "a package, not forced": (Case(out=_package, error=OutputExistsError),
                              "already holds a neoedge package; pass force=True to replace it"),
    "OUT under a file": (Case(out_path=lambda t: _write(t / "file", "x") / "out"), "is not a directory"),
    "OUT is the root directory": (Case(out_path=lambda t: Path("/")), "cannot hold a package"),
    "a foreign file at the lock's path": (Case(out=_foreign_lock), "is not a neoedge export lock"),
    # options
    "unknown quantize": (Case(options=dict(quantize="int3")), "unknown quantize 'int3'; choose one of: none, int8, int4"),
    "unknown attention": (Case(options=dict(attention="flash")), "unknown attention 'flash'"),
    "unknown kv_cache": (Case(options=dict(kv_cache="fp16")), "unknown kv_cache 'fp16'"),
    "int8 KV cache with plain attention": (Case(options=dict(kv_cache="int8", attention="plain")),
                                           "an int8 KV cache needs the gqa attention"),
    "block size not a power of two": (Case(options=dict(quantize="int4", block_size=48)),
                                      "block_size must be a power of two >= 16, got 48"),
    "block size too small": (Case(options=dict(quantize="int8", block_size=8)), "block_size must be a power of two"),
    "block size that does not divide the width": (Case(options=dict(quantize="int4", block_size=128)),
                                                  "cannot quantize a weight with 64 inputs in blocks of 128"),
    "block size as a bool": (Case(options=dict(quantize="int4", block_size=True)), "block_size must be an integer"),
    "block size without quantization": (Case(options=dict(block_size=32)),
                                        "block_size applies to int8/int4 quantization only"),
    "lm_head_bits without quantization": (Case(options=dict(lm_head_bits=8)),
                                          "lm_head_bits applies to int8/int4 quantization only"),
    "symmetric without quantization": (Case(options=dict(symmetric=True)),
                                       "symmetric applies to int8/int4 quantization only"),
    "lm_head_bits 6": (Case(options=dict(quantize="int4", lm_head_bits=6)), "lm_head_bits must be 4 or 8, got 6"),
    "tolerance 0": (Case(options=dict(tolerance=0.0)), "tolerance must be a positive number"),
    "tolerance NaN": (Case(options=dict(tolerance=float("nan"))), "tolerance must be a positive number"),
    "force as a string": (Case(options=dict(force="yes")), "force must be True or False"),
    "gqa asked for head size 12": (Case(_head_size(12), options=dict(attention="gqa")),
                                   "the gqa attention cannot take .*head size that is a multiple of 8, and this "
                                   r"model's is 12 \(hidden_size 24 / num_heads 2\)"),
    "int8 KV cache asked for head size 4": (Case(_head_size(4), options=dict(kv_cache="int8")),
                                            "an int8 KV cache needs the gqa attention, which cannot take"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_export_input(name, checkpoints, package, tmp_path, tree):
    case, message = CASES[name]
    root = tmp_path / "work"
    root.mkdir()
    source = case.source(checkpoints, root)
    out = case.out_path(root) if case.out_path else root / "out"
    if case.out is not None:
        case.out(out, package)
    watched = [root, checkpoints["window8"], package]
    before = tree(*watched)
    with pytest.raises(case.error, match=message):
        export_package(str(source) if source != "" else "", out, progress=False, **(case.options or {}))
    assert tree(*watched) == before


def test_the_cases_are_distinct():
    assert len(CASES) >= 35
    assert len({message for _, message in CASES.values()}) >= 35


def test_an_export_while_another_holds_the_lock(checkpoints, tmp_path, tree):
    out = tmp_path / "out"
    with output_lock(out):
        before = tree(tmp_path)
        with pytest.raises(ExportError, match=f"another export to {out} is running"):
            export_package(str(checkpoints["window8"]), out, progress=False)
        assert tree(tmp_path) == before


def test_failed_validation_writes_nothing_and_keeps_the_old_package(checkpoints, package, tmp_path, monkeypatch, tree):
    """The package is checked against a GPT-Neo of the same shape with other weights: a genuine
    validation failure, not a forged report."""
    from transformers import GPTNeoForCausalLM

    original = pipeline.validate_package

    def against_other_weights(directory, model, **kwargs):
        return original(directory, GPTNeoForCausalLM(model.config).eval(), **kwargs)

    monkeypatch.setattr(pipeline, "validate_package", against_other_weights)
    out = Path(shutil.copytree(package, tmp_path / "out"))
    before = tree(tmp_path, checkpoints["window8"])
    with pytest.raises(ExportError, match=r"validation failed: the logits differ from transformers' by .* "
                                          r"and from the exact float64 logits by .*; .* was left as it was"):
        export_package(str(checkpoints["window8"]), out, force=True, progress=False)
    assert tree(tmp_path, checkpoints["window8"]) == before
    with pytest.raises(ExportError, match="was not written"):
        export_package(str(checkpoints["window8"]), tmp_path / "new", progress=False)
    assert not os.path.lexists(tmp_path / "new")


needs_permissions = pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")


@needs_permissions
def test_an_unreadable_checkpoint(checkpoints, tmp_path, tree):
    src = _copy(checkpoints, tmp_path)
    (src / "model.safetensors").chmod(0)
    before = tree(tmp_path)
    try:
        with pytest.raises(ExportError, match="cannot load the weights of .*Permission denied"):
            export_package(str(src), tmp_path / "out", progress=False)
        assert tree(tmp_path) == before
    finally:
        (src / "model.safetensors").chmod(0o644)


@needs_permissions
def test_an_unwritable_output_directory(checkpoints, tmp_path, tree):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    before = tree(tmp_path)
    try:
        with pytest.raises(ExportError, match="cannot create the export lock .*Permission denied"):
            export_package(str(checkpoints["window8"]), parent / "out", progress=False)
        assert tree(tmp_path) == before
    finally:
        parent.chmod(0o755)


def test_a_tokenizer_id_past_vocab_size_is_refused(checkpoints, tmp_path, tree):
    src = Path(shutil.copytree(checkpoints["window8"], tmp_path / "src"))
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[next(k for k, v in vocab.items() if v == 300)] = 9000
    (src / "tokenizer.json").write_text(json.dumps(data))
    before = tree(tmp_path)
    with pytest.raises(ExportError, match="token id 9000 but vocab_size is"):
        export_package(str(src), tmp_path / "out", progress=False, validate=False)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "directory"])
def test_an_unreadable_generation_config_is_an_error_not_an_absence(checkpoints, tmp_path, damage):
    """transformers raises OSError for a missing file and for a broken one alike: a broken one must
    not quietly drop the checkpoint's sampling settings."""
    src = Path(shutil.copytree(checkpoints["window8"], tmp_path / "src"))
    config = src / "generation_config.json"
    config.unlink(missing_ok=True)
    if damage == "truncated":
        config.write_text('{"do_sample": true, "temperature": 0.7, "top_k": 40,')
    else:
        config.mkdir()
    with pytest.raises(ExportError, match="generation_config.json"):
        export_package(str(src), tmp_path / "out", progress=False, validate=False)


@pytest.mark.parametrize("options, fragment", [
    (dict(quantize="int8", algorithm="rtn", kv_cache="float32"), "judged by the quality bounds"),
    (dict(kv_cache="int8"), "judged by the quality bounds"),
    (dict(validate=False), "validate is off"),
])
def test_a_tolerance_that_would_not_be_used_is_refused(checkpoints, tmp_path, options, fragment):
    with pytest.raises(ExportError, match=fragment):
        export_package(str(checkpoints["window8"]), tmp_path / "out", tolerance=1e-12, progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_a_width_no_block_divides_is_refused_before_calibrating(bpe_tokenizer, tmp_path, tree, monkeypatch):
    """Hidden 24 has no power-of-two divisor from 16: no block size the user could choose would do,
    so the error says the model can only go unquantized, and says it before the calibration pass."""
    import torch
    from transformers import GPTNeoForCausalLM

    from neoedge.export.tiny import save_checkpoint, tiny_config

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(tiny_config(bpe_tokenizer.get_vocab_size(), num_layers=2, hidden_size=24, num_heads=2,
                                          window_size=4, max_position_embeddings=48,
                                          attention_types=[[["global", "local"], 1]])).eval()
    src = save_checkpoint(model, bpe_tokenizer, tmp_path / "src")
    monkeypatch.setattr(pipeline, "read_calibration", lambda *a, **k: pytest.fail("calibration was read"))
    before = tree(tmp_path)
    with pytest.raises(ExportError, match="no MatMulNBits block fits weights with 24 inputs.*only be exported "
                                          "unquantized"):
        export_package(str(src), tmp_path / "out", quantize="int4", progress=False)
    assert tree(tmp_path) == before
