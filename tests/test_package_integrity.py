"""A package is loaded only as exported: its manifest strictly typed and sealed, every path inside it,
every byte as hashed, and its graph and tokenizer matching the manifest. Each bad package gets its
own error, on one line, and the package is left exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from neoedge import Model
from neoedge import package as package_module
from neoedge.errors import (FormatVersionError, GraphMismatchError, IntegrityError, ManifestError, PackageError,
                            PackagePathError, TokenizerMismatchError)
from neoedge.manifest import FORMAT_VERSION, Manifest, seal
from neoedge.package import open_package


@pytest.fixture
def refused(snapshot):
    """refused(directory, error, match): loading fails with that error, on one line, and every byte
    of the directory (and of anything beside it) is as it was."""
    def check(directory: Path, error: type[Exception], match: str, load=Model) -> Exception:
        watched = Path(directory).parent
        before = snapshot(watched)
        with pytest.raises(error, match=match) as info:
            load(directory)
        assert snapshot(watched) == before
        assert "\n" not in str(info.value)
        return info.value
    return check


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- the manifest: format, types, values (each edit is sealed, so only it is wrong) -----------------
def _set(section, key, value):
    def edit(data):
        (data[section] if section else data)[key] = value
    return edit


def _drop(section, key):
    def edit(data):
        del (data[section] if section else data)[key]
    return edit


MANIFEST_CASES = [
    ("version-float", _set(None, "format_version", float(FORMAT_VERSION)), FormatVersionError,
     "unsupported package format_version 2.0"),
    ("version-bool", _set(None, "format_version", True), FormatVersionError, "format_version True"),
    ("version-old", _set(None, "format_version", 1), FormatVersionError, "format_version 1 .*re-export"),
    ("version-future", _set(None, "format_version", 99), FormatVersionError, "format_version 99"),
    ("format-name", _set(None, "format", "onnx"), ManifestError, "not a neoedge model package manifest"),
    ("heads-zero", _set("model", "num_heads", 0), ManifestError, "model.num_heads must be between 1 and"),
    ("heads-bool", _set("model", "num_heads", True), ManifestError, "model.num_heads must be an int, got True"),
    ("vocab-string", _set("model", "vocab_size", "512"), ManifestError, "model.vocab_size must be an int"),
    ("context-float", _set("model", "context_length", 256.0), ManifestError, "model.context_length must be an int"),
    ("context-huge", _set("model", "context_length", 2**40), ManifestError, "model.context_length must be between"),
    ("heads-not-divisor", _set("model", "num_heads", 3), ManifestError, "not a multiple of model.num_heads"),
    ("layers-list-short", _set("model", "attention_layers", ["global"] * 3), ManifestError,
     "lists 3 layers, model.num_layers is 4"),
    ("layer-kind", _set("model", "attention_layers", ["global", "sliding", "global", "local"]), ManifestError,
     r"attention_layers\[1\] must be one of 'global', 'local'"),
    ("bos-range", _set("model", "bos_token_id", 512), ManifestError, "model.bos_token_id must be between 0 and 511"),
    ("eos-negative", _set("model", "eos_token_id", -1), ManifestError, "model.eos_token_id must be between"),
    ("architecture", _set("model", "architecture", "GPT2LMHeadModel"), ManifestError,
     "model.architecture must be one of 'GPTNeoForCausalLM'"),
    ("model-unknown-key", _set("model", "n_embd", 64), ManifestError, "unknown key.s. in model: 'n_embd'"),
    ("model-missing-key", _drop("model", "hidden_size"), ManifestError, "model is missing 'hidden_size'"),
    ("top-unknown-key", _set(None, "signature", "x"), ManifestError, "unknown key.s.: 'signature'"),
    ("top-missing-files", _drop(None, "files"), ManifestError, "missing 'files'"),
    ("attention-impl", _set("graph", "attention", "flash"), ManifestError, "graph.attention must be one of"),
    ("int8-cache-plain", lambda d: d["graph"].update(attention="plain", kv_cache="int8"), ManifestError,
     "kv_cache 'int8' needs graph.attention 'gqa'"),
    ("template-no-layer", _set("graph", "past_key", "past_key"), ManifestError, "graph.past_key must hold '.layer.'"),
    ("template-positional", _set("graph", "past_key", "past_key.{0}"), ManifestError, "graph.past_key must hold"),
    ("name-template", _set("graph", "logits", "logits.{layer}"), ManifestError, "graph.logits must be a plain name"),
    ("names-clash", _set("graph", "position_ids", "input_ids"), ManifestError, "names are not distinct"),
    ("generation-unknown", _set("generation", "temprature", 0.5), ManifestError,
     "unknown key.s. in generation: 'temprature'"),
    ("generation-value", _set("generation", "temperature", -1.0), ManifestError,
     "generation: temperature must be >= 0"),
    ("generation-bool", _set("generation", "top_k", False), ManifestError, "generation.top_k must be an int"),
    ("generation-tiny-temperature", _set("generation", "temperature", 1e-45), ManifestError,
     "generation: temperature must be 0 .greedy. or >= 0.001"),
    ("sha-not-hex", lambda d: d["files"]["model.onnx"].update(sha256="z" * 64), ManifestError,
     r"files\['model.onnx'\]: sha256 must be 64 lowercase hex digits"),
    ("bytes-negative", lambda d: d["files"]["model.onnx"].update(bytes=-1), ManifestError,
     r"files\['model.onnx'\]: bytes must be >= 0"),
    ("bytes-float", lambda d: d["files"]["model.onnx"].update(bytes=1.0e3), ManifestError, "bytes must be an int"),
    ("file-unknown-key", lambda d: d["files"]["model.onnx"].update(md5="x"), ManifestError,
     r"unknown key.s. in files\['model.onnx'\]: 'md5'"),
    ("quantization-scheme", _set("quantization", "scheme", "int2"), ManifestError, "quantization.scheme must be one of"),
    ("validation-not-object", _set(None, "validation", [1, 2]), ManifestError, "validation must be an object"),
    ("manifest-lists-itself", lambda d: d["files"].update({"neoedge.json": d["files"]["model.onnx"]}), ManifestError,
     "files must not list neoedge.json"),
]


@pytest.mark.parametrize("edit,error,match", [case[1:] for case in MANIFEST_CASES],
                         ids=[case[0] for case in MANIFEST_CASES])
def test_bad_manifest_values(package_copy, edit_manifest, refused, edit, error, match):
    edit_manifest(package_copy, edit)
    refused(package_copy, error, match)


def _raw_manifest(directory: Path, rewrite) -> None:
    path = directory / "neoedge.json"
    path.write_bytes(rewrite(path.read_bytes()))


RAW_MANIFEST_CASES = [
    ("one-byte-changed", lambda raw: raw.replace(b'"max_new_tokens": 128', b'"max_new_tokens": 129'),
     IntegrityError, "neoedge.json is corrupt: its bytes do not match its manifest_sha256 seal"),
    ("reformatted", lambda raw: json.dumps(json.loads(raw)).encode(), IntegrityError,
     "neoedge.json is corrupt: its bytes do not match"),
    ("seal-removed", lambda raw: json.dumps({k: v for k, v in json.loads(raw).items()
                                             if k != "manifest_sha256"}).encode(), IntegrityError, "is not sealed"),
    ("not-json", lambda raw: raw[: len(raw) // 2], IntegrityError, "corrupt manifest"),
    ("not-utf8", lambda raw: raw.replace(b'"created_by": "neoedge ', b'"created_by": "neoedge \xff'), IntegrityError, "corrupt manifest"),
    ("duplicate-key", lambda raw: seal_raw(raw.replace(b'"tokenizer": "tokenizer.json"',
                                                       b'"tokenizer": "tokenizer.json", "tokenizer": "x.json"')),
     IntegrityError, "duplicate key 'tokenizer'"),
    ("nan", lambda raw: raw.replace(b'"top1_agreement": 1.0', b'"top1_agreement": NaN'), IntegrityError,
     "NaN is not JSON"),
    ("top-level-array", lambda raw: b"[1, 2]", ManifestError, "expected a JSON object"),
    ("huge", lambda raw: raw + b" " * (1 << 20), IntegrityError, "larger than"),
]


def seal_raw(raw: bytes) -> bytes:
    """Re-seal raw manifest bytes that json.loads would not round-trip (a duplicate key)."""
    import hashlib
    import re

    zeroed = re.sub(rb'("manifest_sha256": ")[0-9a-f]{64}', rb"\g<1>" + b"0" * 64, raw)
    digest = hashlib.sha256(zeroed).hexdigest().encode()
    return zeroed.replace(b'"manifest_sha256": "' + b"0" * 64, b'"manifest_sha256": "' + digest)


@pytest.mark.parametrize("rewrite,error,match", [case[1:] for case in RAW_MANIFEST_CASES],
                         ids=[case[0] for case in RAW_MANIFEST_CASES])
def test_altered_or_broken_manifest(package_copy, refused, rewrite, error, match):
    _raw_manifest(package_copy, rewrite)
    refused(package_copy, error, match)


def test_missing_manifest(package_copy, refused):
    (package_copy / "neoedge.json").unlink()
    refused(package_copy, IntegrityError, "neoedge.json is missing")


def test_missing_package(tmp_path, refused):
    (tmp_path / "here").mkdir()
    refused(tmp_path / "here" / "nope", IntegrityError, "model package not found")


# -- integrity on the default load path ------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.onnx.data", "model.onnx", "tokenizer.json"])
def test_one_changed_byte_is_refused_by_default(package_copy, refused, name):
    """The default load, no verify option: one byte changed in place, same size."""
    path = package_copy / name
    _flip(path, path.stat().st_size // 2)
    refused(package_copy, IntegrityError, f"model package file {name} is corrupt: sha256 does not match")


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer.json"])
def test_missing_file(package_copy, refused, name):
    (package_copy / name).unlink()
    refused(package_copy, IntegrityError, f"incomplete: {name} is missing")


@pytest.mark.parametrize("name", ["model.onnx", "model.onnx.data", "tokenizer.json"])
def test_truncated_file(package_copy, refused, name):
    path = package_copy / name
    path.write_bytes(path.read_bytes()[:-1])
    refused(package_copy, IntegrityError, f"{name} is corrupt: .* bytes, manifest says")


def test_listed_file_that_does_not_exist(package_copy, edit_manifest, refused):
    edit_manifest(package_copy, lambda d: d["files"].update({"LICENSE": d["files"]["model.onnx"]}))
    refused(package_copy, IntegrityError, "incomplete: LICENSE is missing")


def test_extra_listed_file_is_hashed_too(package_copy, relist, refused):
    (package_copy / "LICENSE").write_text("Apache-2.0\n")
    relist(package_copy, "LICENSE")
    Model(package_copy)
    (package_copy / "LICENSE").write_text("Apache-2.1\n")
    refused(package_copy, IntegrityError, "LICENSE is corrupt: sha256 does not match")


def test_unlisted_extra_file_is_ignored(package_copy, snapshot):
    """A file nothing reads (a .DS_Store, a README) is not part of the package and does not matter."""
    (package_copy / "README.txt").write_text("notes")
    before = snapshot(package_copy)
    Model(package_copy).generate("x", max_new_tokens=2)
    assert snapshot(package_copy) == before


@pytest.mark.parametrize("name", ["model.onnx.data", "tokenizer.json"])
def test_fifo_instead_of_a_file_does_not_hang(package_copy, refused, name):
    (package_copy / name).unlink()
    os.mkfifo(package_copy / name)
    refused(package_copy, IntegrityError, f"{name} is not a regular file")


def test_directory_instead_of_a_file(package_copy, refused):
    (package_copy / "tokenizer.json").unlink()
    (package_copy / "tokenizer.json").mkdir()
    refused(package_copy, IntegrityError, "tokenizer.json is not a regular file")


def test_integrity_error_wins_over_a_load_error(package_copy, refused):
    """A corrupt tokenizer.json would also fail to parse; the cause is reported, not the symptom."""
    path = package_copy / "tokenizer.json"
    path.write_bytes(b"[" + path.read_bytes()[1:])  # same size, no longer JSON
    refused(package_copy, IntegrityError, "tokenizer.json is corrupt: sha256 does not match")


# -- verified stamps -------------------------------------------------------------------------------
@pytest.fixture
def stamps(tmp_path_factory, monkeypatch):
    """A private stamp cache, and files stamped even when just written (the racy-file margin off)."""
    directory = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NEOEDGE_CACHE_DIR", str(directory))
    monkeypatch.setattr(package_module, "RACY_SECONDS", -60.0)
    return directory / "verified"


def test_stamp_skips_rehashing_an_unchanged_file(package_copy, stamps, caplog):
    Model(package_copy)
    assert len(list(stamps.glob("*.json"))) == 2  # model.onnx.data and tokenizer.json
    caplog.set_level("DEBUG", logger="neoedge.package")
    Model(package_copy)
    assert sum("unchanged since verified" in r.message for r in caplog.records) == 2


def test_a_changed_file_is_rehashed_despite_its_stamp(package_copy, stamps, refused):
    Model(package_copy)
    time.sleep(0.05)  # the file's ctime must tick
    _flip(package_copy / "model.onnx.data", 100)
    refused(package_copy, IntegrityError, "model.onnx.data is corrupt: sha256 does not match")


def test_verify_full_ignores_stamps(package_copy, stamps, refused):
    """A stamp vouches for a file's identity (device, inode, size, mtime, ctime) only: one that
    matches an altered file (here forged) fools 'auto', never 'full'."""
    Model(package_copy)
    path = package_copy / "model.onnx.data"
    _flip(path, 100)
    stamp = package_module.Stamps(stamps)
    entry = Manifest.read(package_copy).files["model.onnx.data"]
    stamp.record(path.resolve(), os.stat(path), entry.sha256)
    Model(package_copy)
    refused(package_copy, IntegrityError, "model.onnx.data is corrupt", load=lambda d: Model(d, verify="full"))


def test_a_just_written_file_is_not_stamped(package_copy, tmp_path, monkeypatch):
    """Timestamps tick coarsely: a file written less than RACY_SECONDS ago is hashed every time."""
    monkeypatch.setenv("NEOEDGE_CACHE_DIR", str(tmp_path / "cache"))
    Model(package_copy)
    assert not list((tmp_path / "cache").rglob("*.json"))


@pytest.mark.parametrize("setting", ["", "file"])
def test_no_or_unwritable_stamp_cache_still_loads(package_copy, tmp_path, monkeypatch, setting):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setenv("NEOEDGE_CACHE_DIR", str(blocker) if setting else "")
    monkeypatch.setattr(package_module, "RACY_SECONDS", -60.0)
    assert Model(package_copy).generate("x", max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2
    assert blocker.read_text() == "x"


# -- a closed package: every path inside it ---------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("graph.file", "../model.onnx"), ("graph.file", "/etc/passwd"), ("tokenizer", "../tokenizer.json"),
    ("tokenizer", "./tokenizer.json"), ("graph.file", "sub//model.onnx"), ("graph.file", "C:model.onnx"),
    ("graph.file", "sub\\model.onnx"), ("tokenizer", ".hidden.json"), ("graph.file", ""),
])
def test_path_outside_or_malformed(package_copy, edit_manifest, refused, key, value):
    def edit(data):
        section, _, field = key.rpartition(".")
        target = data[section] if section else data
        data["files"][value] = data["files"].pop(target[field])
        target[field] = value
    edit_manifest(package_copy, edit)
    refused(package_copy, PackagePathError, "is not a path inside the package")


def test_files_entry_outside_does_not_leak_its_size(package_copy, edit_manifest, refused):
    outside = package_copy.parent / "secret.bin"
    outside.write_bytes(b"s" * 12345)
    edit_manifest(package_copy, lambda d: d["files"].update({"../secret.bin": {"sha256": "0" * 64, "bytes": 1}}))
    error = refused(package_copy, PackagePathError, "is not a path inside the package")
    assert "12345" not in str(error)


def test_symlink_that_escapes_is_refused_without_leaking(package_copy, refused):
    outside = package_copy.parent / "elsewhere.json"
    shutil.copy(package_copy / "tokenizer.json", outside)  # even the very same bytes
    (package_copy / "tokenizer.json").unlink()
    (package_copy / "tokenizer.json").symlink_to(outside)
    error = refused(package_copy, PackagePathError, "files entry tokenizer.json leads outside the package")
    assert str(outside.stat().st_size) not in str(error)


def test_symlinked_directory_that_escapes(package_copy, relist, refused, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("outside")
    (package_copy / "docs").symlink_to(elsewhere)
    relist(package_copy, "docs/notes.txt")
    refused(package_copy, PackagePathError, "files entry docs/notes.txt leads outside the package")


def test_symlink_loop(package_copy, refused):
    (package_copy / "tokenizer.json").unlink()
    (package_copy / "tokenizer.json").symlink_to("loop.json")
    (package_copy / "loop.json").symlink_to("tokenizer.json")
    refused(package_copy, PackagePathError, "files entry tokenizer.json is a symlink loop")


def test_a_manifest_that_json_cannot_hold_is_not_written(package, tmp_path):
    """NaN cannot be stored in JSON: a report holding one is refused when it is made, so no
    manifest holding one is ever written."""
    from dataclasses import replace

    report = Manifest.read(package).validation
    with pytest.raises(ManifestError, match="validation.max_abs_logit_diff_prefill must be a float, got nan"):
        replace(report, max_abs_logit_diff_prefill=float("nan"))
    assert list(tmp_path.iterdir()) == []


def test_manifest_symlink_that_escapes(package_copy, refused):
    outside = package_copy.parent / "manifest.json"
    shutil.move(package_copy / "neoedge.json", outside)
    (package_copy / "neoedge.json").symlink_to(outside)
    refused(package_copy, PackagePathError, "the manifest neoedge.json leads outside the package")


def test_symlinks_inside_the_package_are_fine(package_copy, tmp_path):
    shutil.move(package_copy / "tokenizer.json", package_copy / "tok.json")
    (package_copy / "tokenizer.json").symlink_to("tok.json")
    (tmp_path / "link").symlink_to(package_copy)
    assert Model(tmp_path / "link").generate("x", max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2


# -- the graph's external data: listed, inside, within bounds ---------------------------------------
def _rewrite_locations(directory: Path, relist, rewrite) -> None:
    """Rewrite the graph's external data entries with `rewrite(entries)` (the onnx package is used
    only to build the bad package; the runtime reads it without onnx)."""
    import onnx

    path = directory / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    rewrite([t for t in model.graph.initializer if t.external_data])
    onnx.save_model(model, str(path))
    relist(directory, "model.onnx")


def _location(value: str, which: int = 0):
    def rewrite(tensors):
        for entry in tensors[which].external_data:
            if entry.key == "location":
                entry.value = value
    return rewrite


def _offset(tensors):
    for entry in tensors[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**9)


@pytest.mark.parametrize("rewrite,error,match", [
    (_location("../model.onnx.data"), PackagePathError, "external data location .* is not a path inside"),
    (_location("/etc/passwd"), PackagePathError, "external data location .* is not a path inside"),
    (_location("*/_ORT_MEM_ADDR_/*"), PackagePathError, "external data location .* is not a path inside"),
    (_location("other.data", which=-1), PackagePathError, "from other.data, which the manifest does not list"),
    (_location("model.onnx"), PackagePathError, "names itself as the external data"),
    (_offset, GraphMismatchError, "of model.onnx.data, which has"),
], ids=["parent", "absolute", "ort-memory-address", "unlisted", "itself", "offset-past-end"])
def test_external_data_outside_the_package(package_copy, relist, refused, rewrite, error, match):
    _rewrite_locations(package_copy, relist, rewrite)
    refused(package_copy, error, match)


def test_weights_dropped_from_files_are_refused(package_copy, edit_manifest, refused):
    """Before: a weights file missing from `files` was never hashed and passed even --verify."""
    edit_manifest(package_copy, lambda d: d["files"].pop("model.onnx.data"))
    refused(package_copy, PackagePathError, "reads its tensor .* from model.onnx.data, which the manifest does not list")


@pytest.mark.parametrize("key", ["model.onnx", "tokenizer.json"])
def test_graph_or_tokenizer_dropped_from_files(package_copy, edit_manifest, refused, key):
    edit_manifest(package_copy, lambda d: d["files"].pop(key))
    refused(package_copy, PackagePathError, f"{key} is not listed in files")


def test_graph_file_reader_agrees_with_onnx(package, packages):
    """The runtime's own protobuf reader finds exactly what the onnx package finds."""
    import onnx

    from neoedge.graph_file import read_graph_file

    for directory in [package, packages[("window4", "plain")]]:
        model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
        parsed = read_graph_file((directory / "model.onnx").read_bytes(), "model.onnx")
        expected = [(t.name, {e.key: e.value for e in t.external_data}) for t in model.graph.initializer
                    if t.external_data]
        assert [(e.tensor, e.location, e.offset, e.length) for e in parsed.external_data] == [
            (name, entry["location"], int(entry.get("offset", 0)), int(entry["length"])) for name, entry in expected]
        assert parsed.initializers == {t.name: tuple(t.dims) for t in model.graph.initializer}
        assert [(n.op_type, n.inputs) for n in parsed.nodes] == [(n.op_type, tuple(n.input)) for n in model.graph.node]
        assert [n.ints for n in parsed.nodes] == [
            {a.name: a.i for a in n.attribute if a.type == onnx.AttributeProto.INT} for n in model.graph.node]


