"""Bad input gets a clear, specific error and loses nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neoedge import GenerationOptions, Generator, PackageError, PromptError
from neoedge.errors import ExportError
from neoedge.export import export_package, pipeline


@pytest.fixture
def broken(package, tmp_path) -> Path:
    """A private copy of the package to damage."""
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def _edit_manifest(path: Path, edit) -> None:
    manifest = path / "neoedge.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))


def test_missing_manifest(broken):
    (broken / "neoedge.json").unlink()
    with pytest.raises(PackageError, match="neoedge.json is missing"):
        Generator(broken)


def test_corrupt_manifest(broken):
    (broken / "neoedge.json").write_text("{not json")
    with pytest.raises(PackageError, match="corrupt manifest"):
        Generator(broken)


def test_wrong_format_version(broken):
    _edit_manifest(broken, lambda d: d.update(format_version=99))
    with pytest.raises(PackageError, match="unsupported package format_version 99"):
        Generator(broken)


def test_malformed_manifest(broken):
    _edit_manifest(broken, lambda d: d["model"].pop("hidden_size"))
    with pytest.raises(PackageError, match="malformed manifest"):
        Generator(broken)


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer.json"])
def test_missing_file(broken, name):
    (broken / name).unlink()
    with pytest.raises(PackageError, match=f"incomplete: {name} is missing"):
        Generator(broken)


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data"])
def test_truncated_file(broken, name):
    data = (broken / name).read_bytes()
    (broken / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match=f"{name} is corrupt"):
        Generator(broken)


def test_corrupt_file_same_size(broken):
    path = broken / "model.onnx"
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256 does not match"):
        Generator(broken, verify=True)
    with pytest.raises(PackageError, match="cannot load model graph"):
        Generator(broken)


def test_altered_weights_caught_by_verify(broken):
    """Flipped weight bytes keep the size and still load: only the opt-in hash check can tell."""
    path = broken / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model.onnx.data is corrupt: sha256 does not match"):
        Generator(broken, verify=True)


def test_graph_that_does_not_match_its_manifest(broken):
    _edit_manifest(broken, lambda d: d["graph"].update(seqlens_k="renamed"))
    with pytest.raises(PackageError, match="does not match its manifest .missing renamed"):
        Generator(broken)


def test_over_long_prompt(package):
    generator = Generator(package)
    with pytest.raises(PromptError, match="context is 256"):
        generator.generate("word " * 300)
    with pytest.raises(PromptError):
        list(generator.generate_tokens([1] * 256, GenerationOptions()))


def test_out_of_vocab_prompt_ids(package):
    with pytest.raises(PromptError, match=r"in \[0, 512\)"):
        list(Generator(package).generate_tokens([5, 9999], GenerationOptions()))


@pytest.mark.parametrize("options,message", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(stop=[""]), "stop strings"),
    (dict(stop=[3]), "stop strings"),
    (dict(stop_at_eos="yes"), "stop_at_eos"),
])
def test_invalid_options_raise_value_error(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationOptions(**options)


def test_unknown_option(package):
    with pytest.raises(ValueError, match="unknown generation option"):
        Generator(package).generate("x", temprature=0.5)


def test_invalid_session_settings(package):
    with pytest.raises(ValueError, match="intra_threads"):
        Generator(package, intra_threads=-1)


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
