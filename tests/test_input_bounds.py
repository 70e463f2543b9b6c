"""Every input is bounded and checked before work starts, in the API and the CLI: prompts, token ids,
options and settings. Each bad one gets its own error on one line, fast, and nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from neoedge import GenerationOptions, Model
from neoedge.cli import main
from neoedge.errors import OptionsError, PromptError, RunError
from neoedge.session import SessionSettings, max_intra_threads


@pytest.fixture(scope="module")
def model(package, snapshot):
    before = snapshot(package)
    yield Model(package, settings=SessionSettings(intra_threads=1))
    assert snapshot(package) == before, "a bad input changed the package"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


# -- prompts ----------------------------------------------------------------------------------------
def test_a_10_mb_prompt_is_refused_fast_in_little_memory(package):
    """Before: 24 s and 1.6 GB before the refusal. A fresh process measures time and peak memory."""
    code = f"""
import resource, time
from neoedge import Model, PromptError
g = Model({str(package)!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prompt = "word " * 2_000_000
start = time.perf_counter()
try:
    g.generate(prompt)
except PromptError as exc:
    print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    seconds, grown_kb, message = out.stdout.split(" ", 2)
    assert float(seconds) < 1.0
    assert int(grown_kb) < 64 * 1024  # the 10 MB string itself, and no more than a few MB besides
    assert "prompt is 10000000 characters, more than 256 tokens can hold" in message


def test_a_prompt_within_the_character_bound_is_counted_exactly(model):
    with pytest.raises(PromptError, match=r"prompt is \d+ tokens, more than the 256 that fit \(the model's context "
                                          r"is 256") as exc:
        model.generate("word " * 300)
    _one_line(exc)


@pytest.mark.parametrize("prompt,match", [
    (b"bytes", "prompt must be a str, got bytes"),
    (None, "prompt must be a str, got NoneType"),
    (["a", "list"], "prompt must be a str, got list"),
    ("caf\udce9 au lait", "prompt is not valid text: character 3 is not Unicode"),
])
def test_bad_prompts(model, prompt, match):
    with pytest.raises(PromptError, match=match) as exc:
        model.generate(prompt, max_new_tokens=2)
    _one_line(exc)
    with pytest.raises(PromptError, match=match.replace("prompt", "text")):
        model.sequence().append(prompt)


# -- token ids ---------------------------------------------------------------------------------------
TOKEN_ID_CASES = [
    ([5, 2.0], r"tokens\[1\] is 2.0 \(float\): token ids must be integers"),
    ([5, True], r"tokens\[1\] is True \(bool\): token ids must be integers"),
    ([[1, 2], [3, 4]], r"tokens\[0\] is \[1, 2\] \(list\): token ids must be integers"),
    ([5, -1], r"tokens\[1\] is -1: token ids must be in \[0, 512\)"),
    ([5, 512], r"tokens\[1\] is 512: token ids must be in \[0, 512\)"),
    ([5, 2**64], r"tokens\[1\] is 18446744073709551616: token ids must be in"),
    (np.array([1.0, 2.0]), "tokens must hold integers, got an array of float64"),
    (np.array([True, False]), "tokens must hold integers, got an array of bool"),
    (np.array([[1, 2]]), r"tokens must be one-dimensional, got an array of shape \(1, 2\)"),
    (np.array([3, 2**64 - 1], dtype=np.uint64), r"tokens\[1\] is 18446744073709551615: token ids must be in"),
    ("1 2 3", "tokens must be a sequence of integers, got str"),
    (iter([1, 2]), "tokens must be a sequence of integers, got list_iterator"),
    ([1] * 257, r"tokens holds 257 tokens, more than the 256 that fit \(the model's context is 256"),
]


@pytest.mark.parametrize("ids,match", TOKEN_ID_CASES, ids=[f"case{i}" for i in range(len(TOKEN_ID_CASES))])
def test_bad_token_ids_are_refused_not_converted(model, ids, match):
    """Before: floats truncated, bools became 0/1, nested lists were flattened, ids wrapped around."""
    seq = model.sequence()
    with pytest.raises(PromptError, match=match) as exc:
        seq.append(tokens=ids)
    _one_line(exc)
    assert len(seq) == 0
    if not isinstance(ids, str):  # a str continuation is text to score, not token ids
        with pytest.raises(PromptError, match=match.replace("tokens", "continuation", 1)):
            model.score("x", [ids])


@pytest.mark.parametrize("ids,match", [
    ([1, 2.5, 3], r"token_ids\[1\] is 2.5 \(float\)"),
    ([1] * 257, r"token_ids holds 257 tokens, more than the 256 that fit"),
    ([[1, 2, 3]], r"token_ids\[0\] is \[1, 2, 3\] \(list\)"),
])
def test_scoring_refuses_bad_token_ids(model, ids, match):
    with pytest.raises(PromptError, match=match):
        model.logits(ids)
    with pytest.raises(PromptError, match="token_ids is empty"):
        model.logits([])


def test_a_huge_id_list_is_refused_by_its_length_first(model):
    ids = [1] * 10_000_000
    start = time.perf_counter()
    with pytest.raises(PromptError, match="holds 10000000 tokens"):
        model.logits(ids)
    with pytest.raises(PromptError, match="holds 10000000 tokens"):
        model.sequence(tokens=ids)
    assert time.perf_counter() - start < 0.2


def test_numpy_integer_ids_score_as_python_ints(model):
    ids = [3, 17, 99, 4, 250]
    expected = model.logits(ids)
    for same in (np.array(ids, np.int32), np.array(ids, np.uint16), [np.int64(i) for i in ids], tuple(ids)):
        np.testing.assert_array_equal(model.logits(same), expected)
        assert model.sequence(tokens=same).tokens == tuple(ids)


@pytest.mark.parametrize("prefill", [0, True, 2.0, 6])
def test_stepwise_prefill_bounds(model, prefill):
    with pytest.raises(PromptError, match="prefill must be an integer from 1 to len.token_ids. .5."):
        model.stepwise_logits([1, 2, 3, 4, 5], prefill=prefill)


# -- options and settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(temperature=1e-45), r"temperature must be 0 \(greedy\) or >= 0.001, got 1e-45"),
    (dict(temperature=5e-4), "temperature must be 0 .greedy. or >= 0.001"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(repetition_penalty=1e-45), "repetition_penalty must be between 0.001 and 1000"),
    (dict(repetition_penalty=1e6), "repetition_penalty must be between 0.001 and 1000"),
    (dict(stop=["x"] * 17), "at most 16 stop strings"),
    (dict(stop=["x" * 257]), "stop strings must be at most 256 characters"),
    (dict(stop=b"\n\n"), "stop must be a sequence of strings, got bytes"),
    (dict(stop={"a": 1}), "stop must be a sequence of strings, got dict"),
    (dict(seed=True), "seed must be an integer, got True"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
])
def test_invalid_options(options, match):
    with pytest.raises(OptionsError, match=match):
        GenerationOptions(**options)


def test_the_lowest_temperature_is_exact(model):
    """Before: 1e-45 passed and gave garbage. The smallest accepted temperature is numerically
    sound: it samples the argmax, as its limit should."""
    greedy = model.generate("The", max_new_tokens=24, stop_at_eos=False).tokens
    assert model.generate("The", max_new_tokens=24, stop_at_eos=False, temperature=1e-3, seed=0).tokens == greedy
    assert model.generate("The", max_new_tokens=24, stop_at_eos=False, temperature=1e-3, top_p=0.5,
                          seed=1).tokens == greedy


@pytest.mark.parametrize("settings,match", [
    (dict(intra_threads=100_000), "intra_threads must be an integer from 0 .* to \\d+ .this machine's CPUs., got 100000"),
    (dict(intra_threads=True), "intra_threads must be an integer"),
    (dict(intra_threads=-1), "intra_threads must be an integer"),
    (dict(spinning="yes"), "spinning must be a bool"),
    (dict(prepack=1), "prepack must be a bool"),
])
def test_invalid_session_settings_fail_before_loading(settings, match):
    start = time.perf_counter()
    with pytest.raises(OptionsError, match=match):
        SessionSettings(**settings)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("verify", ["none", False, 1])
def test_verification_cannot_be_turned_off(package, verify):
    with pytest.raises(OptionsError, match="verify must be 'auto' or 'full'"):
        Model(package, verify=verify)


def test_threads_up_to_the_cpu_count_are_accepted(package):
    model = Model(package, settings=SessionSettings(intra_threads=max_intra_threads()))
    assert model.generate("x", max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2


def test_options_must_be_generation_options(model):
    with pytest.raises(OptionsError, match="options must be a GenerationOptions, got dict"):
        model.sequence(tokens=[1, 2]).stream(options={"max_new_tokens": 2})
    with pytest.raises(OptionsError, match="either a GenerationOptions or keyword options"):
        model.generate("x", GenerationOptions(), max_new_tokens=3)
    with pytest.raises(OptionsError, match="unknown generation option.s.: temprature"):
        model.generate("x", temprature=0.5)
    with pytest.raises(OptionsError, match="settings must be a SessionSettings"):
        Model(model.package_dir, settings={"intra_threads": 1})


def test_package_defaults_are_typed_and_complete(package):
    """The package's generation defaults name exactly GenerationOptions' fields: none is dropped."""
    from dataclasses import fields

    from neoedge.manifest import GenerationDefaults

    assert [f.name for f in fields(GenerationDefaults)] == [f.name for f in fields(GenerationOptions)]
    generation = Model(package).manifest.generation
    assert isinstance(generation, GenerationDefaults) and generation.max_new_tokens == 128
    assert generation.as_options() == {"max_new_tokens": 128}


def test_package_defaults_reach_the_options(package_copy, edit_manifest):
    edit_manifest(package_copy, lambda d: d.update(generation={"max_new_tokens": 7, "temperature": 0.5,
                                                               "stop": ["\n\n"], "stop_at_eos": False}))
    model = Model(package_copy)
    options = model.options()
    assert (options.max_new_tokens, options.temperature, options.stop, options.stop_at_eos) == (7, 0.5, ("\n\n",), False)
    assert model.options(temperature=0.0).temperature == 0.0


# -- onnxruntime errors during a run --------------------------------------------------------------
def test_onnxruntime_failure_during_a_run_is_a_neoedge_error(package, monkeypatch):
    """A real onnxruntime error (input_ids of the wrong element type) raised mid-generation
    becomes a RunError saying what ran, on which graph."""
    broken = Model(package, settings=SessionSettings(intra_threads=1))
    monkeypatch.setattr(broken.runner, "session", _FailingSession(broken.runner.session))
    seq = broken.sequence("The")
    with pytest.raises(RunError, match=r"onnxruntime failed during the decode step at position \d+ .*model.onnx\): "
                                       r".*data type") as exc:
        seq.generate(max_new_tokens=5, stop_at_eos=False)
    _one_line(exc)
    assert len(seq) == len(broken.encode("The")) + 1  # the token made before the failure is kept


class _FailingSession:
    """A session whose decode steps fail inside onnxruntime."""

    def __init__(self, session) -> None:
        self._session = session
        self._runs = 0

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding, *args):
        self._runs += 1
        if self._runs > 1:  # the prefill runs; the first decode step fails inside onnxruntime
            types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                     "tensor(int8)": np.int8}
            feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                                      np.float32 if i.name == "input_ids" else types[i.type])
                     for i in self._session.get_inputs()}
            self._session.run(None, feeds)  # input_ids of the wrong element type
        return self._session.run_with_iobinding(binding, *args)


