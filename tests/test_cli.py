"""The `neoedge` command through click's CliRunner: text on stdout, one-line errors on stderr."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from neoedge.cli import main
from neoedge.manifest import FORMAT_VERSION


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args])

    return invoke


def test_generate_prints_only_text(cli, package):
    from neoedge import Model

    expected = Model(package).generate("Open the", max_new_tokens=10).text
    result = cli("generate", package, "Open the", "--max-new-tokens", "10", "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    streamed = cli("generate", package, "Open the", "--max-new-tokens", "10")
    assert streamed.stdout == result.stdout
    unpacked = cli("generate", package, "Open the", "--max-new-tokens", "10", "--no-prepack", "--threads", "1")
    assert unpacked.exit_code == 0, unpacked.output
    assert unpacked.stdout == result.stdout


def test_generate_sampling_options_and_stop(cli, package):
    args = ["generate", package, "The", "--max-new-tokens", "20", "--temperature", "0.9", "--top-k", "50",
            "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "4"]
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    text = first.stdout.rstrip("\n")
    stop = text[3:6]
    stopped = cli(*args, "--stop", stop)
    assert stopped.stdout.rstrip("\n") == text[: text.index(stop)]


def test_info_human_and_json(cli, package):
    result = cli("info", package)
    assert result.exit_code == 0, result.output
    assert "window 8" in result.stdout and "gqa" in result.stdout and "validation" in result.stdout
    assert "weights        fp32 (not quantized)" in result.stdout and "0.0 MB" not in result.stdout
    assert "defaults       greedy, at most 128 new tokens\n" in result.stdout
    data = json.loads(cli("info", package, "--json").stdout)
    assert data["format_version"] == FORMAT_VERSION
    assert data["model"]["attention_layers"] == ["global", "local", "global", "local"]
    assert "all sha256 match" in cli("info", package, "--verify").stdout


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be > 0"),
    (["--top-p", "1.5"], "top_p must be <= 1"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--repetition-penalty", "0"], "repetition_penalty must be > 0"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--stop", ""], "stop strings must be non-empty"),
])
def test_invalid_options_are_one_line_errors(cli, package, args, message):
    result = cli("generate", package, "hi", *args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_package_is_a_clear_error(cli, tmp_path):
    result = cli("generate", tmp_path / "nope", "hi")
    assert result.exit_code != 0
    assert "not found" in result.stderr


def test_over_long_prompt_is_a_clear_error(cli, package):
    result = cli("generate", package, "word " * 400)
    assert result.exit_code != 0
    assert "context is 256" in result.stderr


def test_export_refuses_existing_output(cli, package, checkpoints):
    result = cli("export", checkpoints["window8"], package)
    assert result.exit_code != 0
    assert "already holds a neoedge package; add --force to replace it" in result.stderr
    assert "force=True" not in result.stderr


def test_export_force_replaces_a_package(cli, package, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(package, out)
    result = cli("export", checkpoints["window4"], out, "--force", "--attention", "plain")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "neoedge.json").read_text())["graph"]["attention"] == "plain"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert "validated against transformers" in result.stderr


def test_bench_reports_every_measurement(cli, package, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", package, "--prompt-tokens", "16", "--new-tokens", "6", "--runs", "2",
                 "--context", "32,64", "--output", out, "--threads", "1", "--chat-turns", "3", "--cancel")
    assert result.exit_code == 0, result.output
    assert "decode" in result.stdout and "cold start" in result.stdout
    report = json.loads(out.read_text())
    assert report["decode_ms_per_token"]["median"] > 0
    assert report["first_token_ms"] > 0 and report["session_load_s"] > 0
    assert [p["context"] for p in report["context_sweep"]] == [32, 64]
    assert report["cold_start_s"] > 0 and report["peak_rss_mb"] > 0
    assert report["machine"]["onnxruntime"]
    assert len(report["chat"]["cached_ms"]) == 3 and len(report["chat"]["uncached_ms"]) == 3
    assert report["cancel"]["prefill_tokens"] == 254 and report["cancel"]["decode_ms"]["max"] > 0
    assert "chat" in result.stdout and "cancel" in result.stdout


def test_bench_json_conventions(cli, package, tmp_path):
    """--json prints JSON on stdout; the old --json FILE still works, with a deprecation notice."""
    args = ["bench", package, "--prompt-tokens", "8", "--new-tokens", "3", "--runs", "1", "--no-cold-start"]
    printed = cli(*args, "--json")
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout)["settings"]["prompt_tokens"] == 8
    old = cli(*args, "--json", tmp_path / "old.json")
    assert old.exit_code == 0, old.output
    assert "deprecated" in old.stderr and json.loads((tmp_path / "old.json").read_text())["settings"]["runs"] == 1


def test_bench_times_sampled_generation(cli, package, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", package, "--prompt-tokens", "8", "--new-tokens", "6", "--runs", "1", "--no-cold-start",
                 "--temperature", "0.8", "--top-p", "0.9", "--output", out)
    assert result.exit_code == 0, result.output
    assert "sampling: temperature 0.8, top_p 0.9" in result.stdout
    settings = json.loads(out.read_text())["settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"]) == (0.8, 0, 0.9)


def test_bench_rejects_invalid_sampling_settings(cli, package):
    result = cli("bench", package, "--top-p", "1.5", "--no-cold-start")
    assert result.exit_code != 0
    assert "top_p must be <= 1" in result.stderr


def test_bench_rejects_a_prompt_longer_than_the_context(cli, package):
    result = cli("bench", package, "--prompt-tokens", "999", "--no-cold-start")
    assert result.exit_code != 0
    assert "does not fit the model's context (256)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # refused before any run, no progress bar


def test_bench_cancel_needs_room_after_the_prompt(cli, package):
    result = cli("bench", package, "--prompt-tokens", "250", "--new-tokens", "1", "--cancel", "--no-cold-start")
    assert result.exit_code != 0
    assert "the cancel measurement's 32 tokens = 282 tokens does not fit the model's context (256)" in result.stderr


def test_chat_says_how_many_stop_strings_it_takes(cli, package):
    stops = [arg for i in range(16) for arg in ("--stop", f"s{i}")]
    result = cli("chat", package, *stops)
    assert result.exit_code != 0
    assert "--stop" in result.stderr and "at most 15 in a chat" in result.stderr


def test_eval_refuses_a_limit_below_one_document(cli, package):
    for limit in ("0", "-2"):
        result = cli("eval", package, "--tasks", "stdlib_cloze", "--limit", limit)
        assert result.exit_code != 0 and "--limit" in result.stderr and "must be above 0" in result.stderr


def test_bench_rejects_a_context_sweep_beyond_the_model(cli, package):
    result = cli("bench", package, "--prompt-tokens", "8", "--new-tokens", "4", "--context", "64,300",
                 "--no-cold-start")
    assert result.exit_code != 0
    assert "--context 300 + 32 tokens = 332 tokens does not fit the model's context (256)" in result.stderr


def test_demo_exports_and_generates(cli, tmp_path):
    from neoedge.export.tiny import trained_checkpoint

    result = cli("demo", "--model", trained_checkpoint(), "--out", tmp_path / "demo", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    from neoedge import Model

    # What the demo printed is what the exported package generates with its defaults (the shipped
    # checkpoint's generation_config.json: sampling) and the demo's seed.
    model = Model(tmp_path / "demo" / "package")
    assert model.options().temperature == 0.6
    expected = model.generate("The default value is", max_new_tokens=12, seed=0)
    assert result.stdout == expected.text + "\n" and len(expected.tokens) == 12


def _options():
    import click

    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                yield name, param


@pytest.mark.parametrize("command,option", [(c, p.opts[0]) for c, p in _options()])
def test_every_option_says_what_it_does(command, option):
    param = next(p for c, p in _options() if c == command and p.opts[0] == option)
    assert param.help and len(param.help.split()) >= 3, f"neoedge {command} {option} has no help text"


def test_bench_progress_shows_no_rate_or_eta(cli, package):
    """The steps take from milliseconds (a warm-up) to seconds (a fresh process): a rate or an ETA
    computed from them would mislead, so the bar shows the count and the elapsed time only."""
    result = cli("bench", package, "--prompt-tokens", "8", "--new-tokens", "3", "--runs", "2", "--no-cold-start")
    assert result.exit_code == 0, result.output
    assert "bench: 0/3 runs |" in result.stderr and "\n" not in result.stderr  # cleared, no blank line left
    assert "run/s" not in result.stderr and "s/run" not in result.stderr and "<" not in result.stderr


def test_info_shows_sampling_defaults(cli, package_copy, edit_manifest):
    edit_manifest(package_copy, lambda d: d.update(generation={"max_new_tokens": 40, "temperature": 0.6, "top_k": 20,
                                                                "repetition_penalty": 1.3, "stop": ["\n\n"]}))
    result = cli("info", package_copy)
    assert result.exit_code == 0, result.output
    assert ("defaults       sampling: temperature 0.6, top_k 20, repetition penalty 1.3, at most 40 new tokens, "
            "stop at '\\n\\n'\n") in result.stdout


def test_bench_refuses_an_output_it_could_not_write_before_running(cli, package, tmp_path):
    result = cli("bench", package, "--output", tmp_path / "missing" / "x.json", "--no-cold-start")
    assert result.exit_code != 0
    assert "Invalid value for --output" in result.stderr and "is not a directory" in result.stderr
    assert result.stdout == ""  # refused before any run


def test_demo_refuses_bad_options_before_exporting(cli, tmp_path):
    result = cli("demo", "--out", tmp_path / "demo", "--max-new-tokens", "0")
    assert result.exit_code != 0 and "max_new_tokens must be >= 1" in result.stderr
    assert not (tmp_path / "demo").exists()
