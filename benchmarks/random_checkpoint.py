"""A GPT-Neo checkpoint of a published size with random weights, for measuring when the hub is offline.

    python benchmarks/random_checkpoint.py 1.3B benchmarks/work/random1.3b-checkpoint

Shapes are those of EleutherAI/gpt-neo-125m, -1.3B and -2.7B (seed 0). Speed and memory do not
depend on the weights' values; quality does, so these checkpoints say nothing about it. The
tokenizer is a byte-level BPE trained here on the standard library's docstrings (the hub's GPT-2
tokenizer is not reachable offline); the vocabulary size of the model stays GPT-Neo's 50,257.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHAPES = {
    "125M": dict(hidden_size=768, num_layers=12, num_heads=12),
    "1.3B": dict(hidden_size=2048, num_layers=24, num_heads=16),
    "2.7B": dict(hidden_size=2560, num_layers=32, num_heads=20),
}


def build(shape: str, out: Path) -> Path:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from neoedge.export.tiny import save_checkpoint, stdlib_docstrings, train_tokenizer

    size = SHAPES[shape]
    config = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, window_size=256,
                          attention_types=[[["global", "local"], size["num_layers"] // 2]],
                          intermediate_size=None, bos_token_id=50256, eos_token_id=50256, **size)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config).eval()
    print(f"gpt-neo-{shape} shape: {sum(p.numel() for p in model.parameters()):,} parameters",
          file=sys.stderr)
    return save_checkpoint(model, train_tokenizer(stdlib_docstrings(), 8192), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(build(args.shape, args.out))


if __name__ == "__main__":
    main()
