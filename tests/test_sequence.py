"""Sequences: conversations that keep their cache, rewind, fork, save/load, stop strings, misuse."""

from __future__ import annotations

import numpy as np
import pytest

from neoedge import FinishReason, Model, SequenceBusyError, SessionSettings, StateFileError

GREEDY = dict(max_new_tokens=12, stop_at_eos=False)


@pytest.fixture(scope="module")
def model(package) -> Model:
    return Model(package, settings=SessionSettings(intra_threads=1))


def test_a_conversation_reuses_its_cache_and_equals_one_shot_generation(model):
    """Turn by turn, each reply is token-identical to generating it in one go from the same tokens,
    and the history is served from the cache instead of being processed again."""
    chat = model.sequence()
    for turn, message in enumerate(["User: open a file\nAssistant:", "\nUser: close it\nAssistant:",
                                    "\nUser: read the lines\nAssistant:", "\nUser: thanks\nAssistant:"]):
        before = len(chat)
        reply = chat.generate(message, **GREEDY)
        prompt = list(chat.tokens[: len(chat) - len(reply.tokens)])
        one_shot = model.sequence(tokens=prompt).generate(**GREEDY)
        assert reply.tokens == one_shot.tokens, turn
        assert reply.usage.prompt_tokens == len(prompt)
        # All of the history but its last (pending) token was already in the cache.
        assert reply.usage.cached_tokens == max(0, before - 1)
        assert chat.tokens == tuple(prompt) + reply.tokens


def test_a_stop_string_is_cut_out_of_the_sequence_too(model):
    """After a stop, the sequence holds exactly the prompt and the returned text, so the next turn
    follows the text the caller saw."""
    full = model.generate("Return the", max_new_tokens=30, stop_at_eos=False).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip()
    seq = model.sequence("Return the")
    reply = seq.generate(max_new_tokens=30, stop=[stop], stop_at_eos=False)
    assert reply.finish_reason == FinishReason.STOP and stop not in reply.text
    assert seq.text == "Return the" + reply.text
    assert seq.generate(max_new_tokens=3, stop_at_eos=False).usage.new_tokens == 3


@pytest.mark.parametrize("back", [3, 60], ids=["within the local window's margin", "re-processed"])
def test_rewind_regenerates_exactly(model, back):
    seq = model.sequence("Return a list of the words in the string, using sep as the delimiter")
    prompt = len(seq)
    first = seq.generate(max_new_tokens=80, stop_at_eos=False, logprobs=True)
    keep = 80 - back
    seq.rewind(prompt + keep)
    assert len(seq) == prompt + keep
    again = seq.generate(max_new_tokens=back, stop_at_eos=False, logprobs=True)
    assert again.tokens == first.tokens[keep:]
    np.testing.assert_allclose(again.logprobs, first.logprobs[keep:], atol=1e-5)


def test_fork_continues_independently_and_exactly(model):
    seq = model.sequence("Open the file and")
    seq.generate(max_new_tokens=20, stop_at_eos=False)
    fork = seq.fork()
    a = seq.generate(max_new_tokens=30, stop_at_eos=False, logprobs=True)
    b = fork.generate(max_new_tokens=30, stop_at_eos=False, logprobs=True)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs  # bit-identical: same cache, same steps
    c = fork.generate(" but", max_new_tokens=5, stop_at_eos=False)  # diverges without touching seq
    assert seq.tokens != fork.tokens and len(fork) == len(seq) + len(model.encode(" but")) + 5
    assert c.finish_reason == FinishReason.LENGTH


def test_save_and_load_round_trip_exactly(model, tmp_path):
    seq = model.sequence("Return a new list containing all items")
    seq.generate(max_new_tokens=70, stop_at_eos=False)  # slides the local layers' buffers
    path = tmp_path / "chat.neoseq"
    seq.save(path)
    loaded = model.load_sequence(path)
    assert loaded.tokens == seq.tokens and loaded.cached == seq.cached
    a = seq.generate(max_new_tokens=25, stop_at_eos=False, logprobs=True)
    b = loaded.generate(max_new_tokens=25, stop_at_eos=False, logprobs=True)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs


