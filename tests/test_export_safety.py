"""Export never loses anything: what OUT may be, the atomic last step, concurrent exports, what an
interrupted export leaves (and that the next export removes it), permissions.

The fault-injection and concurrency tests run exports in real child processes (tests/export_faults.py
forks them from one process that has imported torch once) and kill them with SIGKILL or SIGTERM at
points of the export, by patching the export's own functions in the child.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from neoedge import Manifest
from neoedge.errors import ExportError
from neoedge.export import OutputExistsError, destination, export_package, pipeline
from neoedge.export.destination import MARKER, PACKAGE, Staging, remove_stale_staging
from neoedge.export.lock import output_lock

SOURCE = "window4"  # 3 layers, hidden 48: the fastest of the session's checkpoints


def _assert_complete_package(path: Path) -> Manifest:
    from neoedge.package import open_package

    manifest = open_package(path, verify="full").manifest
    assert sorted(p.name for p in path.iterdir()) == sorted([*manifest.files, "neoedge.json"])
    return manifest


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture
def old_package(package, tmp_path) -> Path:
    """A package at tmp_path/out (of another model than SOURCE, so old and new tell apart)."""
    return Path(shutil.copytree(package, tmp_path / "out"))


# -- replacing ------------------------------------------------------------------------------------
def test_force_replaces_a_package_and_leaves_nothing_beside_it(old_package, checkpoints, tree):
    before = tree(old_package)
    manifest = export_package(str(checkpoints[SOURCE]), old_package, force=True, progress=False)
    assert tree(old_package) != before
    assert _assert_complete_package(old_package).model == manifest.model
    assert manifest.model.hidden_size == 48
    assert _leftovers(old_package) == []


def test_a_package_without_force_is_refused_with_the_api_wording(old_package, checkpoints, tree):
    before = tree(old_package.parent)
    with pytest.raises(OutputExistsError, match="already holds a neoedge package; pass force=True"):
        export_package(str(checkpoints[SOURCE]), old_package, progress=False)
    assert tree(old_package.parent) == before


def test_two_rename_fallback_replaces_a_package(old_package, checkpoints, monkeypatch):
    """Where neither renameat2 nor renamex_np exists (or the filesystem refuses their flags)."""
    monkeypatch.setattr(destination, "_atomic_rename", lambda *args: False)
    export_package(str(checkpoints[SOURCE]), old_package, force=True, validate=False, progress=False)
    assert _assert_complete_package(old_package).model.hidden_size == 48
    assert _leftovers(old_package) == []


def test_missing_parents_are_created_and_removed_again_on_failure(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    monkeypatch.setattr(pipeline, "validate_package", _raise(ExportError("stop here")))
    with pytest.raises(ExportError, match="stop here"):
        export_package(str(checkpoints[SOURCE]), out, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_package(str(checkpoints[SOURCE]), out, validate=False, progress=False)
    _assert_complete_package(out)


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


# -- OUT changing while the export runs ------------------------------------------------------------
def test_a_folder_created_at_out_during_the_export_is_never_replaced(checkpoints, tmp_path, monkeypatch, tree):
    out = tmp_path / "out"
    original = pipeline.validate_package

    def validate_then_a_user_makes_out(*args, **kwargs):
        report = original(*args, **kwargs)
        out.mkdir()
        (out / "mine.txt").write_text("the user's")
        return report
    monkeypatch.setattr(pipeline, "validate_package", validate_then_a_user_makes_out)
    with pytest.raises(ExportError, match="was created by something else while the export ran; it was left alone"):
        export_package(str(checkpoints[SOURCE]), out, progress=False)
    assert (out / "mine.txt").read_text() == "the user's"
    assert _leftovers(out) == [] and [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_empty_folder_created_at_out_during_the_export_is_never_replaced(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "publish", _before_call(pipeline.publish, out.mkdir))
    with pytest.raises(ExportError, match="created by something else"):
        export_package(str(checkpoints[SOURCE]), out, validate=False, progress=False)
    assert out.is_dir() and list(out.iterdir()) == [] and _leftovers(out) == []


def test_a_package_turned_into_a_user_folder_during_a_forced_export_is_kept(old_package, checkpoints,
                                                                          monkeypatch, tree):
    def users_folder():
        shutil.rmtree(old_package)
        old_package.mkdir()
        (old_package / "mine.txt").write_text("the user's")
    monkeypatch.setattr(pipeline, "publish", _before_call(pipeline.publish, users_folder))
    with pytest.raises(ExportError, match="is not a neoedge package .it has no neoedge.json"):
        export_package(str(checkpoints[SOURCE]), old_package, force=True, validate=False, progress=False)
    assert [p.name for p in old_package.iterdir()] == ["mine.txt"] and _leftovers(old_package) == []


def test_a_swap_with_something_else_in_the_last_instant_is_undone(old_package, checkpoints, monkeypatch):
    """OUT is checked just before the exchange; if it was swapped for a user's folder in between,
    the exchange is reversed and the user's folder is back at OUT, untouched."""
    original = destination._exchange
    calls = []

    def exchange(a, b):
        if not calls:  # the user's folder appears between the check and the exchange
            shutil.rmtree(b)
            b.mkdir()
            (b / "mine.txt").write_text("the user's")
        calls.append((a, b))
        return original(a, b)
    monkeypatch.setattr(destination, "_exchange", exchange)
    with pytest.raises(ExportError, match="changed while the export ran"):
        export_package(str(checkpoints[SOURCE]), old_package, force=True, validate=False, progress=False)
    assert len(calls) == 2
    assert [p.name for p in old_package.iterdir()] == ["mine.txt"] and _leftovers(old_package) == []


