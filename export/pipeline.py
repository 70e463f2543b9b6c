"""`neoedge export`: a fixed sequence of steps, built in a staging directory beside OUT and moved
into place only when the package is complete and validated (export/destination.py says how, and
what is guaranteed when an export is interrupted; export/lock.py keeps exports to one OUT apart)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import onnx

from neoedge import __version__
from neoedge.errors import ExportError, NeoedgeError
from neoedge.manifest import GraphInfo, Manifest, ModelInfo, Quantization, QuantizationSettings, file_entries

from .calibrate import DEFAULT_LENGTH, CalibrationText, calibration_batches, read_calibration
from .destination import Staging, check_output, output_path, parent_directories, publish, remove_stale_staging
from .graph import build_decoder
from .kernel_graph import sort_opsets, write_kernel_graph
from .tiled_weights import write_tiled_kernel_graph
from .load import Checkpoint, load_checkpoint
from .lock import output_lock
from .quantize import WeightStorage
from .scheme import ALGORITHMS, QuantizationScheme, make_scheme
from .signals import cleanup_on_termination
from .validate import validate_package
from .weight_quantization import quantize_weights
from .weights_file import ExternalWeights

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# The weights live beside the graph, not inside it: onnxruntime then reads them straight from the
# file instead of parsing (and copying) a protobuf of the whole model first, which halves session
# creation for a 125M package; and protobuf could not hold a graph over 2 GB at all.
WEIGHTS_FILE = MODEL_FILE + ".data"
KERNEL_GRAPH_FILE = "model.kernels.onnx"
TILED_KERNEL_GRAPH_FILE = "model.kernels.tiled.onnx"
TILED_WEIGHTS_FILE = TILED_KERNEL_GRAPH_FILE + ".data"
FP32_TOLERANCE = 1e-4
# onnxruntime 1.32's CPU GroupQueryAttention refuses, when it runs, a head size that is not a
# multiple of 8 ("head_size must be a multiple of 8"); every multiple of 8 from 8 to 512 was tried
# and runs exactly. GPT-Neo-architecture models on the hub have head sizes from 4 to 128.
GQA_HEAD_SIZE_MULTIPLE = 8

SCHEMES = ("none", "int8", "int4")
ATTENTIONS = ("auto", "gqa", "plain")
KV_CACHES = ("auto", "float32", "int8")


@dataclass(frozen=True)
class ExportOptions:
    """What to export, validated once when the export is asked for (before anything is read or
    written). "auto" attention is gqa where GroupQueryAttention can take the model's head size, else
    plain; "auto" KV cache is int8 for quantized gqa packages, float32 otherwise. `algorithm`
    chooses how quantized weights are rounded (export/scheme.py; default by measurement),
    `calibration` a UTF-8 text file for the data-aware algorithms and the int8 KV cache (default:
    the corpus that ships with neoedge)."""

    quantize: Literal["none", "int8", "int4"] = "none"
    attention: Literal["auto", "gqa", "plain"] = "auto"
    kv_cache: Literal["auto", "float32", "int8"] = "auto"
    block_size: int | None = None
    lm_head_bits: int | None = None
    symmetric: bool | None = None
    algorithm: str | None = None
    calibration: str | os.PathLike[str] | None = None
    validate: bool = True
    optimize: bool = True
    tolerance: float = FP32_TOLERANCE
    tiled_weights: bool = False
    """Also write the tiled kernel graph (export/tiled_weights.py): a faster cold start where the
    kernels tile weights, for a package about twice the size."""

    def __post_init__(self) -> None:
        for name, value, choices in (("quantize", self.quantize, SCHEMES), ("attention", self.attention, ATTENTIONS),
                                     ("kv_cache", self.kv_cache, KV_CACHES)):
            if value not in choices:
                raise ExportError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        if self.kv_cache == "int8" and self.attention == "plain":
            raise ExportError("an int8 KV cache needs the gqa attention (GroupQueryAttention), not plain")
        for name, value in (("block_size", self.block_size), ("lm_head_bits", self.lm_head_bits)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ExportError(f"{name} must be an integer, got {value!r}")
        if self.quantize == "none":
            for name, value in (("block_size", self.block_size), ("lm_head_bits", self.lm_head_bits),
                                ("symmetric", self.symmetric), ("algorithm", self.algorithm)):
                if value is not None:
                    raise ExportError(f"{name} applies to int8/int4 quantization only, and quantize is 'none'")
        if self.lm_head_bits is not None and self.lm_head_bits not in (4, 8):
            raise ExportError(f"lm_head_bits must be 4 or 8, got {self.lm_head_bits}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ExportError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.algorithm is not None and self.algorithm not in ALGORITHMS:
            raise ExportError(f"unknown quantization algorithm {self.algorithm!r}; choose one of: "
                              f"{', '.join(ALGORITHMS)}")
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)) or not os.fspath(self.calibration):
                raise ExportError(f"calibration must be a text file's path, got {self.calibration!r}")
            if self.quantize == "none" and self.kv_cache != "int8":
                raise ExportError("calibration has no effect here: an fp32 package with a float32 KV cache "
                                  "uses no calibration text")
            if self.algorithm == "rtn" and self.kv_cache == "float32":
                raise ExportError("calibration has no effect here: round-to-nearest weights with a float32 KV "
                                  "cache use no calibration text")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ExportError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        for name in ("validate", "optimize", "tiled_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ExportError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not math.isfinite(self.tolerance) or self.tolerance <= 0:
            raise ExportError(f"tolerance must be a positive number, got {self.tolerance!r}")
        if self.tiled_weights and self.quantize == "none":
            raise ExportError("tiled_weights applies to int8/int4 packages (their kernel graph), and quantize is 'none'")
        if self.tiled_weights and not (self.symmetric or (self.symmetric is None and self.quantize == "int4")):
            # The kernels tile only weights without zero points (int4's default, int8 with --symmetric).
            raise ExportError("tiled_weights needs symmetric weights (no zero points): int4's default, or "
                              "--symmetric for int8")
        if self.tolerance != FP32_TOLERANCE:
            if not self.validate:
                raise ExportError("tolerance applies to the validation, and validate is off")
            if self.quantize != "none" or self.kv_cache == "int8":
                raise ExportError("tolerance applies to exact packages (fp32 weights and KV cache); a "
                                  "quantized package is judged by the quality bounds of its precision")

    def scheme(self) -> QuantizationScheme | None:
        """The quantization scheme (None for fp32)."""
        try:
            return make_scheme(self.quantize, block_size=self.block_size, lm_head_bits=self.lm_head_bits,
                               symmetric=self.symmetric, algorithm=self.algorithm)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc

    def calibrated(self, plan: AttentionPlan) -> bool:
        """Whether the export runs the calibration pass: data-aware weights or an int8 KV cache."""
        scheme = self.scheme()
        return plan.kv_cache == "int8" or (scheme is not None and scheme.data_aware)

    def calibration_text(self) -> CalibrationText:
        """The calibration text (the built-in corpus by default); ExportError if it cannot be used."""
        try:
            return read_calibration(self.calibration)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc


@dataclass(frozen=True)
class AttentionPlan:
    """The attention implementation and KV cache the model gets, and why, if not as asked."""

    attention: Literal["gqa", "plain"]
    kv_cache: Literal["float32", "int8"]
    notes: tuple[str, ...] = ()


def plan_attention(options: ExportOptions, model: ModelInfo) -> AttentionPlan:
    gqa_fits = model.head_size % GQA_HEAD_SIZE_MULTIPLE == 0
    why_not = (f"onnxruntime's GroupQueryAttention needs a head size that is a multiple of "
               f"{GQA_HEAD_SIZE_MULTIPLE}, and this model's is {model.head_size} "
               f"(hidden_size {model.hidden_size} / num_heads {model.num_heads})")
    notes: list[str] = []
    attention = options.attention
    if attention == "gqa" and not gqa_fits:
        raise ExportError(f"the gqa attention cannot take {model.source}: {why_not}; the plain attention "
                          f"can (the default, auto, picks it)")
    if options.kv_cache == "int8" and not gqa_fits:
        raise ExportError(f"an int8 KV cache needs the gqa attention, which cannot take {model.source}: {why_not}")
    if attention == "auto":
        attention = "gqa" if gqa_fits else "plain"
        if not gqa_fits:
            notes.append(f"attention is plain (standard ONNX ops, exact), not gqa: {why_not}")
    kv_cache = options.kv_cache
    if kv_cache == "auto":
        # Quantized packages trade exactness for speed anyway; an int8 cache with calibrated scales
        # costs them no measurable quality and reads a quarter of the bytes. fp32 stays exact.
        kv_cache = "int8" if options.quantize != "none" and attention == "gqa" else "float32"
        if options.quantize != "none" and attention == "plain":
            notes.append("the KV cache is float32: an int8 cache needs the gqa attention")
    for note in notes:
        log.warning("%s: %s", model.source, note)
    return AttentionPlan(attention, kv_cache, tuple(notes))


def export_package(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    quantize: Literal["none", "int8", "int4"] = "none",
    attention: Literal["auto", "gqa", "plain"] = "auto",
    kv_cache: Literal["auto", "float32", "int8"] = "auto",
    force: bool = False,
    validate: bool = True,
    optimize: bool = True,
    block_size: int | None = None,
    lm_head_bits: int | None = None,
    symmetric: bool | None = None,
    algorithm: str | None = None,
    calibration: str | os.PathLike[str] | None = None,
    tolerance: float = FP32_TOLERANCE,
    tiled_weights: bool = False,
    progress: bool = True,
) -> Manifest:
    """Export a GPT-Neo checkpoint (hub id or local directory) to a model package at `output`.

    `output` must not exist, or (with `force`) hold a neoedge package, which is then replaced in one
    step. Nothing else is ever removed or overwritten. Raises ExportError (OutputExistsError if
    `output` holds a package and `force` is not set)."""
    options = ExportOptions(quantize=quantize, attention=attention, kv_cache=kv_cache, block_size=block_size,
                            lm_head_bits=lm_head_bits, symmetric=symmetric, algorithm=algorithm,
                            calibration=calibration, validate=validate,
                            optimize=optimize, tolerance=tolerance, tiled_weights=tiled_weights)
    if not isinstance(force, bool):
        raise ExportError(f"force must be True or False, got {force!r}")
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ExportError(f"source must be a hub id or a checkpoint directory, got {source!r}")
    source = os.fspath(source)
    output = output_path(output)
    options.scheme()  # a block size the scheme cannot use is refused before anything is read
    if options.calibration is not None:
        options.calibration_text()  # and so is a calibration file that cannot be used
    check_output(output, force=force)
    with cleanup_on_termination(), parent_directories(output), output_lock(output):
        # Holding the lock: no other export to OUT runs, so leftovers of interrupted ones can go, and
        # OUT is checked again (another export may have written it since the first check).
        remove_stale_staging(output)
        replacing = check_output(output, force=force)
        return _export(source, output, options, replacing, progress)


def _export(source: str, output: Path, options: ExportOptions, replacing: bool, progress: bool) -> Manifest:
    from tqdm.auto import tqdm

    steps = ["load checkpoint", "build graph", "write package", "validate", "move into place"]
    # The steps take from a second to many minutes each: a rate or an ETA over them would mislead.
    with tqdm(total=len(steps), desc="export", unit="step", disable=not progress,
              bar_format="{desc}: {n_fmt}/{total_fmt} steps, {elapsed}{postfix}") as bar:
        bar.set_postfix_str(steps[0])
        checkpoint = load_checkpoint(source)
        plan = plan_attention(options, checkpoint.info)
        scheme = options.scheme()
        if scheme is not None:  # before any calibration runs: every weight's input width needs a block
            try:
                for width in {p.shape[1] for n, p in checkpoint.model.named_parameters()
                              if n.endswith("weight") and p.ndim == 2 and "wpe" not in n}:
                    scheme.block_for(width)
            except ValueError as exc:
                raise ExportError(f"{source}: {exc}") from None
        calibration = None
        if options.calibrated(plan):
            calibration = options.calibration_text()
        elif options.calibration is not None:
            raise ExportError(f"calibration has no effect here: {options.quantize} with round-to-nearest weights "
                              f"and a {plan.kv_cache} KV cache uses no calibration text")
        bar.update()
        staging = Staging.create(output)
        try:
            bar.set_postfix_str(steps[1])
            graph_info = GraphInfo(file=MODEL_FILE, attention=plan.attention, kv_cache=plan.kv_cache)
            settings = _build(checkpoint, graph_info, scheme, calibration, staging.package, progress)
            bar.update()

            bar.set_postfix_str(steps[2])
            if options.optimize:
                _onnxruntime_step("optimize the graph", _optimize_graph, staging.package / MODEL_FILE)
            graph_info = _add_kernel_graph(staging.package, graph_info, options.quantize)
            if options.tiled_weights:
                graph_info = _add_tiled_kernel_graph(staging.package, graph_info)
            (staging.package / TOKENIZER_FILE).write_text(checkpoint.tokenizer_json, encoding="utf-8")
            manifest = Manifest(
                model=checkpoint.info,
                graph=graph_info,
                quantization=Quantization(scheme=options.quantize, settings=settings),
                files=file_entries(staging.package),
                generation=checkpoint.generation,
                notes=plan.notes,
                tokenizer=TOKENIZER_FILE,
                created_by=f"neoedge {__version__}",
            )
            manifest.write(staging.package)
            bar.update()

            if options.validate:
                bar.set_postfix_str(steps[3])
                report = _onnxruntime_step("validate the package", validate_package, staging.package,
                                           checkpoint.model, tolerance=options.tolerance)
                for line in report.lines():
                    log.info("validation: %s", line)
                if not report.passed:
                    left = "left as it was" if replacing else "not written"
                    raise ExportError(f"validation failed: {', '.join(report.problems)} (over {report.positions} "
                                      f"positions); {output} was {left}")
                manifest = replace(manifest, validation=report)
                manifest.write(staging.package)
            bar.update()

            bar.set_postfix_str(steps[4])
            publish(staging, replace=replacing)
            bar.update()
        except OSError as exc:
            raise ExportError(f"export to {output} failed: {exc}") from exc
        finally:
            staging.discard()
    return manifest


def _build(checkpoint: Checkpoint, graph_info: GraphInfo, scheme: QuantizationScheme | None,
           calibration: CalibrationText | None, directory: Path, progress: bool) -> QuantizationSettings | None:
    """Quantize (calibrating first, if `calibration` is given) and write the decoder graph and its
    weights file into `directory`; returns the manifest's quantization settings."""
    from tqdm.auto import tqdm

    batches = None
    if calibration is not None:
        try:
            batches = calibration_batches(checkpoint.tokenizer_json, calibration,
                                          length=min(checkpoint.info.context_length, DEFAULT_LENGTH))
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    with tqdm(total=checkpoint.info.num_layers, desc="calibrate and quantize" if batches is not None else "quantize",
              unit="layer", leave=False, position=1,  # its own line under the export's, not over it
              disable=not progress or (scheme is None and batches is None)) as layers:
        try:
            quantized = quantize_weights(checkpoint.weights(), scheme, checkpoint.info.num_layers,
                                         model=checkpoint.model, calibration=batches, on_layer=layers.update)
            if graph_info.kv_cache == "int8" and quantized.kv_scales is None:
                raise ValueError("an int8 KV cache needs the calibration pass")
            storage = WeightStorage(scheme.accuracy_level) if scheme is not None else WeightStorage()
            with ExternalWeights(directory / WEIGHTS_FILE) as weights_file:
                model = build_decoder(checkpoint.info, quantized.weights, graph_info, storage,
                                      layer_norm_eps=checkpoint.layer_norm_eps, kv_scales=quantized.kv_scales,
                                      weights_file=weights_file, activation=checkpoint.activation)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc
    onnx.save_model(model, str(directory / MODEL_FILE))
    return quantized.settings


