"""Loaders for neoedge's offline lm-eval tasks: the JSONL files beside this module, read without
the network or the `datasets` cache (lm-eval calls these through the tasks' `custom_dataset`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> list[dict[str, Any]]:
    with open(HERE / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split(name: str) -> dict[str, Any]:
    import datasets

    return {"test": datasets.Dataset.from_list(_rows(name))}


def nextword(**_: Any) -> dict[str, Any]:
    """The next-word questions (lm-eval passes the run's metadata as keyword arguments: ignored)."""
    return _split("stdlib_nextword.jsonl")


def documents(**_: Any) -> dict[str, Any]:
    """The held-out documents for rolling perplexity."""
    return _split("stdlib_documents.jsonl")


def perplexity_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """Word/byte counts of the document itself, as lm-eval's wikitext task counts them."""
    (loglikelihood,) = results
    words = len(doc["text"].split())
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