def _before_call(function, first):
    def wrapper(*args, **kwargs):
        first()
        return function(*args, **kwargs)
    return wrapper


# -- interrupted in this process -------------------------------------------------------------------
def test_interrupted_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "validate_package", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_package(str(checkpoints[SOURCE]), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_the_old_package(old_package, checkpoints, monkeypatch, tree):
    from neoedge import Generator

    before = tree(old_package.parent)
    monkeypatch.setattr(pipeline, "validate_package", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export_package(str(checkpoints[SOURCE]), old_package, force=True, progress=False)
    assert tree(old_package.parent) == before
    Generator(old_package).generate("still works", max_new_tokens=3)


# -- permissions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(checkpoints, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_package(str(checkpoints[SOURCE]), tmp_path / "out", validate=False, progress=False) \
            and tmp_path / "out"
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


# -- leftovers of interrupted exports --------------------------------------------------------------
def test_stale_staging_is_removed_only_when_marked_for_this_out(tmp_path, package):
    out = tmp_path / "out"
    ours = Staging.create(out)  # as an export killed while building would leave it
    (ours.package / "model.onnx.data").write_bytes(b"\0" * 100)
    replaced = Staging.create(out)  # killed after the exchange: the old package inside
    shutil.rmtree(replaced.package)
    shutil.copytree(package, replaced.package)
    replaced.set_phase("replacing")
    unmarked = tmp_path / ".out.neoedge-0123abcd.partial"  # our name pattern, no marker, content
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("not ours to delete")
    empty = tmp_path / ".out.neoedge-89abcdef.partial"  # killed between mkdir and marker: empty
    empty.mkdir()
    other = Staging.create(tmp_path / "out.b")  # another OUT's staging (its name starts like ours)
    lookalike = tmp_path / ".out.something.partial"
    lookalike.mkdir()
    with output_lock(out):
        remove_stale_staging(out)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted([unmarked.name, other.root.name, lookalike.name])
    assert (unmarked / "keep.txt").read_text() == "not ours to delete"


def test_a_replaced_package_that_gained_files_is_kept(tmp_path, package, caplog):
    out = tmp_path / "out"
    staging = Staging.create(out)
    shutil.rmtree(staging.package)
    shutil.copytree(package, staging.package)
    staging.set_phase("replacing")
    (staging.package / "added-later.txt").write_text("someone's")
    with output_lock(out):
        remove_stale_staging(out)
    assert (staging.package / "added-later.txt").exists() and (staging.package / "neoedge.json").exists()
    assert not (staging.root / MARKER).exists()  # no longer ours: no later export touches it
    assert "kept" in caplog.text


def test_the_lock_file_is_not_left_behind_and_a_foreign_one_is_respected(checkpoints, tmp_path, tree):
    out = tmp_path / "out"
    export_package(str(checkpoints[SOURCE]), out, validate=False, progress=False)
    assert _leftovers(out) == []
    lock = tmp_path / ".other.neoedge-lock"
    lock.write_text("my notes")
    before = tree(tmp_path)
    with pytest.raises(ExportError, match="is not a neoedge export lock"):
        export_package(str(checkpoints[SOURCE]), tmp_path / "other", validate=False, progress=False)
    assert tree(tmp_path) == before


# -- real processes: killed at every step, racing each other ---------------------------------------
# point -> (state of OUT before, what OUT may hold after the kill)
NEW, OLD = "new", "old"
FAULTS = {
    "load": (None, None), "graph": (None, None), "write": (None, None), "validate": (None, None),
    "publish": (None, None), "renamed": (None, NEW),
    "graph+old": (OLD, OLD), "validate+old": (OLD, OLD), "publish+old": (OLD, OLD),
    "exchanged+old": (OLD, NEW), "removing+old": (OLD, NEW),
    # The two-rename fallback (no renameat2): OUT is absent between the renames, the next export
    # restores the old package from the staging directory.
    "fallback-between+old": (OLD, None),
}
TERMINATED = {"sigterm-graph": None, "sigterm-graph+old": OLD}


@pytest.fixture(scope="module")
def child_runs(checkpoints, packages, tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("the fault-injection children are forked (POSIX)")
    """Run every fault job and the concurrency groups in one fork server; name -> (result, out)."""
    root = tmp_path_factory.mktemp("faults")
    source = str(checkpoints[SOURCE])
    old = packages[("window8", "gqa")]
    jobs, outs = [], {}

    def job(name, point, before, **extra):
        out = root / name / "out"
        out.parent.mkdir()
        if before == OLD:
            shutil.copytree(old, out)
        outs[name] = out
        jobs.append(dict(name=name, point=point, source=source, out=str(out), force=before == OLD, **extra))

    for name, (before, _) in {**FAULTS, **{k: (v, None) for k, v in TERMINATED.items()}}.items():
        job(name, name.split("+")[0], before)
    # Three exports started at the same instant.
    race = root / "race"
    race.mkdir()
    for i in range(3):
        jobs.append(dict(name=f"race{i}", group="race", point="barrier", source=source, out=str(race / "out")))
        outs[f"race{i}"] = race / "out"
    # One export holds the lock (in its load step) until a second one, started then, has failed.
    held = root / "held"
    held.mkdir()
    jobs.append(dict(name="holder", group="held", point="hold", source=source, out=str(held / "out"),
                     started=str(root / "holder.started"), release=str(root / "second.result")))
    jobs.append(dict(name="second", group="held", point="after", source=source, out=str(held / "out"),
                     release=str(root / "holder.started")))
    outs["holder"] = outs["second"] = held / "out"
    (root / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(Path(__file__).with_name("export_faults.py")), str(root / "jobs.json"),
                    str(root / "results.json")], check=True, timeout=600)
    results = json.loads((root / "results.json").read_text())
    return {name: (results[name], outs[name]) for name in outs}, old


def _old_tree(tree, old: Path, out: Path) -> dict:
    return {path.replace(str(old), str(out), 1): entry for path, entry in tree(old).items()}


@pytest.mark.parametrize("name", list(FAULTS))
def test_killed_export_leaves_a_whole_package_and_the_next_export_cleans_up(name, child_runs, checkpoints, tree):
    (result, out), old = child_runs[0][name], child_runs[1]
    before, after = FAULTS[name]
    assert result.get("signal") == 9, result
    if after is None:
        assert not os.path.lexists(out)
    elif after == OLD:
        assert tree(out) == _old_tree(tree, old, out)  # the old package, byte for byte
    else:
        assert _assert_complete_package(out).model.hidden_size == 48  # the new package, complete
    left = _leftovers(out)
    assert all(destination._staging_pattern(out).fullmatch(n) or n == ".out.neoedge-lock" for n in left), left
    if name != "load":  # killed before the staging directory was made: only the lock file is left
        assert any(n.endswith(".partial") for n in left), left

    if name.startswith("fallback-between"):  # the next export first puts the old package back
        with pytest.raises(OutputExistsError):
            export_package(str(checkpoints[SOURCE]), out, validate=False, progress=False)
        assert tree(out) == _old_tree(tree, old, out)
    export_package(str(checkpoints[SOURCE]), out, force=True, validate=False, progress=False)
    assert _assert_complete_package(out).model.hidden_size == 48
    assert _leftovers(out) == []


@pytest.mark.parametrize("name", list(TERMINATED))
def test_sigterm_cleans_up_at_once_and_ends_the_process_by_the_signal(name, child_runs, tree):
    (result, out), old = child_runs[0][name], child_runs[1]
    assert result.get("signal") == 15, result
    if TERMINATED[name] == OLD:
        assert tree(out) == _old_tree(tree, old, out)
    else:
        assert not os.path.lexists(out)
    assert _leftovers(out) == []


def test_concurrent_exports_one_wins_the_others_fail_clearly(child_runs):
    runs = [child_runs[0][f"race{i}"] for i in range(3)]
    out = runs[0][1]
    codes = sorted(result["exit"] for result, _ in runs)
    assert codes == [0, 3, 3], runs
    for result, _ in runs:
        if result["exit"] == 3:
            assert ("another export to" in result["error"] and "is running" in result["error"]) \
                or "already holds a neoedge package" in result["error"], result
    _assert_complete_package(out)
    assert _leftovers(out) == []


def test_an_export_while_another_holds_the_lock_fails_at_once(child_runs):
    holder, _ = child_runs[0]["holder"]
    second, out = child_runs[0]["second"]
    assert second["exit"] == 3 and f"another export to {out} is running" in second["error"], second
    assert second["seconds"] < 1.0, second  # no load, no waiting
    assert holder["exit"] == 0, holder
    _assert_complete_package(out)
    assert _leftovers(out) == []


def test_staging_directory_layout(tmp_path):
    staging = Staging.create(tmp_path / "out")
    assert staging.root.parent == tmp_path and staging.package == staging.root / PACKAGE
    assert json.loads((staging.root / MARKER).read_text()) == {"staging_for": "out", "phase": "building"}
    assert stat.S_IMODE(staging.root.stat().st_mode) == 0o700
    staging.discard()
    assert list(tmp_path.iterdir()) == []


# -- odd destinations ---------------------------------------------------------------------------
def test_an_output_name_too_long_for_the_staging_directory_is_an_export_error(checkpoints, tmp_path, tree):
    out = tmp_path / ("p" * 235)  # its lock name fits the 255-byte limit, the staging name does not
    before = tree(tmp_path)
    with pytest.raises(ExportError, match="cannot create a staging directory"):
        export_package(str(checkpoints["window8"]), out, progress=False, validate=False)
    assert tree(tmp_path) == before


def test_a_nul_in_the_output_path_is_an_export_error(checkpoints, tmp_path):
    with pytest.raises(ExportError, match="NUL"):
        export_package(str(checkpoints["window8"]), str(tmp_path / "a\0b"), progress=False, validate=False)


def test_dotdot_after_a_symlink_writes_where_the_os_resolves_the_path(checkpoints, tmp_path, monkeypatch):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "link").symlink_to(tmp_path / "real" / "deep", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "cwd")
    export_package(str(checkpoints["window8"]), "link/../pkg", progress=False, validate=False)
    assert (tmp_path / "real" / "pkg" / "neoedge.json").is_file()
    assert not (tmp_path / "cwd" / "pkg").exists()


def test_staging_left_before_its_first_marker_was_renamed_is_removed(checkpoints, tmp_path):
    out = tmp_path / "pkg"
    stale = tmp_path / ".pkg.neoedge-0123abcd.partial"
    stale.mkdir(mode=0o700)
    (stale / (MARKER + ".new")).write_text(json.dumps({"staging_for": "pkg", "phase": "building"}))
    (stale / PACKAGE).mkdir()
    (stale / PACKAGE / "model.onnx").write_bytes(b"half")
    export_package(str(checkpoints["window8"]), out, progress=False, validate=False)
    assert not stale.exists()
    _assert_complete_package(out)


def test_replacing_a_package_deletes_only_the_files_its_manifest_lists(checkpoints, package, tmp_path, monkeypatch):
    """A file that appears in the old package after its last check (a user saving notes into it)
    survives the replacement, kept aside with a warning, instead of being deleted with the package."""
    out = Path(shutil.copytree(package, tmp_path / "pkg"))
    checked = destination.package_problem

    def then_the_user_writes(path):
        problem = checked(path)
        if problem is None and sys._getframe(1).f_code.co_name == "discard":  # the old package, going
            (path / "notes.txt").write_text("mine")
        return problem

    monkeypatch.setattr(destination, "package_problem", then_the_user_writes)
    export_package(str(checkpoints["window8"]), out, force=True, progress=False, validate=False)
    assert [p.read_text() for p in tmp_path.rglob("notes.txt")] == ["mine"]
    _assert_complete_package(out)