def test_truncated_graph_file(package_copy, relist, refused):
    path = package_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:-7])
    relist(package_copy, "model.onnx")
    refused(package_copy, GraphMismatchError, "model.onnx is not a valid ONNX model file")


# -- the graph against the manifest ----------------------------------------------------------------
GRAPH_CASES = [
    ("heads", lambda d: d["model"].update(num_heads=2), "past_key.0 has 4 heads, the manifest says 2"),
    ("head-size", lambda d: d["model"].update(hidden_size=128), "has 16 channels per head, the manifest says 32"),
    ("vocab", lambda d: d["model"].update(vocab_size=1024), "logits has 512 vocabulary entries, the manifest says 1024"),
    ("fewer-layers", lambda d: d["model"].update(num_layers=3, attention_layers=["global", "local", "global"]),
     "needs input.s. its manifest does not name .past_key.3"),
    ("more-layers", lambda d: d["model"].update(num_layers=5, attention_layers=["global", "local"] * 2 + ["local"]),
     "missing past_key.4"),
    ("window", lambda d: d["model"].update(window_size=9),
     "layer 1 of the graph has a local window of 8, the manifest says a local window of 9"),
    ("layer-kinds", lambda d: d["model"].update(attention_layers=["local", "global", "local", "global"]),
     "layer 0 of the graph has global attention, the manifest says a local window of 8"),
    ("context", lambda d: d["model"].update(context_length=512),
     "position table has 256 positions, the manifest says context_length 512"),
    ("kv-cache-type", lambda d: d["graph"].update(kv_cache="int8"),
     "past_key.0 holds tensor.float., the manifest needs tensor.int8."),
    ("attention-impl", lambda d: d["graph"].update(attention="plain"),
     "needs input.s. its manifest does not name"),
    ("renamed-input", lambda d: d["graph"].update(seqlens_k="renamed"), "does not match its manifest .missing renamed"),
    ("renamed-output", lambda d: d["graph"].update(logits="scores"), "missing scores"),
]


