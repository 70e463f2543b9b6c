"""What a runtime-only install refuses, and that it really is one: damaged packages, bad prompts,
and no torch, transformers or onnx anywhere near the runtime."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from neoedge import IntegrityError, Model, OptionsError, PromptError

HEAVY = ("torch", "transformers", "optimum", "onnx")


@pytest.mark.skipif(os.environ.get("NEOEDGE_RUNTIME_ONLY") != "1",
                    reason="only in the runtime-only venv (.ci/run sets NEOEDGE_RUNTIME_ONLY=1 there)")
def test_this_is_a_runtime_only_install():
    """.ci/run runs this directory in a venv made by `pip install -e .`: none of these is installed."""
    assert [name for name in HEAVY if importlib.util.find_spec(name) is not None] == []


def test_generating_loads_none_of_torch_transformers_onnx(tier_packages):
    """In a fresh interpreter, loading a package, generating, streaming and scoring import none of them."""
    code = textwrap.dedent(f"""
        import json, sys
        from neoedge import Model
        model = Model({str(tier_packages["int4"])!r})
        text = model.generate("Open a file", max_new_tokens=8).text
        streamed = "".join(e.text for e in model.stream("Open a file", max_new_tokens=8))
        model.score("Open", [" a file"])
        model.sequence("Open").fork().generate(max_new_tokens=2)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps({{"same": text == streamed, "loaded": loaded}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"same": True, "loaded": []}


def test_the_cli_generates_in_this_install(tier_packages, tier_models):
    result = subprocess.run([sys.executable, "-m", "neoedge.cli", "generate", str(tier_packages["gqa"]), "Return the",
                             "--max-new-tokens", "8", "--ignore-eos"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = tier_models("gqa").generate("Return the", max_new_tokens=8, stop_at_eos=False).text
    assert result.stdout == expected + "\n"


def test_a_damaged_weights_file_is_refused(tier_packages, tmp_path):
    copy = shutil.copytree(tier_packages["gqa"], tmp_path / "pkg")
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.onnx.data"):
        Model(copy, verify="full")


def test_a_missing_package_is_refused(tmp_path):
    with pytest.raises(IntegrityError, match="not a directory"):
        Model(tmp_path / "nowhere")
    with pytest.raises(IntegrityError, match="neoedge.json is missing"):
        Model(tmp_path)


def test_bad_prompts_are_refused_naming_the_problem(tier_models):
    model = tier_models("gqa")
    vocab, context = model.info.vocab_size, model.info.context_length
    for tokens, message in [([vocab], rf"must be in \[0, {vocab}\)"), ([-1], "must be in"),
                            ([1, 2.5], "must be integers"), ([0] * (context + 1), f"context is {context} tokens")]:
        with pytest.raises(PromptError, match=message):
            model.logits(tokens)
        with pytest.raises(PromptError, match=message):
            model.score(tokens, [[1]])
    with pytest.raises(PromptError, match=f"context is {context} tokens"):
        model.generate("word " * (2 * context))
    with pytest.raises(OptionsError, match="top_logprobs must be <= 20"):
        model.generate("Open", top_logprobs=21)