def _add_kernel_graph(directory: Path, graph_info: GraphInfo, scheme: str) -> GraphInfo:
    """Quantized packages also get the kernel graph (the stock graph with its MatMulNBits and
    int8-cache attention nodes on neoedge's native kernels, reading the same weights file), which the
    runtime loads where those kernels run faster; every other runtime reads the stock graph."""
    if scheme == "none":
        return graph_info
    report = write_kernel_graph(directory / MODEL_FILE, directory / KERNEL_GRAPH_FILE)
    log.info("%s", report.describe())
    if not (report.converted or report.attention or report.elementwise):
        (directory / KERNEL_GRAPH_FILE).unlink()  # written by this export a moment ago
        return graph_info
    return replace(graph_info, kernel_file=KERNEL_GRAPH_FILE)


def _add_tiled_kernel_graph(directory: Path, graph_info: GraphInfo) -> GraphInfo:
    """The kernel graph again, with the weights its tiled path rearranges stored rearranged in a
    weights file of its own (export/tiled_weights.py)."""
    if graph_info.kernel_file is None:
        raise ExportError("tiled weights need the kernel graph, and this package has none")
    report = write_tiled_kernel_graph(directory / graph_info.kernel_file, directory / TILED_KERNEL_GRAPH_FILE,
                                      directory / TILED_WEIGHTS_FILE)
    if report is None:
        raise ExportError("tiled weights: no MatMulNBits node of the kernel graph may tile its weights "
                          "(each has zero points or a reader outside neoedge's kernels)")
    log.info("%s", report.describe())
    return replace(graph_info, tiled_kernel_file=TILED_KERNEL_GRAPH_FILE)


def _onnxruntime_step(what: str, step, *args, **kwargs):
    """Run a step that hands the graph to onnxruntime; its errors (plain Exceptions) become ExportError."""
    try:
        return step(*args, **kwargs)
    except (NeoedgeError, OSError):
        raise
    except Exception as exc:
        raise ExportError(f"onnxruntime could not {what}: {exc}") from exc


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
    # onnxruntime creates its files with mode 0644 whatever the umask; the package's files get the
    # mode of one created like any other (the graph written by onnx.save_model).
    mode = path.stat().st_mode & 0o777
    for written in (optimized, path.with_name(optimized_weights)):
        os.chmod(written, mode)
    optimized.replace(path)
    path.with_name(optimized_weights).replace(path.with_name(WEIGHTS_FILE))
    # The optimized graph names the file it was written with; point it at the package's name.
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = WEIGHTS_FILE
    sort_opsets(model)
    onnx.save_model(model, str(path))