@pytest.mark.parametrize("edit,match", [case[1:] for case in GRAPH_CASES], ids=[case[0] for case in GRAPH_CASES])
def test_graph_that_does_not_match_its_manifest(package_copy, edit_manifest, refused, edit, match):
    edit_manifest(package_copy, edit)
    refused(package_copy, GraphMismatchError, match)


# -- the tokenizer against the manifest ------------------------------------------------------------
def test_tokenizer_with_more_tokens_than_the_model(package_copy, relist, refused):
    """Before: its ids past the vocabulary gave silently empty output."""
    from tokenizers import Tokenizer

    path = package_copy / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.add_tokens([f"extra{i}" for i in range(8)])
    tokenizer.save(str(path))
    relist(package_copy, "tokenizer.json")
    refused(package_copy, TokenizerMismatchError, "tokenizer.json has 520 tokens but the model's vocabulary is 512")


def test_unreadable_tokenizer(package_copy, relist, refused):
    (package_copy / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    relist(package_copy, "tokenizer.json")
    refused(package_copy, PackageError, "cannot read tokenizer")


# -- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["info"], ["generate", "hi"], ["eval", "--text", "TEXT"]])
def test_cli_names_the_altered_file_on_one_line(package_copy, snapshot, tmp_path, command):
    from click.testing import CliRunner

    from neoedge.cli import main

    text = tmp_path / "text.txt"
    text.write_text("some text " * 50)
    _flip(package_copy / "model.onnx.data", 1000)
    before = snapshot(package_copy)
    args = [command[0], str(package_copy)] + [str(text) if a == "TEXT" else a for a in command[1:]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: model package file model.onnx.data is corrupt: sha256 does not match"
    assert result.stdout == ""
    assert snapshot(package_copy) == before


def test_info_verify_hashes_everything(package_copy, stamps):
    from click.testing import CliRunner

    from neoedge.cli import main

    result = CliRunner().invoke(main, ["info", str(package_copy), "--verify"])
    assert result.exit_code == 0, result.output
    assert "all sha256 match (every file hashed now)" in result.stdout
    assert open_package(package_copy).manifest == Manifest.read(package_copy)


def test_seal_round_trip(package):
    """What export writes, the runtime reads back identically; sealing is deterministic."""
    manifest = Manifest.read(package)
    raw = (package / "neoedge.json").read_bytes()
    assert manifest.to_json() == raw == seal(json.loads(raw))
    assert Manifest.from_json(raw) == manifest


def test_interrupting_a_load_stops_the_hashing(package_copy):
    """Ctrl-C during a load propagates as itself (no integrity error in its place), and a cancelled
    hash never counts as verified."""
    import threading

    from neoedge.package import _Hasher, opening_package

    with pytest.raises(KeyboardInterrupt):
        with opening_package(package_copy):
            raise KeyboardInterrupt
    entry = Manifest.read(package_copy).files["model.onnx.data"]
    hasher = _Hasher(package_copy, [("model.onnx.data", package_copy / "model.onnx.data", entry)], stamps=None,
                     use_stamps=False)
    hasher.cancel()
    hasher.start()
    assert isinstance(hasher.result(), IntegrityError)
    assert not [t for t in threading.enumerate() if t is hasher]


def _move_vocab_id(tokenizer_json: Path, old_id: int, new_id: int) -> str:
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    token = next(k for k, v in vocab.items() if v == old_id)
    vocab[token] = new_id
    tokenizer_json.write_text(json.dumps(data))
    return token


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_a_tokenizer_id_past_the_vocabulary_is_refused_at_load(kind, package, checkpoints, tmp_path, relist):
    """Ids need not be dense: one far past the embedding (not just at its end) is refused, before a
    quantized embedding, which does not check its indices, could read past its table."""
    from neoedge.export import export_package

    if kind == "fp32":
        copy = Path(shutil.copytree(package, tmp_path / "p"))
    else:
        copy = tmp_path / "p"
        export_package(str(checkpoints["window8"]), copy, quantize="int8", algorithm="rtn", kv_cache="float32",
                       progress=False, validate=False)
    _move_vocab_id(copy / "tokenizer.json", 300, 9000)
    relist(copy, "tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match="token id 9000 but the model's vocabulary is"):
        Model(copy)


@pytest.mark.parametrize("claim", ["fp32", "other bits"])
def test_a_manifest_that_misstates_the_weights_quantization_is_refused(claim, checkpoints, tmp_path, edit_manifest):
    """Re-sealed to say fp32 over an int8 graph (or int4 over int8), a package would be described and
    validated as what it is not."""
    from neoedge.errors import GraphMismatchError
    from neoedge.export import export_package

    copy = tmp_path / "q"
    export_package(str(checkpoints["window8"]), copy, quantize="int8", algorithm="rtn", kv_cache="float32",
                   progress=False, validate=False)
    if claim == "fp32":
        edit_manifest(copy, lambda d: d.update(quantization={"scheme": "none"}))
        match = "the graph holds quantized weights .*the manifest says fp32"
    else:
        def four_bits(d):
            d["quantization"]["scheme"] = "int4"
            d["quantization"]["settings"].update(bits=4, lm_head_bits=4)
        edit_manifest(copy, four_bits)
        match = "the graph holds 8-bit weights, the manifest says 4"
    with pytest.raises(GraphMismatchError, match=match):
        Model(copy)


def test_a_byte_level_tokenizer_without_every_byte_is_refused(package, tmp_path, relist):
    """Without a token for some byte, text holding it was dropped from prompts without a word."""
    from neoedge.errors import TokenizerMismatchError

    copy = Path(shutil.copytree(package, tmp_path / "p"))
    data = json.loads((copy / "tokenizer.json").read_text())
    del data["model"]["vocab"]["\u0100"]  # byte 0x00 in GPT-2's byte-to-character table
    (copy / "tokenizer.json").write_text(json.dumps(data))
    relist(copy, "tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match="without tokens for 1 of the 256 bytes .e.g. 0x00."):
        Model(copy)


def test_a_package_at_a_path_that_is_not_utf8_is_refused_clearly(package, tmp_path):
    from neoedge.errors import PackagePathError

    copy = Path(shutil.copytree(package, os.fsdecode(os.fsencode(str(tmp_path)) + b"/pk\xffg")))
    with pytest.raises(PackagePathError, match="not valid UTF-8"):
        Model(copy)