# -- the CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args])
    return invoke


@pytest.mark.parametrize("args,message", [
    (["generate", "PKG", "hi", "--threads", "100000"], "intra_threads must be an integer from 0"),
    (["generate", "PKG", "caf\udce9"], "prompt is not valid text: character 3 is not Unicode"),
    (["generate", "PKG", "hi", "--temperature", "1e-45"], "temperature must be 0 (greedy) or >= 0.001"),
    (["generate", "PKG", "hi", "--repetition-penalty", "1e9"], "repetition_penalty must be between"),
    (["generate", "PKG", "hi", "--stop", "x" * 300], "stop strings must be at most 256 characters"),
    (["bench", "PKG", "--threads", "100000", "--no-cold-start"], "intra_threads must be an integer from 0"),
    (["eval", "PKG", "--text", "TEXT", "--threads", "100000"], "intra_threads must be an integer from 0"),
])
def test_cli_bad_inputs_are_one_line(cli, package, snapshot, tmp_path, args, message):
    text = tmp_path / "t.txt"
    text.write_text("some words " * 100)
    before = snapshot(package)
    start = time.perf_counter()
    result = cli(*[package if a == "PKG" else text if a == "TEXT" else a for a in args])
    assert time.perf_counter() - start < 30
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert snapshot(package) == before


