"""What quantization costs in quality, measured on a trained model and side by side with today's tools.

    python benchmarks/quality.py [--checkpoint DIR] [--text FILE] [--window 256] [--stride 128]

Default model: the trained tiny GPT-Neo that ships with neoedge.export (benchmarks/train_tiny_model.py
made it) and its held-out text. Every row is scored with the same windows on the same tokens:
transformers fp32 (the reference), neoedge fp32/int8/int4 variants through neoedge's runtime, and as
anchors Optimum's dynamic int8 (avx512_vnni preset) and onnxruntime's MatMulNBits int4 (block 32)
applied to the Optimum graph. Agreement and KL are against transformers fp32.

Writes benchmarks/results/quality-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neoedge import Generator
from neoedge.evaluate import score
from neoedge.export.tiny import HELDOUT_FILE, trained_checkpoint
from exports import cached_export
from report import write_report

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "quality"

# name -> export options (quantize, block size, zero points, lm_head bits)
NEOEDGE_VARIANTS = {
    "neoedge fp32": dict(quantize="none"),
    "neoedge int8 (default: block 128)": dict(quantize="int8"),
    "neoedge int8 (block 32)": dict(quantize="int8", block_size=32),
    "neoedge int4 (default: block 128, symmetric)": dict(quantize="int4"),
    "neoedge int4 (default, lm_head int8)": dict(quantize="int4", lm_head_bits=8),
    "neoedge int4 (block 128, asymmetric)": dict(quantize="int4", block_size=128, symmetric=False),
    "neoedge int4 (block 32, symmetric)": dict(quantize="int4", block_size=32),
    "neoedge int4 (block 32, asymmetric)": dict(quantize="int4", block_size=32, symmetric=False),
    "neoedge int4 (block 32, asymmetric, lm_head int8)": dict(quantize="int4", block_size=32, symmetric=False,
                                                             lm_head_bits=8),
}


def torch_logits(checkpoint: Path) -> Callable[[np.ndarray], np.ndarray]:
    import torch
    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(checkpoint).eval()

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids[None])).logits[0].numpy()
    return logits


def onnx_logits(model_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An Optimum-style decoder graph fed directly: no past (empty), full attention mask."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}

    def logits(ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        feeds: dict[str, Any] = {"input_ids": ids[None].astype(np.int64)}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, n), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, info in inputs.items():
            if name.startswith("past_key_values"):
                feeds[name] = np.zeros((1, info.shape[1], 0, info.shape[3]), np.float32)
        return session.run(["logits"], feeds)[0][0]
    return logits


def build_anchors(checkpoint: Path) -> dict[str, Path]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from optimum.onnxruntime import ORTModelForCausalLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    import onnx

    fp32 = WORK / "optimum-fp32"
    int8 = WORK / "optimum-int8"
    int4 = WORK / "ort-int4-block32"
    if not (fp32 / "model.onnx").exists():
        ORTModelForCausalLM.from_pretrained(checkpoint, export=True, use_cache=True).save_pretrained(fp32)
    if not (int8 / "model_quantized.onnx").exists():
        ORTQuantizer.from_pretrained(fp32).quantize(
            save_dir=int8, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
    if not (int4 / "model.onnx").exists():
        int4.mkdir(parents=True, exist_ok=True)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), block_size=32, is_symmetric=True,
                                         accuracy_level=4)
        quantizer.process()
        quantizer.model.save_model_to_file(str(int4 / "model.onnx"))
    return {"Optimum fp32 (anchor)": fp32 / "model.onnx",
            "Optimum dynamic int8, avx512_vnni (anchor)": int8 / "model_quantized.onnx",
            "onnxruntime MatMulNBits int4 block 32 (anchor)": int4 / "model.onnx"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--no-anchors", action="store_true", help="skip the Optimum/onnxruntime anchors")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    checkpoint = args.checkpoint or trained_checkpoint()
    text_path = args.text or checkpoint / HELDOUT_FILE
    text = text_path.read_text(encoding="utf-8")
    WORK.mkdir(parents=True, exist_ok=True)

    packages = {}
    for name, options in NEOEDGE_VARIANTS.items():
        out = WORK / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        packages[name] = cached_export(str(checkpoint), out, progress=False, **options)

    fp32 = Generator(packages["neoedge fp32"])
    bos = fp32.manifest.model.bos_token_id
    ids = np.asarray([bos] + fp32.tokenizer.encode(text), dtype=np.int64)
    reference = torch_logits(checkpoint)
    rows = []

    def add(name: str, logits: Callable[[np.ndarray], np.ndarray] | None, size_mb: float | None) -> None:
        print(f"scoring {name} ...", file=sys.stderr)
        if logits is None:
            report = score(reference, ids, window=args.window, stride=args.stride)
            rows.append({"name": name, "perplexity": report.perplexity, "top1_agreement": 1.0, "mean_kl": 0.0,
                         "size_mb": size_mb, "tokens": report.tokens})
            return
        report = score(logits, ids, window=args.window, stride=args.stride, reference=reference)
        rows.append({"name": name, "perplexity": report.perplexity, "top1_agreement": report.top1_agreement,
                     "mean_kl": report.mean_kl, "size_mb": size_mb, "tokens": report.tokens})

    add("transformers fp32 (reference)", None,
        sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e6)
    for name, path in packages.items():
        generator = Generator(path)
        add(name, generator.logits, sum(e.bytes for e in generator.manifest.files.values()) / 1e6)
    if not args.no_anchors:
        for name, path in build_anchors(checkpoint).items():
            size = sum(p.stat().st_size for p in path.parent.glob("*.onnx*")) / 1e6
            add(name, onnx_logits(path), size)

    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base - 1
    report = {"date": datetime.date.today().isoformat(), "checkpoint": _shown(checkpoint), "text": _shown(text_path),
              "tokens": rows[0]["tokens"], "window": args.window, "stride": args.stride, "results": rows}
    write_report(args.out, f"quality-{report['date']}", report, markdown(report))


def _shown(path: Path) -> str:
    """Paths inside the repository are shown relative to it."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Model: {report['checkpoint']}; text: {report['text']} ({report['tokens']} tokens, windows of "
             f"{report['window']}, stride {report['stride']}). Agreement and KL against transformers fp32. "
             f"Date {report['date']}.", "",
             "| configuration | perplexity | Δ vs fp32 | top-1 agreement | mean KL (nats) | size MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in report["results"]:
        lines.append(f"| {row['name']} | {row['perplexity']:.4f} | {row['perplexity_change']:+.2%} | "
                     f"{row['top1_agreement']:.2%} | {row['mean_kl']:.5f} | {row['size_mb']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
