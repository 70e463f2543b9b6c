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


@pytest.mark.parametrize("total,length,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 8), (7, 4, 1),
                                                 (100, 32, 31), (64, 32, 32), (65, 32, 32), (10, 2, 2),
                                                 (100, 7, 3), (5, 8, 8)])
def test_windows_score_every_token_once(total, length, stride):
    spans = list(Windows(length, stride).spans(total))
    scored = [t for _, _, first, stop in spans for t in range(first, stop)]
    assert scored == list(range(1, total))
    for begin, end, first, stop in spans:
        assert end - begin <= length
        # every scored token is predicted by a position inside its window
        assert begin + 1 <= first and stop - 1 <= end


def _direct_nll(model, ids, window, stride):
    """Perplexity's total NLL computed straight from transformers, by the definition in Windows:
    each window scores the unscored tokens its positions predict (the token after its last position
    only when the next window starts at its end)."""
    nll, scored_until = 0.0, 1
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0], -1)
            last = end if end < len(ids) and begin + stride >= end else end - 1
            for t in range(scored_until, last + 1):
                nll -= logp[t - 1 - begin, ids[t]].item()
            scored_until = max(scored_until, last + 1)
            if end == len(ids):
                break
    return nll


def test_perplexity_equals_transformers(package, reference_model):
    generator = Generator(package)
    report = evaluate(generator, TEXT, window=64, stride=32)
    ids = [generator.manifest.model.bos_token_id] + generator.tokenizer.encode(TEXT)
    nll = _direct_nll(reference_model("window8"), ids, 64, 32)
    assert report.tokens == len(ids) - 1
    assert report.perplexity == pytest.approx(np.exp(nll / (len(ids) - 1)), rel=1e-5)


@pytest.mark.parametrize("window,stride", [(64, 64), (48, 48), (40, 39)])
def test_every_window_and_stride_equals_transformers(package, reference_model, window, stride):
    """Non-overlapping windows (stride == window) included: every token is scored once, each from
    a window's own context, exactly as computed directly."""
    generator = Generator(package)
    ids = [generator.manifest.model.bos_token_id] + generator.tokenizer.encode(TEXT)
    report = evaluate(generator, TEXT, window=window, stride=stride)
    nll = _direct_nll(reference_model("window8"), ids, window, stride)
    assert (report.window, report.stride, report.tokens) == (window, stride, len(ids) - 1)
    assert report.mean_nll == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_reference_comparison(package, packages):
    same = evaluate(Generator(package), TEXT, window=64, reference=Generator(packages[("window8", "plain")]))
    assert same.top1_agreement == 1.0
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-5)


def test_reference_with_another_tokenizer_is_refused(package, tmp_path, relist):
    import shutil

    other = shutil.copytree(package, tmp_path / "other")
    tokenizer = other / "tokenizer.json"  # the same vocabulary, written differently: another file
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))
    relist(other, "tokenizer.json")
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
    (TEXT.encode(), ["--window", "0"], "window must be between"),
    (TEXT.encode(), ["--window", "1"], "window must be between"),
    (TEXT.encode(), ["--window", "64", "--stride", "0"], "stride must be a positive integer"),
    (TEXT.encode(), ["--window", "64", "--stride", "-3"], "stride must be a positive integer"),
])
def test_cli_bad_input(run_eval, tmp_path, content, args, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_eval("--text", path, *args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
