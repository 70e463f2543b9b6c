"""Exactness at full size: the fp32 package of a gpt-neo-125m-shaped model against transformers.

    python benchmarks/parity_125m.py [--checkpoint DIR_OR_HUB_ID] [--new-tokens 512]

The tests check parity on tiny models with small windows; this runs the same comparisons on the real
shape (12 layers, window 256, context 2048): logits at every position of a 2048-token prefill, logits
of every position decoded one token at a time through the KV cache, and greedy generation of
--new-tokens tokens compared token by token with transformers' `generate`. Without --checkpoint it
uses the random-weight model and fp32 package that benchmarks/suite.py builds (same cache).

Writes benchmarks/results/parity-125m-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from neoedge import Model, SessionSettings
from report import write_report

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="hub id or directory (default: the suite's random 125M shape)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import torch
    from transformers import GPTNeoForCausalLM

    import suite

    paths = suite.prepare(args.checkpoint, ["neoedge-fp32"])
    checkpoint, package = paths["pytorch-fp32"], paths["neoedge-fp32"]
    torch.set_num_threads(2)
    model = GPTNeoForCausalLM.from_pretrained(checkpoint).eval()
    generator = Model(package, settings=SessionSettings(intra_threads=2))
    info = generator.manifest.model
    length = info.context_length
    ids = np.random.default_rng(0).integers(0, info.vocab_size, size=length, dtype=np.int64)

    print(f"transformers forward over {length} positions ...", file=sys.stderr)
    with torch.no_grad():
        reference = model(torch.from_numpy(ids[None])).logits[0].numpy()
    print("neoedge prefill ...", file=sys.stderr)
    prefill = np.abs(generator.logits(ids) - reference).max(axis=-1)
    print(f"neoedge step-wise through {length - 1} cached steps ...", file=sys.stderr)
    stepwise = np.abs(generator.stepwise_logits(ids, prefill=1) - reference).max(axis=-1)
    del reference

    prompt = ids[: args.prompt_tokens]
    print(f"greedy generation of {args.new_tokens} tokens, both ...", file=sys.stderr)
    start = time.perf_counter()
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt[None]), attention_mask=torch.ones(1, len(prompt),
                                  dtype=torch.long), do_sample=False, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=info.eos_token_id)[0, len(prompt):]
    torch_seconds = time.perf_counter() - start
    start = time.perf_counter()
    produced = list(generator.sequence(tokens=prompt.tolist()).generate(
        max_new_tokens=args.new_tokens, stop_at_eos=False).tokens)
    neoedge_seconds = time.perf_counter() - start
    expected = expected.tolist()
    same = next((i for i, (a, b) in enumerate(zip(produced, expected)) if a != b), len(expected))

    window = info.window_size
    report = {
        "date": datetime.date.today().isoformat(),
        "checkpoint": args.checkpoint or "random weights, gpt-neo-125m shape, seed 0",
        "positions": length, "window_size": window, "tolerance": TOLERANCE,
        "max_abs_logit_diff_prefill": float(prefill.max()),
        "max_abs_logit_diff_stepwise": float(stepwise.max()),
        "max_abs_logit_diff_stepwise_beyond_window": float(stepwise[window:].max()),
        "greedy_new_tokens": args.new_tokens, "greedy_identical_tokens": same,
        "greedy_seconds": {"transformers": torch_seconds, "neoedge": neoedge_seconds},
    }
    report["passed"] = bool(max(report["max_abs_logit_diff_prefill"], report["max_abs_logit_diff_stepwise"])
                            <= TOLERANCE and same == args.new_tokens)
    write_report(args.out, f"parity-125m-{report['date']}", report, markdown(report))
    if not report["passed"]:
        sys.exit(1)


def markdown(r: dict) -> str:
    return "\n".join([
        f"fp32 package vs transformers, {r['checkpoint']}; {r['positions']} positions, window {r['window_size']}. "
        f"Date {r['date']}.", "",
        "| check | result |", "| --- | --- |",
        f"| max abs logit diff, prefill (every position) | {r['max_abs_logit_diff_prefill']:.2e} |",
        f"| max abs logit diff, step-wise through the cache (every position) | "
        f"{r['max_abs_logit_diff_stepwise']:.2e} |",
        f"| ... step-wise beyond the window only | {r['max_abs_logit_diff_stepwise_beyond_window']:.2e} |",
        f"| greedy tokens identical to transformers `generate` | {r['greedy_identical_tokens']} / "
        f"{r['greedy_new_tokens']} |",
        f"| tolerance (logits) | {r['tolerance']:g} |",
        f"| passed | {'yes' if r['passed'] else 'no'} |", ""])


if __name__ == "__main__":
    main()
