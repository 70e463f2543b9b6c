"""Build the data of neoedge's offline lm-eval tasks (neoedge/eval_tasks/) from the held-out text of
the bundled trained model (export/assets/gpt-neo-stdlib-tiny/heldout.txt: every 10th standard-library
docstring, never seen in training).

    python benchmarks/make_eval_tasks.py            # rewrites neoedge/eval_tasks/*.jsonl

Deterministic (fixed seed, no dependence on the installed Python's docstrings): the same heldout.txt
always gives the same files, so a change to the committed data shows up in `git diff`.

- stdlib_nextword.jsonl: one question per line: `context` (the start of a held-out paragraph, cut
  before a word), `target` (that word), `choices` (the word and three distractors drawn from the
  held-out vocabulary, with lengths close to the word's, in a seeded random order), `gold` (the index
  of the word in `choices`). Used by the cloze (multiple choice), next-word (lambada-style
  log-likelihood) and next-word generation tasks.
- stdlib_documents.jsonl: `text`: the held-out paragraphs joined, in order, into documents of at least
  DOC_CHARS characters (longer than the trained model's 512-token context, so rolling log-likelihood
  needs several windows). Used by the rolling perplexity task.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "export" / "assets" / "gpt-neo-stdlib-tiny" / "heldout.txt"
OUT = ROOT / "neoedge" / "eval_tasks"

SEED = 0
QUESTIONS = 400
MIN_CONTEXT_WORDS = 8  # words of the paragraph before the first word that may be asked for
SPACING = 10  # words between two questions cut from the same paragraph
DOC_CHARS = 2500

_WORD = re.compile(r"[A-Za-z]+")


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def vocabulary(paras: list[str]) -> list[str]:
    """Words that may serve as distractors: alphabetic, 3+ letters, seen at least 3 times."""
    counts = collections.Counter(w for p in paras for w in _WORD.findall(p))
    return sorted(w for w, n in counts.items() if n >= 3 and len(w) >= 3)


def candidates(paras: list[str], vocab: set[str]) -> list[tuple[int, int, str]]:
    """(paragraph, character offset, word): words preceded by a space and followed by a non-letter,
    at least MIN_CONTEXT_WORDS words into their paragraph, SPACING words apart."""
    out = []
    for index, para in enumerate(paras):
        last = -SPACING
        for number, match in enumerate(re.finditer(r"\S+", para)):
            word = _WORD.fullmatch(match.group().rstrip(".,;:)"))
            start = match.start()
            if (number < MIN_CONTEXT_WORDS or number - last < SPACING or word is None
                    or para[start - 1] != " " or word.group() not in vocab):
                continue
            out.append((index, start, word.group()))
            last = number
    return out


def distractors(word: str, vocab: list[str], rng: random.Random, count: int = 3) -> list[str]:
    close = [w for w in vocab if abs(len(w) - len(word)) <= 2 and w.lower() != word.lower()]
    return rng.sample(close, count)


def questions(paras: list[str]) -> list[dict]:
    rng = random.Random(SEED)
    vocab = vocabulary(paras)
    picked = sorted(rng.sample(candidates(paras, set(vocab)), QUESTIONS))
    rows = []
    for index, start, word in picked:
        choices = [word] + distractors(word, vocab, rng)
        rng.shuffle(choices)
        # The context ends before the space: lm-eval puts the target delimiter (" ") in front of
        # every choice, so the space is scored with the word, as the tokenizer would merge them.
        rows.append({"id": len(rows), "context": paras[index][: start - 1], "target": word,
                     "choices": choices, "gold": choices.index(word)})
    return rows


def documents(paras: list[str]) -> list[dict]:
    docs, current = [], []
    for para in paras:
        current.append(para)
        if sum(len(p) + 2 for p in current) >= DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return [{"id": i, "text": doc} for i, doc in enumerate(docs)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heldout", type=Path, default=HELDOUT)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    paras = paragraphs(args.heldout.read_text(encoding="utf-8"))
    nextword, docs = questions(paras), documents(paras)
    write_jsonl(args.out / "stdlib_nextword.jsonl", nextword)
    write_jsonl(args.out / "stdlib_documents.jsonl", docs)
    print(f"{len(nextword)} questions, {len(docs)} documents from {len(paras)} paragraphs -> {args.out}")


if __name__ == "__main__":
    main()
