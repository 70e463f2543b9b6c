"""Run exports in child processes that are killed at a chosen point (used by test_export_safety.py).

    python export_faults.py JOBS.json RESULTS.json

One process imports torch, transformers and onnxruntime once (5 s) and runs nothing itself; each job
is a fork of it, so every export runs in a real process of its own that can be SIGKILLed. A job:
{"name", "source", "out", "force", "point", "group"}: `point` says where the child kills itself
(by patching the export's own functions from here, not by hooks in the export), and jobs of one
`group` run at the same time. Results: name -> {"exit": code} or {"signal": number}, plus "error"
(the ExportError's text) and "seconds" (of the export call) when the child lived to tell.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import onnxruntime  # noqa: F401 - imported here once, not in every child
import torch  # noqa: F401
import transformers.models.gpt_neo.modeling_gpt_neo  # noqa: F401
from transformers import AutoConfig, AutoTokenizer, GPTNeoForCausalLM  # noqa: F401

from neoedge.errors import ExportError
from neoedge.export import destination, pipeline
from neoedge.generator import Generator  # noqa: F401


def _die(signum: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(60)  # SIGTERM is handled between bytecodes: wait here for it


def _after(module, name: str, then) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        then(args)
        return result
    setattr(module, name, wrapper)


def _before(module, name: str, first) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        first(args)
        return original(*args, **kwargs)
    setattr(module, name, wrapper)


def _wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def arm(point: str, job: dict) -> None:
    """Make this process die (or wait) at `point` of the export."""
    kill = lambda _args: _die()  # noqa: E731
    if point == "load":
        _after(pipeline, "load_checkpoint", kill)
    elif point in ("graph", "sigterm-graph"):
        signum = signal.SIGTERM if point == "sigterm-graph" else signal.SIGKILL
        original = pipeline.build_decoder

        def build(*args, on_layer=None, **kwargs):  # dies once the first layer's weights are written
            return original(*args, on_layer=lambda: _die(signum), **kwargs)
        pipeline.build_decoder = build
    elif point == "write":
        _before(pipeline, "_optimize_graph", kill)
    elif point == "validate":
        _after(pipeline, "validate_package", kill)
    elif point == "publish":
        _before(pipeline, "publish", kill)
    elif point == "renamed":  # a new OUT is in place; the staging directory not yet removed
        _after(destination, "_rename_noreplace", kill)
    elif point == "exchanged":  # the new package is at OUT, the old one in the staging directory
        _after(destination, "_exchange", kill)
    elif point == "removing":  # half-way through deleting the replaced package
        original = destination._remove_package

        def remove(path):
            victim = next(p for p in sorted(Path(path).iterdir()) if p.name != "neoedge.json")
            victim.unlink()
            _die()
            return original(path)
        destination._remove_package = remove
    elif point in ("fallback", "fallback-between"):
        destination._atomic_rename = lambda *args: False  # as on an OS without renameat2
        if point == "fallback-between":  # old package moved aside, new one not yet moved in
            _before(destination, "_rename_noreplace", kill)
    elif point == "hold":  # holds OUT's lock (in the load step) until job["release"] exists
        _after(pipeline, "load_checkpoint", lambda _args: (Path(job["started"]).touch(),
                                                           _wait_for(job["release"])))
    elif point == "after":  # starts once job["release"] exists
        _wait_for(job["release"])
    elif point == "barrier":  # starts at the group's common moment
        time.sleep(max(0.0, job["at"] - time.time()))
    elif point != "none":
        raise ValueError(point)


def run(job: dict) -> None:
    """The child: arm, export, exit 0 (done), 3 (ExportError) or 4 (anything else); its error text
    and the export call's duration go to job["result_file"]."""
    report: dict = {}
    code = 0
    try:
        arm(job["point"], job)
        started = time.monotonic()
        try:
            pipeline.export_package(job["source"], job["out"], force=job.get("force", False),
                                    validate=job.get("validate", True), progress=False)
        finally:
            report["seconds"] = time.monotonic() - started
    except ExportError as exc:
        report["error"], code = str(exc), 3
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        report["error"], code = f"{type(exc).__name__}: {exc}", 4
    Path(job["result_file"]).write_text(json.dumps(report))
    os._exit(code)


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        groups.setdefault(job.get("group", job["name"]), []).append(job)
    for group in groups.values():
        children = {}
        at = time.time() + 0.5
        for job in group:
            job["result_file"] = str(Path(sys.argv[2]).with_name(f"{job['name']}.result"))
            job["at"] = at
            pid = os.fork()
            if pid == 0:
                run(job)
            children[pid] = job
        for _ in group:
            pid, status = os.wait()
            job = children[pid]
            result: dict = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) \
                else {"exit": os.WEXITSTATUS(status)}
            if os.path.exists(job["result_file"]):
                result.update(json.loads(Path(job["result_file"]).read_text()))
            results[job["name"]] = result
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
