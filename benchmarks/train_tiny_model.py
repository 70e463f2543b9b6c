"""Train the small GPT-Neo that quality benchmarks and tests measure quantization on.

    python benchmarks/train_tiny_model.py [--steps 600] [--out DIR]

Offline and reproducible: the text is the Python standard library's docstrings (every 10th document
held out), the tokenizer a byte-level BPE trained on the training split, the model a GPT-Neo with
mixed global/local layers and a 32-token window. About 10 minutes on 2 CPU cores.
Writes config.json, model.safetensors, tokenizer files, heldout.txt and train_report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GPTNeoForCausalLM

from neoedge.export.tiny import (EOS, HELDOUT_FILE, TRAINED_DIR, save_checkpoint, split_corpus,
                                 stdlib_docstrings, tiny_config, train_tokenizer)

CONFIG = dict(max_position_embeddings=512, hidden_size=128, num_layers=4, num_heads=4,
              attention_types=[[["global", "local"], 2]], window_size=32, intermediate_size=512,
              embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TRAINED_DIR)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    train_docs, heldout_docs = split_corpus(stdlib_docstrings())
    tokenizer = train_tokenizer(train_docs, args.vocab)
    eos = tokenizer.token_to_id(EOS)
    stream: list[int] = []
    for doc in train_docs:
        stream += tokenizer.encode(doc).ids + [eos]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"train: {len(train_docs)} docs, {len(data)} tokens; held out: {len(heldout_docs)} docs")

    model = GPTNeoForCausalLM(tiny_config(tokenizer.get_vocab_size(), **CONFIG)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for step in (bar := tqdm(range(args.steps), desc="train")):
        offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([data[o: o + args.seq_len] for o in offsets.tolist()])
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
    out = save_checkpoint(model.eval(), tokenizer, args.out)
    (out / HELDOUT_FILE).write_text("\n\n".join(heldout_docs) + "\n", encoding="utf-8")
    report = {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "seed": args.seed, "train_tokens": len(data), "final_train_loss": sum(losses[-50:]) / 50,
              "seconds": round(time.perf_counter() - start, 1),
              "parameters": sum(p.numel() for p in model.parameters())}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