def test_a_saved_state_is_refused_by_another_package(model, packages, tmp_path):
    seq = model.sequence("Open")
    seq.save(tmp_path / "s")
    other = Model(packages[("window8", "plain")])
    with pytest.raises(StateFileError, match="another model package"):
        other.load_sequence(tmp_path / "s")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"not a state" + b, "not a neoedge sequence state"),
    (lambda b: b[:-10], "truncated or corrupt"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "do not match its checksum"),
])
def test_a_damaged_state_file_is_refused(model, tmp_path, damage, message):
    seq = model.sequence("Open the file")
    seq.process()
    path = tmp_path / "s"
    seq.save(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StateFileError, match=message):
        model.load_sequence(path)


def _saved_with_header(model, path, edit) -> tuple:
    """A sequence saved to `path`, then its header rewritten by edit(header, body)."""
    import json
    import struct

    from neoedge.state_file import MAGIC

    seq = model.sequence("Open the file and read it")
    seq.process()
    seq.save(path)
    data = path.read_bytes()
    (size,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    header, body = json.loads(data[start:start + size]), data[start + size:]
    edit(header, body)
    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(raw)) + raw + body)
    return seq


def test_a_state_file_with_an_altered_header_is_refused(model, tmp_path):
    """The checksum covers the header too: a token id changed in it (the cache no longer matches
    the tokens it reports) is refused, not loaded."""
    def alter(header, body):
        header["tokens"][2] = (header["tokens"][2] + 1) % model.info.vocab_size

    _saved_with_header(model, tmp_path / "s", alter)
    with pytest.raises(StateFileError, match="do not match its checksum"):
        model.load_sequence(tmp_path / "s")


def test_a_failed_save_is_a_state_file_error_and_leaves_nothing_behind(model, tmp_path):
    seq = model.sequence("Open the file")
    target = tmp_path / "state"
    target.mkdir()  # replacing a directory fails after the temporary file was written
    with pytest.raises(StateFileError, match="cannot save the sequence state to"):
        seq.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_a_state_saved_by_the_previous_format_still_loads(model, tmp_path):
    """Version 1 files (checksum over the cache only) keep loading, as they were checked before."""
    import hashlib

    def as_version_1(header, body):
        header.update(format_version=1, sha256=hashlib.sha256(body).hexdigest())

    seq = _saved_with_header(model, tmp_path / "s", as_version_1)
    loaded = model.load_sequence(tmp_path / "s")
    assert loaded.tokens == seq.tokens
    assert loaded.generate(max_new_tokens=4, stop_at_eos=False).tokens == \
        seq.generate(max_new_tokens=4, stop_at_eos=False).tokens


def test_a_sequence_refuses_a_second_call_while_a_stream_is_open(model):
    seq = model.sequence("Open")
    stream = seq.stream(max_new_tokens=10, stop_at_eos=False)
    next(stream)
    for call in (lambda: seq.generate(max_new_tokens=2), lambda: seq.append(" x"), lambda: seq.rewind(1),
                 lambda: seq.stream(), lambda: seq.fork(), lambda: seq.score(["x"])):
        with pytest.raises(SequenceBusyError, match="in use .an open stream."):
            call()
    stream.close()
    assert seq.generate(max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2


def test_a_dropped_stream_frees_its_sequence(model):
    seq = model.sequence("Open")
    stream = seq.stream(max_new_tokens=10, stop_at_eos=False)
    next(stream)
    del stream
    assert seq.generate(max_new_tokens=2, stop_at_eos=False).usage.new_tokens == 2


def test_append_tokens_are_checked(model):
    from neoedge import PromptError

    seq = model.sequence()
    for bad, message in [([1, 2.0], "must be integers"), ([[1, 2]], "must be integers"), ([True], "must be integers"),
                         ([model.info.vocab_size], r"must be in \[0, 512\)"), ([-1], "must be in"),
                         (np.array([[1, 2]]), "one-dimensional"), (np.array([1.5]), "must hold integers"),
                         ("12", "sequence of integers")]:
        with pytest.raises(PromptError, match=message):
            seq.append(tokens=bad)
    assert len(seq) == 0
