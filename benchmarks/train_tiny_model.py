"""Train the small GPT-Neos that quality benchmarks and tests measure quantization on.

    python benchmarks/train_tiny_model.py [tiny|wide] [--steps N] [--out DIR]

Two named fixtures, both offline and reproducible (fixed seed, fixed data order, 2 threads):

- `tiny` (hidden 128, 4 layers, window 32; 1.1M parameters; 10-13 minutes on 2 cores): the model
  that ships in export/assets/gpt-neo-stdlib-tiny. Its text is the running Python's standard
  library docstrings (every 10th document held out in heldout.txt), its tokenizer a byte-level BPE
  of 2048 tokens trained on the training split.
- `wide` (hidden 512, 4 layers, 8 heads, window 64; 13.9M parameters; 150 steps, about 12 minutes on 2 quiet
  cores): a stronger judge of quantization, where a block of 128 inputs is a quarter of a row, not
  all of it. Too large for git (56 MB), so `benchmarks/quality.py` trains it into benchmarks/work
  when it is missing. It does not depend on the Python version: it is trained on the calibration
  corpus that ships with neoedge (export/assets/calibration/stdlib-docstrings.txt, which shares no
  line with the held-out text) with the tiny model's tokenizer, and judged on the tiny model's
  held-out text.

Writes config.json, model.safetensors, tokenizer files, heldout.txt and train_report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


@dataclass(frozen=True)
class Fixture:
    config: dict[str, Any]  # GPTNeoConfig overrides
    out: Path
    steps: int
    lr: float
    corpus: str  # "stdlib" (the running Python's docstrings) or "snapshot" (the shipped corpus)
    batch: int = 16
    seq_len: int = 256
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def _fixtures() -> dict[str, Fixture]:
    from neoedge.export.tiny import TRAINED_DIR

    return {
        "tiny": Fixture(
            config=dict(max_position_embeddings=512, hidden_size=128, num_layers=4, num_heads=4,
                        attention_types=[[["global", "local"], 2]], window_size=32, intermediate_size=512,
                        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0),
            out=TRAINED_DIR, steps=600, lr=3e-3, corpus="stdlib"),
        "wide": Fixture(
            config=dict(max_position_embeddings=512, hidden_size=512, num_layers=4, num_heads=8,
                        attention_types=[[["global", "local"], 2]], window_size=64, intermediate_size=2048,
                        embed_dropout=0.1, attention_dropout=0.1, resid_dropout=0.1),
            out=WORK / "gpt-neo-stdlib-wide", steps=150, lr=1e-3, corpus="snapshot"),
    }


FIXTURES = ("tiny", "wide")


def fixture_checkpoint(name: str) -> Path:
    """The directory of fixture `name`, trained now if it is missing (the wide one is not in git)."""
    fixture = _fixtures()[name]
    if not (fixture.out / "model.safetensors").is_file():
        train(name)
    return fixture.out


def train(name: str, *, steps: int | None = None, out: Path | None = None) -> Path:
    import torch
    from tqdm import tqdm
    from transformers import GPTNeoForCausalLM

    from neoedge.export.tiny import (CALIBRATION_CORPUS, EOS, HELDOUT_FILE, TRAINED_DIR, save_checkpoint,
                                     split_corpus, stdlib_docstrings, tiny_config, train_tokenizer)

    fixture = _fixtures()[name]
    steps = steps or fixture.steps
    out = out or fixture.out
    torch.manual_seed(fixture.seed)
    torch.set_num_threads(2)
    if fixture.corpus == "stdlib":
        train_docs, heldout_docs = split_corpus(stdlib_docstrings())
        tokenizer = train_tokenizer(train_docs, 2048)
        eos = tokenizer.token_to_id(EOS)
        stream: list[int] = []
        for doc in train_docs:
            stream += tokenizer.encode(doc).ids + [eos]
        heldout = "\n\n".join(heldout_docs) + "\n"
    else:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(TRAINED_DIR / "tokenizer.json"))
        # One stream, as `neoedge eval` reads the held-out text: <|endoftext|> first, then the text.
        text = CALIBRATION_CORPUS.read_text(encoding="utf-8")
        stream = [tokenizer.token_to_id(EOS)] + tokenizer.encode(text, add_special_tokens=False).ids
        heldout = (TRAINED_DIR / HELDOUT_FILE).read_text(encoding="utf-8")
    data = torch.tensor(stream, dtype=torch.long)
    print(f"{name}: {len(data)} training tokens")

    model = GPTNeoForCausalLM(tiny_config(tokenizer.get_vocab_size(), **fixture.config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=fixture.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    generator = torch.Generator().manual_seed(fixture.seed)
    start, losses = time.perf_counter(), []
    for step in (bar := tqdm(range(steps), desc=f"train {name}")):
        offsets = torch.randint(0, len(data) - fixture.seq_len - 1, (fixture.batch,), generator=generator)
        batch = torch.stack([data[o: o + fixture.seq_len] for o in offsets.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")

    # Greedy decoding of a model this small loops on a few tokens; its packages sample by default
    # (export reads generation_config.json into the package's defaults). Chosen by reading outputs.
    model.generation_config.update(do_sample=True, temperature=0.6, top_k=20, repetition_penalty=1.3)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(model.eval(), tokenizer, partial)
    (partial / HELDOUT_FILE).write_text(heldout, encoding="utf-8")
    report = {"fixture": name, "steps": steps, "batch": fixture.batch, "seq_len": fixture.seq_len,
              "lr": fixture.lr, "seed": fixture.seed, "corpus": fixture.corpus, "train_tokens": len(data),
              "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
              "seconds": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in model.parameters())}
    (partial / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists() and name != "tiny":
        shutil.rmtree(out)
    if out.exists():  # the committed tiny model: replace its files in place
        for path in partial.iterdir():
            path.replace(out / path.name)
        partial.rmdir()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(out)
    print(json.dumps(report))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixture", nargs="?", choices=FIXTURES, default="tiny")
    parser.add_argument("--steps", type=int, help="training steps (default: the fixture's)")
    parser.add_argument("--out", type=Path, help="output directory (default: the fixture's)")
    args = parser.parse_args()
    train(args.fixture, steps=args.steps, out=args.out)


if __name__ == "__main__":
    main()
