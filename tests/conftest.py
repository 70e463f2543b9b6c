"""Shared fixtures: tiny random GPT-Neo checkpoints built locally, and packages exported from them.

Windows are small (4 and 8) so that short sequences cross the local-attention window many times.
Everything is built once per test session in a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from neoedge.export import export_package
from neoedge.export.tiny import save_checkpoint, stdlib_docstrings, tiny_config, train_tokenizer

# name -> GPTNeoConfig overrides; "window4" starts with a local layer and has an odd layer count.
CONFIGS = {
    "window8": dict(num_layers=4, attention_types=[[["global", "local"], 2]], window_size=8),
    "window4": dict(num_layers=3, hidden_size=48, num_heads=3, attention_types=[[["local", "global"], 1], [["local"], 1]],
                    window_size=4),
    # GPT-Neo's full 2048-position context, with a small window crossed hundreds of times.
    "context2048": dict(num_layers=2, hidden_size=32, num_heads=2, max_position_embeddings=2048,
                        attention_types=[[["global", "local"], 1]], window_size=16),
}


# Verified stamps (neoedge/package.py) go to a directory of this test run, never the user's cache;
# subprocesses the tests start inherit it.
os.environ["NEOEDGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="neoedge-test-cache-")


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return train_tokenizer(stdlib_docstrings(), vocab_size=512)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, bpe_tokenizer) -> dict[str, Path]:
    import torch
    from transformers import GPTNeoForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        model = GPTNeoForCausalLM(tiny_config(bpe_tokenizer.get_vocab_size(), **overrides)).eval()
        out[name] = save_checkpoint(model, bpe_tokenizer, root / name)
    return out


@pytest.fixture(scope="session")
def packages(tmp_path_factory, checkpoints) -> dict[tuple[str, str], Path]:
    """(config name, attention implementation) -> exported fp32 package."""
    root = tmp_path_factory.mktemp("packages")
    return {
        (name, attention): export_package(str(path), root / f"{name}-{attention}", attention=attention,
                                          progress=False) and root / f"{name}-{attention}"
        for name, path in checkpoints.items()
        for attention in ("gqa", "plain")
    }


@pytest.fixture(scope="session")
def package(packages) -> Path:
    """The default package: fp32, fused attention."""
    return packages[("window8", "gqa")]


@pytest.fixture(scope="session")
def reference_model(checkpoints):
    from transformers import GPTNeoForCausalLM

    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = GPTNeoForCausalLM.from_pretrained(checkpoints[name]).eval()
        return cache[name]

    return load


# -- damaging copies of a package (bad-input tests) ------------------------------------------------
def _snapshot(directory: Path) -> dict[str, str]:
    """Every entry under `directory`: a file's sha256, a symlink's target, a directory's "dir"."""
    import hashlib

    out = {}
    for path in sorted(Path(directory).rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            out[name] = "-> " + str(path.readlink())
        elif path.is_dir():
            out[name] = "dir"
        elif path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[name] = "special"
    return out


def _edit_manifest(directory: Path, edit) -> None:
    """Apply `edit` to the manifest's JSON and write it back sealed (so only the edit is wrong)."""
    import json

    from neoedge.manifest import seal

    path = Path(directory) / "neoedge.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_bytes(seal(data))


def _relist(directory: Path, *names: str) -> None:
    """Record the current size and sha256 of files `names` in the manifest, sealed."""
    from neoedge.manifest import sha256_file

    def edit(data):
        for name in names:
            path = Path(directory) / name
            data["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    _edit_manifest(directory, edit)


@pytest.fixture(scope="session")
def snapshot():
    """snapshot(directory): every entry under it (a file's sha256, a symlink's target)."""
    return _snapshot


@pytest.fixture(scope="session")
def edit_manifest():
    """edit_manifest(directory, edit): apply edit(data) to the manifest's JSON, written back sealed."""
    return _edit_manifest


@pytest.fixture(scope="session")
def relist():
    """relist(directory, *names): record those files' current size and sha256, sealed."""
    return _relist


@pytest.fixture
def package_copy(package, tmp_path) -> Path:
    """A private copy of the default package, to damage."""
    import shutil

    return Path(shutil.copytree(package, tmp_path / "pkg"))


def tree_state(*roots: Path) -> dict[str, tuple]:
    """Everything under `roots`: each entry's kind, mode and content (sha256) or link target, so that
    two states compare equal only if nothing was written, changed or lost."""
    import hashlib
    import os
    import stat

    state: dict[str, tuple] = {}
    for root in roots:
        for directory, dirs, files in os.walk(root):
            for name in sorted(dirs + files):
                path = os.path.join(directory, name)
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode):
                    entry: tuple = ("link", os.readlink(path))
                elif stat.S_ISDIR(info.st_mode):
                    entry = ("dir", stat.S_IMODE(info.st_mode))
                else:
                    with open(path, "rb") as f:
                        entry = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(f.read()).hexdigest())
                state[path] = entry
    return state


@pytest.fixture(scope="session")
def tree():
    """tree_state(*roots): a comparable snapshot of directory trees."""
    return tree_state
