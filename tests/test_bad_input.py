"""Bad input gets a clear, specific error and loses nothing (the runtime and packages; export's bad
input is in test_bad_export_input.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neoedge import GenerationOptions, Generator, PackageError, PromptError


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
