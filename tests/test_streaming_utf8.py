"""Streaming never emits a broken character when one spans several byte-level tokens."""

from __future__ import annotations

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
