"""The runtime imports and generates with torch, transformers, optimum and onnx unavailable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKED = ("torch", "transformers", "optimum", "onnx")
REPO = Path(__file__).resolve().parents[1]


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # any import of these now raises ImportError
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_generate_and_stream_without_torch(package):
    result = _run_blocked(f"""
        import json, sys
        from neoedge import Model, SessionSettings
        model = Model({str(package)!r}, settings=SessionSettings(intra_threads=1))
        text = model.generate("Open a file", max_new_tokens=12).text
        chunks = list(model.sequence("Open a file").stream(max_new_tokens=12).text())
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
        print(json.dumps({{"text": text, "streamed": "".join(chunks), "loaded": loaded}}))
    """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["loaded"] == []
    assert out["text"] and out["text"] == out["streamed"]


def test_cli_generate_without_torch(package):
    result = _run_blocked(f"""
        import sys
        from neoedge.cli import main
        sys.argv = ["neoedge", "generate", {str(package)!r}, "Return the", "--max-new-tokens", "8"]
        main()
    """)
    assert result.returncode == 0, result.stderr
    from neoedge import Model

    assert result.stdout == Model(package).generate("Return the", max_new_tokens=8).text + "\n"


@pytest.mark.parametrize("command", [["export", "x", "y"], ["demo"]])
def test_export_without_extra_is_a_clear_error(command):
    result = _run_blocked(f"""
        import sys
        from neoedge.cli import main
        sys.argv = ["neoedge"] + {command!r}
        main()
    """)
    assert result.returncode != 0
    assert "[export] extra" in result.stderr
    assert "Traceback" not in result.stderr