def test_cli_non_utf8_argument_bytes(package):
    """The real thing: bytes that are not UTF-8 on the command line (Python decodes them with
    surrogateescape), in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "neoedge.cli", "generate", str(package), b"caf\xe9"],
                            capture_output=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().strip() == ("Error: prompt is not valid text: character 3 is not Unicode (bytes "
                                              "that are not UTF-8, e.g. a command line in another encoding)")


def test_cli_run_error_is_one_line(cli, package, monkeypatch):
    import neoedge.model as model_module

    real = model_module.make_runner

    def failing_runner(session, manifest, graph_path, graph=None):
        runner = real(session, manifest, graph_path, graph)
        runner.session = _FailingSession(session)
        return runner

    monkeypatch.setattr(model_module, "make_runner", failing_runner)
    result = cli("generate", package, "The", "--max-new-tokens", "5", "--ignore-eos")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: onnxruntime failed during the decode step")
    assert result.stderr.count("\n") == 1


def test_cli_eval_text_size_is_bounded(cli, package, tmp_path, monkeypatch):
    import neoedge.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "MAX_TEXT_BYTES", 1000)
    text = tmp_path / "big.txt"
    text.write_text("x" * 1001)
    result = cli("eval", package, "--text", text)
    assert result.exit_code == 1 and "is larger than" in result.stderr


def test_long_text_is_tokenized_in_pieces_exactly(model):
    """Eval encodes long texts in pieces (bounded memory): the ids are those of the whole."""
    from neoedge.export.tiny import stdlib_docstrings

    text = "\n\n".join(stdlib_docstrings())[:200_000] + " café ☃ 123abc  two  spaces\tand tabs <|endoftext|> end"
    whole = model.tokenizer._tok.encode(text, add_special_tokens=False).ids
    assert model.tokenizer.encode_long(text).tolist() == whole
    assert len(list(model.tokenizer._pieces(text))) > 2


def test_json_output_is_parseable(cli, package, tmp_path):
    """A sanity check of the CLI beside the error cases: valid input still works."""
    text = tmp_path / "t.txt"
    text.write_text("Return a new list containing all items from the iterable in ascending order. " * 8)
    result = cli("eval", package, "--text", text, "--window", "32", "--stride", "32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stride"] == 32


def test_a_tokenizer_without_a_length_bound_tokenizes_a_text_that_fits(tmp_path):
    """A pre-tokenizer that drops characters (whitespace here) can fit any number of them in a few
    tokens: only a byte-level BPE's length bound may refuse a text before tokenizing it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from neoedge.tokenizer import Tokenizer

    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "words.json"))
    tokenizer = Tokenizer(tmp_path / "words.json")
    assert tokenizer.encode("a" + " " * 1000 + "b", max_tokens=10) == [0, 1]
