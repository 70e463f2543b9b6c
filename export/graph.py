"""Build the GPT-Neo decoder as an ONNX graph, straight from the checkpoint's weights.

One graph serves prefill and decode. Its inputs are the new tokens, their positions, which positions
need logits, and the per-layer KV cache; its outputs are the logits and the updated cache.

Two attention implementations, recorded in the manifest:
- "gqa": onnxruntime's com.microsoft.GroupQueryAttention. The cache is a preallocated buffer of the
  whole context that the op updates in place (past and present bound to the same memory), so a decode
  step copies nothing and its cost does not grow with a concatenation.
- "plain": standard ONNX ops; the past is concatenated inside the graph. Portable and easy to read:
  the reference the fast path is checked against, and a fallback.

GPT-Neo quirks honoured here (see modeling_gpt_neo.py): no 1/sqrt(head_size) score scaling, no bias
on q/k/v projections, local layers attend to the last `window_size` positions *including* the current
one, and the lm_head is tied to the token embedding (stored once).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from neoedge.manifest import GraphInfo, ModelInfo

from .activations import ACTIVATIONS, mlp_activation
from .graph_builder import GraphBuilder
from .quantize import MS_DOMAIN, WeightStorage
from .weights import Weights, stack_outputs
from .weights_file import ExternalWeights

__all__ = ["build_decoder", "Weights"]

OPSET = 18
# transformers masks with finfo(float32).min; the same constant keeps softmax identical.
FLOAT_MIN = float(np.finfo(np.float32).min)


def build_decoder(model: ModelInfo, weights: Weights, graph_info: GraphInfo,
                  storage: WeightStorage | None = None, layer_norm_eps: float = 1e-5,
                  kv_scales: list[tuple[np.ndarray, np.ndarray]] | None = None,
                  on_layer: Callable[[], None] | None = None,
                  weights_file: ExternalWeights | None = None,
                  activation: str = "gelu_new") -> onnx.ModelProto:
    """The decoder graph. `weights` are stored as they come (fp32 arrays, or QuantizedTensors from
    the quantization step) by `storage` (default: WeightStorage()). `kv_scales` (per layer: key and
    value scales [heads, 1, head_size]) are required when graph_info.kv_cache is "int8". `on_layer`
    is called as each layer is finished (a progress bar's hook). With `weights_file` the weights go
    there as they are made, and the graph must be saved beside it. `activation` is the config's
    activation_function (one of ACTIVATIONS). An untied lm_head is read from
    weights["lm_head.weight"] when present; without it the lm_head is the token embedding table."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation_function {activation!r} has no exact ONNX form here")
    storage = storage or WeightStorage()
    g = GraphBuilder(weights_file)
    gi = graph_info
    hidden, heads, head_size = model.hidden_size, model.num_heads, model.head_size

    inputs = [
        helper.make_tensor_value_info(gi.input_ids, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(gi.position_ids, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(gi.logits_positions, TensorProto.INT64, ["logits_count"]),
    ]
    if gi.attention == "gqa":
        inputs += [
            helper.make_tensor_value_info(gi.seqlens_k, TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info(gi.total_sequence_length, TensorProto.INT32, []),
            helper.make_tensor_value_info(gi.local_seqlens_k, TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info(gi.local_total_sequence_length, TensorProto.INT32, []),
        ]
    def cache_len(kind: str, present: bool) -> str:
        if gi.attention == "gqa":
            return "local_cache_length" if kind == "local" else "cache_length"
        return "total_sequence" if present else "past_sequence"

    outputs = [helper.make_tensor_value_info(gi.logits, TensorProto.FLOAT,
                                             ["batch", "logits_count", model.vocab_size])]
    int8_cache = gi.kv_cache == "int8"
    if int8_cache and (gi.attention != "gqa" or kv_scales is None):
        raise ValueError("an int8 KV cache needs the gqa attention and calibrated scales")
    cache_type = TensorProto.INT8 if int8_cache else TensorProto.FLOAT
    for layer, kind in enumerate(model.attention_layers):
        for past, present in gi.cache_pairs(layer):
            inputs.append(helper.make_tensor_value_info(
                past, cache_type, ["batch", heads, cache_len(kind, False), head_size]))
            outputs.append(helper.make_tensor_value_info(
                present, cache_type, ["batch", heads, cache_len(kind, True), head_size]))

    # Token + learned absolute position embeddings. The token table is shared with the lm_head.
    table = storage.tied_table(g, weights["transformer.wte.weight"])
    token_embedding = storage.embedding(g, "/wte", table, gi.input_ids)
    position_table = g.initializer("transformer.wpe.weight", weights["transformer.wpe.weight"])
    positions = g.op("Gather", [position_table, gi.position_ids], "/wpe/Gather")
    h = g.op("Add", [token_embedding, positions], "/embeddings/Add")

    masks = _plain_masks(g, gi, model) if gi.attention == "plain" else {}

    def norm_params(prefix: str) -> list[str]:
        return [g.initializer(f"{prefix}.{p}", weights[f"{prefix}.{p}"]) for p in ("weight", "bias")]

    def skip_layer_norm(residual: str, x: str, bias: str, prefix: str, name: str) -> tuple[str, str]:
        """(LayerNorm(residual + x + bias), residual + x + bias) in one fused op."""
        outputs = [f"{name}/output_0", "", "", f"{name}/output_3"]
        g.node_to("SkipLayerNormalization", [residual, x, *norm_params(prefix), bias], outputs, name,
                  domain=MS_DOMAIN, epsilon=layer_norm_eps)
        return outputs[0], outputs[3]

    def bias(name: str) -> str:
        return g.initializer(name, weights[name])

    # Pre-LayerNorm blocks, written so that every residual Add, every LayerNorm and every bias is
    # fused: each block ends in a SkipLayerNormalization that also applies the next block's ln_1
    # (or ln_f after the last one), and biases ride along in SkipLayerNorm and FastGelu.
    x = g.op("LayerNormalization", [h, *norm_params("transformer.h.0.ln_1")], "/layers.0/ln_1/LayerNorm",
             axis=-1, epsilon=layer_norm_eps)
    for layer, kind in enumerate(model.attention_layers):
        p = f"transformer.h.{layer}"
        where = f"/layers.{layer}"
        # One packed projection instead of three: q, k and v have no bias in GPT-Neo.
        wqkv = stack_outputs([weights.layer(layer, f"attn.attention.{n}_proj.weight") for n in ("q", "k", "v")])
        qkv = storage.linear(g, f"{where}/attn/qkv_proj", x, wqkv)
        (past_k, present_k), (past_v, present_v) = gi.cache_pairs(layer)
        if gi.attention == "gqa":
            # scale=1.0: GPT-Neo does not scale scores. local_window_size counts the current
            # position (onnxruntime 1.32 semantics, checked by the parity tests across the window).
            # Local layers have their own, bounded cache: only relative positions matter to attention
            # (GPT-Neo adds absolute positions at the input), so it is indexed by its own lengths.
            # The packed qkv goes in as the query, key and value left empty: no Split.
            lengths = ([gi.local_seqlens_k, gi.local_total_sequence_length] if kind == "local"
                       else [gi.seqlens_k, gi.total_sequence_length])
            quantized_cache: dict = {}
            scale_inputs: list[str] = []
            if int8_cache:
                # Inputs 7-11 (rotary caches, position ids, bias, head sink) are unused; 12-13 are
                # the cache scales, one per (head, channel): attention reads int8 and dequantizes.
                k_scale, v_scale = kv_scales[layer]
                scale_inputs = ["", "", "", "", "", g.initializer(f"{p}.attn.k_cache_scale", k_scale),
                                g.initializer(f"{p}.attn.v_cache_scale", v_scale)]
                quantized_cache = dict(kv_cache_bit_width=8, k_quant_type="PER_CHANNEL",
                                       v_quant_type="PER_CHANNEL")
            g.node_to(
                "GroupQueryAttention",
                [qkv, "", "", past_k, past_v, *lengths, *scale_inputs],
                [f"{where}/attn/GQA/output_0", present_k, present_v],
                f"{where}/attn/GQA", domain=MS_DOMAIN,
                num_heads=heads, kv_num_heads=heads, scale=1.0,
                local_window_size=model.window_size if kind == "local" else -1, **quantized_cache)
            context = f"{where}/attn/GQA/output_0"
        else:
            q, k, v = g.node("Split", [qkv, g.constant([hidden] * 3)], f"{where}/attn/Split",
                             outputs=3, axis=-1)
            context = _plain_attention(g, where, q, k, v, past_k, past_v, present_k, present_v,
                                       masks[kind], heads, head_size, hidden)
        attn = storage.linear(g, f"{where}/attn/out_proj", context,
                                weights.layer(layer, "attn.attention.out_proj.weight"))
        m, h = skip_layer_norm(h, attn, bias(f"{p}.attn.attention.out_proj.bias"), f"{p}.ln_2",
                               f"{where}/ln_2/SkipLayerNorm")
        fc = storage.linear(g, f"{where}/mlp/c_fc", m, weights.layer(layer, "mlp.c_fc.weight"))
        act = mlp_activation(g, f"{where}/mlp", activation, fc, bias(f"{p}.mlp.c_fc.bias"))
        proj = storage.linear(g, f"{where}/mlp/c_proj", act, weights.layer(layer, "mlp.c_proj.weight"))
        last = layer == model.num_layers - 1
        next_norm = "transformer.ln_f" if last else f"transformer.h.{layer + 1}.ln_1"
        x, h = skip_layer_norm(h, proj, bias(f"{p}.mlp.c_proj.bias"), next_norm,
                               "/ln_f/SkipLayerNorm" if last else f"/layers.{layer + 1}/ln_1/SkipLayerNorm")
        if on_layer is not None:
            on_layer()

    h = x
    # Only the requested positions go through the lm_head (one position per decode step).
    selected = g.op("Gather", [h, gi.logits_positions], "/lm_head/select/Gather", axis=1)
    if "lm_head.weight" in weights.arrays:  # untied: its own table, stored like any weight MatMul
        storage.untied_lm_head(g, "/lm_head", weights["lm_head.weight"], selected, gi.logits)
    else:
        storage.lm_head(g, "/lm_head", table, selected, gi.logits)

    graph = g.graph("gpt_neo_decoder", inputs, outputs)
    onnx_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="neoedge")
    onnx_model.ir_version = 8
    return onnx_model


def _plain_masks(g: GraphBuilder, gi: GraphInfo, model: ModelInfo) -> dict[str, str]:
    """Boolean [sequence, total] masks, built once and shared by every layer of a kind.

    Key j is visible from query i (absolute cache positions) when j <= i, and on local layers also
    when j > i - window_size: the window holds window_size positions including i itself.
    """
    shape = g.op("Shape", [gi.cache_pairs(0)[0][0]], "/mask/past/Shape")
    past_len = g.op("Gather", [shape, g.constant(2)], "/mask/past/Gather", axis=0)
    seq_shape = g.op("Shape", [gi.input_ids], "/mask/seq/Shape")
    seq_len = g.op("Gather", [seq_shape, g.constant(1)], "/mask/seq/Gather", axis=0)
    total = g.op("Add", [past_len, seq_len], "/mask/total/Add")
    keys = g.op("Range", [g.constant(0), total, g.constant(1)], "/mask/keys/Range")
    queries = g.op("Range", [past_len, total, g.constant(1)], "/mask/queries/Range")
    queries = g.op("Unsqueeze", [queries, g.constant([1])], "/mask/queries/Unsqueeze")
    causal = g.op("LessOrEqual", [keys, queries], "/mask/causal/LessOrEqual")
    window_start = g.op("Sub", [queries, g.constant(model.window_size)], "/mask/window/Sub")
    in_window = g.op("Greater", [keys, window_start], "/mask/window/Greater")
    local = g.op("And", [causal, in_window], "/mask/local/And")
    return {"global": causal, "local": local}


def _plain_attention(g: GraphBuilder, where: str, q: str, k: str, v: str, past_k: str, past_v: str,
                     present_k: str, present_v: str, mask: str, heads: int, head_size: int,
                     hidden: int) -> str:
    split_heads = g.constant([0, 0, heads, head_size])

    def to_heads(x: str, name: str) -> str:
        x = g.op("Reshape", [x, split_heads], f"{where}/attn/{name}/Reshape")
        return g.op("Transpose", [x], f"{where}/attn/{name}/Transpose", perm=[0, 2, 1, 3])

    q = to_heads(q, "q")  # [batch, heads, sequence, head_size]
    g.node_to("Concat", [past_k, to_heads(k, "k")], [present_k], f"{where}/attn/k/Concat", axis=2)
    g.node_to("Concat", [past_v, to_heads(v, "v")], [present_v], f"{where}/attn/v/Concat", axis=2)
    keys_t = g.op("Transpose", [present_k], f"{where}/attn/kT/Transpose", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, keys_t], f"{where}/attn/scores/MatMul")  # no scaling in GPT-Neo
    scores = g.op("Where", [mask, scores, g.constant(FLOAT_MIN, np.float32)], f"{where}/attn/mask/Where")
    probs = g.op("Softmax", [scores], f"{where}/attn/Softmax", axis=-1)
    context = g.op("MatMul", [probs, present_v], f"{where}/attn/context/MatMul")
    context = g.op("Transpose", [context], f"{where}/attn/context/Transpose", perm=[0, 2, 1, 3])
    return g.op("Reshape", [context, g.constant([0, 0, hidden])], f"{where}/attn/context/Reshape")
