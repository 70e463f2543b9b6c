"""`neoedge export`: a fixed sequence of steps, written to a temporary directory and moved into place
only when the package is complete and validated."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Literal

import onnx

from neoedge import __version__
from neoedge.errors import ExportError
from neoedge.manifest import GraphInfo, Manifest, Quantization, file_entries

from .calibrate import DEFAULT_LENGTH, calibration_batches, read_calibration
from .graph import build_decoder
from .load import load_checkpoint
from .quantize import WeightStorage
from .scheme import make_scheme
from .validate import describe_failure, validate_package
from .weight_quantization import quantize_weights
from .weights_file import ExternalWeights

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The weights live beside the graph, not inside it: onnxruntime then reads them straight from the
# file instead of parsing (and copying) a protobuf of the whole model first, which halves session
# creation for a 125M package; and protobuf could not hold a graph over 2 GB at all.
WEIGHTS_FILE = MODEL_FILE + ".data"
FP32_TOLERANCE = 1e-4


def export_package(
    source: str,
    output: str | Path,
    *,
    quantize: Literal["none", "int8", "int4"] = "none",
    attention: Literal["gqa", "plain"] = "gqa",
    kv_cache: Literal["auto", "float32", "int8"] = "auto",
    force: bool = False,
    validate: bool = True,
    optimize: bool = True,
    block_size: int | None = None,
    lm_head_bits: int | None = None,
    symmetric: bool | None = None,
    algorithm: str | None = None,
    calibration: str | Path | None = None,
    tolerance: float = FP32_TOLERANCE,
    progress: bool = True,
) -> Manifest:
    """Export a GPT-Neo checkpoint (hub id or local directory) to a model package at `output`.

    `algorithm` chooses how quantized weights are rounded (export/scheme.py; default by
    measurement), `calibration` a UTF-8 text file for the data-aware algorithms and the int8 KV
    cache (default: the corpus that ships with neoedge)."""
    from tqdm.auto import tqdm

    output = Path(output)
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force (force=True) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    if kv_cache == "auto":
        # Quantized packages trade exactness for speed anyway; an int8 cache with calibrated scales
        # costs them no measurable quality and reads a quarter of the bytes. fp32 stays exact.
        kv_cache = "int8" if quantize != "none" and attention == "gqa" else "float32"
    if kv_cache == "int8" and attention != "gqa":
        raise ExportError("an int8 KV cache needs --attention gqa")
    try:
        scheme = make_scheme(quantize, block_size=block_size, lm_head_bits=lm_head_bits, symmetric=symmetric,
                             algorithm=algorithm)
        calibrated = kv_cache == "int8" or (scheme is not None and scheme.data_aware)
        if calibration is not None and not calibrated:
            raise ValueError("--calibration has no effect here: fp32 or round-to-nearest weights "
                             "with a float32 KV cache use no calibration text")
        calibration_text = read_calibration(calibration) if calibrated else None
    except ValueError as exc:
        raise ExportError(str(exc)) from exc

    steps = ["load checkpoint", "build graph", "write package", "validate", "move into place"]
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        bar.set_postfix_str(steps[0])
        checkpoint = load_checkpoint(source)
        bar.update()

        bar.set_postfix_str(steps[1])
        graph_info = GraphInfo(file=MODEL_FILE, attention=attention, kv_cache=kv_cache)
        layers = tqdm(total=checkpoint.info.num_layers, desc="calibrate and quantize" if calibrated else "quantize",
                      unit="layer", leave=False, disable=not progress or (scheme is None and not calibrated))
        try:
            batches = None
            if calibration_text is not None:
                batches = calibration_batches(checkpoint.tokenizer_json, calibration_text,
                                              length=min(checkpoint.info.context_length, DEFAULT_LENGTH))
            quantized = quantize_weights(checkpoint.weights(), scheme, checkpoint.info.num_layers,
                                         model=checkpoint.model, calibration=batches, on_layer=layers.update)
            with ExternalWeights(staging / WEIGHTS_FILE) as weights_file:
                storage = WeightStorage(scheme.accuracy_level) if scheme else WeightStorage()
                model = build_decoder(checkpoint.info, quantized.weights, graph_info, storage,
                                      layer_norm_eps=checkpoint.layer_norm_eps, kv_scales=quantized.kv_scales,
                                      weights_file=weights_file)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
        finally:
            layers.close()
        bar.update()

        bar.set_postfix_str(steps[2])
        onnx.save_model(model, str(staging / MODEL_FILE))
        del model
        if optimize:
            _optimize_graph(staging / MODEL_FILE)
        (staging / TOKENIZER_FILE).write_text(checkpoint.tokenizer_json, encoding="utf-8")
        manifest = Manifest(
            model=checkpoint.info,
            graph=graph_info,
            quantization=Quantization(scheme=quantize, settings=quantized.settings),
            files=file_entries(staging),
            generation={"max_new_tokens": 128},
            tokenizer=TOKENIZER_FILE,
            created_by=f"neoedge {__version__}",
        )
        manifest.write(staging)
        bar.update()

        if validate:
            bar.set_postfix_str(steps[3])
            exact = quantize == "none" and kv_cache == "float32"
            report = validate_package(staging, checkpoint.model, tolerance=tolerance if exact else None)
            log.info("validation against transformers: %s", report)
            if exact and not report["passed"]:
                raise ExportError(f"validation failed: {describe_failure(report)}")
            manifest = replace(manifest, validation=report)
            manifest.write(staging)
        bar.update()

        bar.set_postfix_str(steps[4])
        _move_into_place(staging, output)
        bar.update()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    return manifest


def _optimize_graph(path: Path) -> None:
    """Replace the graph with onnxruntime's optimized form (fused LayerNorm/SkipLayerNorm, Gelu, ...)
    so that loading it does less work.

    Only the hardware-independent EXTENDED level is saved: graphs optimized at ALL may hold layouts
    specific to the exporting CPU. The runtime still runs the ALL level at load, on an already fused graph.
    """
    import onnxruntime as ort

    optimized, optimized_weights = path.with_name("optimized.onnx"), "optimized.onnx.data"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # Nothing runs in this session: repacking the weights would only cost time and a second copy.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     optimized_weights)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     "1024")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized.replace(path)
    path.with_name(optimized_weights).replace(path.with_name(WEIGHTS_FILE))
    # The optimized graph names the file it was written with; point it at the package's name.
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = WEIGHTS_FILE
    onnx.save_model(model, str(path))


def _move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` with the finished package; the old one is removed only after the swap."""
    previous = None
    if output.exists():
        previous = output.with_name(f".{output.name}.old")
        shutil.rmtree(previous, ignore_errors=True)
        output.rename(previous)
    staging.rename(output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
