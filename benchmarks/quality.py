"""What quantization costs in quality, before (round-to-nearest) and after (data-aware), on two
trained GPT-Neos.

    python benchmarks/quality.py [--fixture tiny --fixture wide] [--anchors] [--window 256] [--stride 128]

Fixtures (benchmarks/train_tiny_model.py): `tiny`, the model that ships with neoedge.export (hidden
128: a block of 128 spans a whole row of most of its weights), and `wide` (hidden 512, trained
into benchmarks/work when it is missing, about 30 minutes on 2 quiet cores).

Every scheme is exported with round-to-nearest (`--algorithm rtn`, "before") and with the
data-aware default (gptq, "after"); the default int4 scheme also with every other algorithm. Each
package is scored by neoedge's runtime on the fixture's held-out text (windows of 256, stride 128),
against the fixture's own neoedge fp32 package (top-1 agreement, mean KL), exactly as
`neoedge eval PKG --text heldout.txt --window 256 --stride 128 --reference FP32PKG` does. The held-out
text shares no line with the calibration text. To show whether a method fits its calibration text
rather than the language, each package is also scored on the very token windows it was calibrated
on: a method that gains much more there than on the held-out text is overfitting.
`--anchors` adds Optimum's dynamic int8 and onnxruntime's own int4 quantizer (tiny only).

Writes benchmarks/results/quality-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neoedge import Model, SessionSettings
from neoedge.evaluate import score
from neoedge.export.calibrate import calibration_batches, read_calibration
from neoedge.export.tiny import HELDOUT_FILE
from exports import cached_export
from report import write_report
from train_tiny_model import fixture_checkpoint

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "quality"

# name -> export options (the scheme; the algorithm is added per row)
SCHEMES = {
    "int8 (default: block 128)": dict(quantize="int8"),
    "int8 (block 32)": dict(quantize="int8", block_size=32),
    "int4 (default: block 128, symmetric)": dict(quantize="int4"),
    "int4 (default, lm_head int8)": dict(quantize="int4", lm_head_bits=8),
    "int4 (block 128, asymmetric)": dict(quantize="int4", block_size=128, symmetric=False),
    "int4 (block 32, symmetric)": dict(quantize="int4", block_size=32),
    "int4 (block 32, asymmetric)": dict(quantize="int4", block_size=32, symmetric=False),
}
DEFAULT_INT4 = "int4 (default: block 128, symmetric)"
DEFAULT_INT8 = "int8 (default: block 128)"
BEFORE, AFTER = "rtn", "gptq"
EVERY_ALGORITHM = ("rtn", "weighted-clip", "awq", "gptq")

LogitsFn = Callable[[np.ndarray], np.ndarray]
SESSION = SessionSettings(intra_threads=2)


@dataclass(frozen=True)
class Texts:
    heldout: np.ndarray  # bos + the held-out text's tokens
    calibration: np.ndarray  # [sequences, length]: the windows every data-aware package was calibrated on


def _package_dir(fixture: str, name: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return WORK / fixture / safe


def calibration_scores(logits: LogitsFn, reference: LogitsFn, windows: np.ndarray) -> dict[str, float]:
    """Perplexity of the calibration windows (every token after the first), and top-1 agreement
    with the reference on them."""
    nll, agree, count = 0.0, 0, 0
    for ids in windows:
        lp = _log_softmax(logits(ids)[:-1])
        ref = reference(ids)[:-1]
        nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
        count += len(ids) - 1
    return {"perplexity": float(np.exp(nll / count)), "top1_agreement": agree / count}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def measure_fixture(fixture: str, args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = fixture_checkpoint(fixture)
    fp32_dir = cached_export(str(checkpoint), _package_dir(fixture, "fp32"), progress=False, quantize="none")
    fp32 = Model(fp32_dir, settings=SESSION)
    bos = fp32.info.bos_token_id
    text = (checkpoint / HELDOUT_FILE).read_text(encoding="utf-8")
    texts = Texts(np.asarray([bos] + fp32.tokenizer.encode(text), dtype=np.int64),
                  calibration_batches(fp32_dir.joinpath("tokenizer.json").read_text(encoding="utf-8"),
                                      read_calibration()).ids)
    base = score(fp32.logits, texts.heldout, window=args.window, stride=args.stride)
    base_calibration = calibration_scores(fp32.logits, fp32.logits, texts.calibration)
    rows: list[dict[str, Any]] = [_row("fp32", "-", base.perplexity, 1.0, 0.0, base_calibration, fp32_dir)]

    schemes = {k: v for k, v in SCHEMES.items() if not args.defaults_only or k in (DEFAULT_INT8, DEFAULT_INT4)}
    for scheme, options in schemes.items():
        for algorithm in EVERY_ALGORITHM if scheme == DEFAULT_INT4 else (BEFORE, AFTER):
            print(f"{fixture}: {scheme}, {algorithm} ...", file=sys.stderr)
            package = cached_export(str(checkpoint), _package_dir(fixture, f"{scheme} {algorithm}"), progress=False,
                                    algorithm=algorithm, **options)
            model = Model(package, settings=SESSION)
            report = score(model.logits, texts.heldout, window=args.window, stride=args.stride,
                           reference=fp32.logits)
            rows.append(_row(scheme, algorithm, report.perplexity, report.top1_agreement, report.mean_kl,
                             calibration_scores(model.logits, fp32.logits, texts.calibration), package))
    if args.anchors and fixture == "tiny":
        rows += _anchor_rows(checkpoint, fp32.logits, texts, args)
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base.perplexity - 1
        row["calibration_perplexity_change"] = row["calibration_perplexity"] / base_calibration["perplexity"] - 1
    train = checkpoint / "train_report.json"
    return {"fixture": fixture, "checkpoint": _shown(checkpoint), "text": _shown(checkpoint / HELDOUT_FILE),
            "tokens": base.tokens, "calibration_tokens": int(texts.calibration.size),
            "train_report": train.read_text() if train.exists() else None, "results": rows}


def _row(scheme: str, algorithm: str, perplexity: float, agreement: float, kl: float,
         calibration: dict[str, float], package: Path | None) -> dict[str, Any]:
    size = sum(p.stat().st_size for p in package.iterdir() if p.is_file()) / 1e6 if package else None
    return {"scheme": scheme, "algorithm": algorithm, "perplexity": perplexity, "top1_agreement": agreement,
            "mean_kl": kl, "calibration_perplexity": calibration["perplexity"],
            "calibration_top1_agreement": calibration["top1_agreement"], "size_mb": size}


def _anchor_rows(checkpoint: Path, reference: LogitsFn, texts: Texts, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, path in build_anchors(checkpoint).items():
        logits = onnx_logits(path)
        report = score(logits, texts.heldout, window=args.window, stride=args.stride, reference=reference)
        size = sum(p.stat().st_size for p in path.parent.glob("*.onnx*")) / 1e6
        rows.append(_row(name, "(anchor)", report.perplexity, report.top1_agreement, report.mean_kl,
                         calibration_scores(logits, reference, texts.calibration), None) | {"size_mb": size})
    return rows


def onnx_logits(model_path: Path) -> LogitsFn:
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
    return {"Optimum dynamic int8, avx512_vnni": int8 / "model_quantized.onnx",
            "onnxruntime MatMulNBits int4 block 32": int4 / "model.onnx"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", action="append", choices=("tiny", "wide"),
                        help="which trained model (repeatable; default both)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--anchors", action="store_true", help="add Optimum's and onnxruntime's quantizers (tiny)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default int8 and int4 schemes (every algorithm for int4)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    fixtures = [measure_fixture(name, args) for name in args.fixture or ("tiny", "wide")]
    date = datetime.date.today().isoformat()
    earlier = args.out / f"quality-{date}.json"
    if earlier.exists():  # the day's file keeps the fixtures not measured again now
        import json

        previous = json.loads(earlier.read_text())
        if (previous.get("window"), previous.get("stride")) == (args.window, args.stride):
            measured = {f["fixture"] for f in fixtures}
            fixtures = [f for f in previous["fixtures"] if f["fixture"] not in measured] + fixtures
    report = {"date": date, "window": args.window, "stride": args.stride, "fixtures": fixtures}
    write_report(args.out, f"quality-{report['date']}", report, markdown(report))


def _shown(path: Path) -> str:
    """Paths inside the repository are shown relative to it."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def markdown(report: dict[str, Any]) -> str:
    lines = []
    for fixture in report["fixtures"]:
        lines += [f"Model: {fixture['checkpoint']} (`{fixture['fixture']}`); held-out text: {fixture['text']} "
                  f"({fixture['tokens']} tokens, windows of {report['window']}, stride {report['stride']}); "
                  f"agreement and KL against the model's own neoedge fp32 package. Calibration: the built-in "
                  f"corpus, {fixture['calibration_tokens']} tokens. Date {report['date']}.", "",
                  "| scheme | algorithm | perplexity | Δ vs fp32 | top-1 agreement | mean KL (nats) "
                  "| Δ on calibration tokens | size MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in fixture["results"]:
            size = f"{row['size_mb']:.2f}" if row["size_mb"] is not None else "—"
            lines.append(f"| {row['scheme']} | {row['algorithm']} | {row['perplexity']:.4f} | "
                         f"{row['perplexity_change']:+.2%} | {row['top1_agreement']:.2%} | {row['mean_kl']:.5f} | "
                         f"{row['calibration_perplexity_change']:+.2%} | {size} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
