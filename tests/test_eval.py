"""`neoedge eval`: perplexity computed by the runtime, agreement with a reference, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neoedge import Generator
from neoedge.cli import main
from neoedge.evaluate import EvaluationError, Windows, evaluate

TEXT = ("Return a new list containing all items from the iterable in ascending order. A custom key "
        "function can be supplied to customize the sort order, and the reverse flag can be set to "
        "request the result in descending order. ") * 6


def test_windows_score_every_token_once():
    for total, length, stride in [(100, 32, 16), (100, 32, 32), (33, 32, 8), (7, 4, 1)]:
        scored = [t for _, end, first in Windows(length, stride).spans(total) for t in range(first, end)]
        assert scored == list(range(1, total))
        assert all(end - begin <= length for begin, end, _ in Windows(length, stride).spans(total))


def test_perplexity_equals_transformers(package, reference_model):
    generator = Generator(package)
    report = evaluate(generator, TEXT, window=64, stride=32)
    ids = [generator.manifest.model.bos_token_id] + generator.tokenizer.encode(TEXT)
    model = reference_model("window8")
    nll, scored_until = 0.0, 1
    with torch.no_grad():
        for begin in range(0, len(ids), 32):
            end = min(begin + 64, len(ids))
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0], -1)
            for t in range(scored_until, end):
                nll -= logp[t - 1 - begin, ids[t]].item()
            scored_until = end
            if end == len(ids):
                break
    assert report.tokens == len(ids) - 1
    assert report.perplexity == pytest.approx(np.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_reference_comparison(package, packages):
    same = evaluate(Generator(package), TEXT, window=64, reference=Generator(packages[("window8", "plain")]))
    assert same.top1_agreement == 1.0
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-5)


def test_reference_with_another_tokenizer_is_refused(package, tmp_path):
    import shutil

    other = shutil.copytree(package, tmp_path / "other")
    manifest = json.loads((other / "neoedge.json").read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (other / "neoedge.json").write_text(json.dumps(manifest))
    with pytest.raises(EvaluationError, match="different tokenizer"):
        evaluate(Generator(package), TEXT, window=64, reference=Generator(other))


@pytest.fixture
def run_eval(package):
    def run(*args):
        return CliRunner().invoke(main, ["eval", str(package), *map(str, args)])
    return run


def test_cli_json(run_eval, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    result = run_eval("--text", path, "--window", "64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["perplexity"] > 1 and data["tokens"] > 64


@pytest.mark.parametrize("content,args,message", [
    (None, [], "not found"),
    (b"", [], "is empty"),
    (b"   \n\n ", [], "is empty"),
    (b"short text", ["--window", "64"], "fewer than one window"),
    (b"caf\xe9 au lait", [], "not UTF-8"),
    (TEXT.encode(), ["--window", "100000"], "window must be between"),
    (TEXT.encode(), ["--window", "64", "--stride", "65"], "stride must be between"),
])
def test_cli_bad_input(run_eval, tmp_path, content, args, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_eval("--text", path, *args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
