"""Streaming never emits a broken character when one spans several byte-level tokens."""

from __future__ import annotations

import numpy as np
import pytest

from neoedge.tokenizer import Tokenizer

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🙂🚀 and ∑ math", "naïve café — “quoted”"]


@pytest.fixture(scope="module")
def package_tokenizer(package) -> Tokenizer:
    return Tokenizer(package / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_stream_emits_whole_characters(package_tokenizer, text):
    ids = package_tokenizer.encode(text)
    assert len(ids) > len(text.encode("utf-8")) / 4  # multi-byte characters really are split
    stream = package_tokenizer.stream()
    chunks = [stream.push(token) for token in ids] + [stream.flush()]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) == text


def test_split_character_is_held_back_until_complete(package_tokenizer):
    ids = package_tokenizer.encode("🙂")
    assert len(ids) > 1, "the test tokenizer must split this emoji"
    stream = package_tokenizer.stream()
    assert [stream.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🙂"


def test_invalid_bytes_are_not_held_forever(package_tokenizer):
    lead = package_tokenizer.encode("🙂")[0]  # a lone lead byte never completes
    stream = package_tokenizer.stream()
    out = [stream.push(lead) for _ in range(4)] + [stream.push(package_tokenizer.encode("a")[0])]
    assert "".join(out).endswith("a")


# A real U+FFFD in the text, or a stray invalid byte, must not pass for the start of a split
# character: the stream (and so every completion's text) once cut the next character in two.
@pytest.fixture(scope="module")
def tok(package):
    return Tokenizer(package / "tokenizer.json")


@pytest.mark.parametrize("text", ["\ufffd🙂", "\ufffd\ufffd日本"])
def test_stream_after_replacement_char_keeps_following_character(tok, text):
    ids = tok.encode(text)
    stream = tok.stream()
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == tok.decode(ids) == text


def test_stream_after_invalid_byte_equals_decode(tok):
    lone = next(i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd")  # a lone continuation byte
    ids = [lone] + tok.encode("🙂")
    stream = tok.stream()
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == tok.decode(ids) == "\ufffd🙂"


def test_generated_text_is_the_decoded_tokens(package, tok):
    from neoedge import GenerationOptions
    from neoedge.generation import Decoder

    forced = tok.encode("\ufffd🙂 ok")
    vocab = tok.vocab_size
    options = GenerationOptions(temperature=0.0, max_new_tokens=len(forced), stop_at_eos=False)
    decoder = Decoder(tok, options, vocab, 0, np.zeros(0, np.int64), 1, 0)
    for token in forced:
        logits = np.zeros(vocab, np.float32)
        logits[token] = 10.0
        decoder.step(logits)
    completion = decoder.completion()
    assert list(completion.tokens) == forced
    assert completion.text == tok.decode(forced) == "\ufffd🙂 ok"
