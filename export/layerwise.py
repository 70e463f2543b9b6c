"""The calibration pass: a GPT-Neo run over calibration text one layer at a time, quantizing each
weight group as soon as its inputs are known.

Data-aware quantization needs the inputs of every weight MatMul. They are taken from the model as
the package will compute it: each group is quantized from the inputs that the already-quantized
groups before it produce (GPTQ's sequential order), and the next group's inputs are computed with
the quantized weights. The pass also records each layer's largest |key| and |value| per channel for
an int8 KV cache, from the keys and values the quantized model makes.

The tied table is the one exception: it is quantized last, from the lm_head's inputs, so the pass
looks tokens up in the fp32 table.

Only one layer's activations exist at a time (a few hundred MB at 2.7B for 16k tokens), and the
checkpoint's own weights are never modified: a 2.7B model is quantized within its fp32 footprint.
The forward pass is written out here (transformers' GPTNeoBlock cannot run with replaced weights
without mutating the model); tests/test_quantization.py checks it against transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .blockwise import QuantizedTensor
from .weights import Tensor

# Weight groups: weights that read the same inputs, quantized together.
# LM_HEAD is the tied table; UNTIED_LM_HEAD an lm_head with its own weight (the token table is then
# quantized on its own, outside the pass).
QKV, OUT_PROJ, C_FC, C_PROJ, LM_HEAD, UNTIED_LM_HEAD = "qkv", "out_proj", "c_fc", "c_proj", "lm_head", "untied_lm_head"


@dataclass(frozen=True)
class GroupResult:
    """A group's weights as stored. With `input_scales` [in] (AWQ), the stored weights are the
    originals times these per-input factors, and the inputs must be divided by them: the pass folds
    that division into the op before the group (a LayerNorm, or the value projection's rows)."""

    quantized: list[QuantizedTensor]
    input_scales: np.ndarray | None = None


# (group, layer (-1 for lm_head), weights [out, in] float32, inputs [tokens, in] float32 torch tensor,
#  whether input scales can be folded into the op before it) -> the group as stored.
GroupQuantizer = Callable[[str, int, list[np.ndarray], Any, bool], GroupResult]


@dataclass(frozen=True)
class PassResult:
    updates: dict[str, Tensor]  # quantized weights and folded LayerNorm weights, by transformers name
    kv_maxima: list[tuple[np.ndarray, np.ndarray]]  # per layer: max |key|, max |value| per channel [hidden]


def run_layers(model: Any, batches: np.ndarray, quantize_group: GroupQuantizer | None = None, *,
               tied: bool = True, on_layer: Callable[[], None] | None = None) -> PassResult:
    """Run `model` (transformers GPTNeoForCausalLM) over `batches` (int64 [sequences, length]) layer
    by layer. With `quantize_group`, every weight group is quantized in order (q/k/v, out_proj,
    c_fc, c_proj of each layer, then the tied table as the lm_head) and the pass continues with the
    quantized weights; without, it runs the fp32 model (the KV cache maxima only). With `tied`
    False the lm_head group is the model's own lm_head weight, not the token table."""
    import torch
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    config = model.config
    # The MLP's activation exactly as transformers computes it (export/activations.py writes the
    # same definition into the graph).
    activation = ACT2FN[config.activation_function]
    body = model.transformer
    hidden_size, heads, eps = config.hidden_size, config.num_heads, config.layer_norm_epsilon
    ids = torch.from_numpy(np.ascontiguousarray(batches, dtype=np.int64))
    count, length = ids.shape
    updates: dict[str, Tensor] = {}
    kv_maxima = []

    def group(name: str, layer: int, modules: dict[str, Any], x: torch.Tensor, foldable: bool
              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The weights the package will compute with (dequantized, input scales undone), and the
        input scales to fold into the op before the group. `modules` by their weight's name."""
        weights = [m.weight.detach() for m in modules.values()]
        if quantize_group is None:
            return weights, None
        result = quantize_group(name, layer, [w.numpy() for w in weights], x.reshape(-1, x.shape[-1]), foldable)
        if result.input_scales is not None and not foldable:
            raise ValueError(f"{name}: input scales returned for a group with nothing to fold them into")
        scales = None if result.input_scales is None else torch.from_numpy(result.input_scales.astype(np.float32))
        effective = []
        for weight_name, quantized in zip(modules, result.quantized):
            updates[weight_name] = quantized
            w = torch.from_numpy(quantized.dequantize())
            effective.append(w if scales is None else w / scales)
        return effective, scales

    def fold_norm(prefix: str, norm: Any, scales: torch.Tensor | None) -> None:
        """Divide a LayerNorm's output by `scales` (its weight and bias) in the stored weights; the
        pass itself goes on with the unscaled output and the weights divided back."""
        if scales is not None:
            updates[f"{prefix}.weight"] = (norm.weight.detach() / scales).numpy()
            updates[f"{prefix}.bias"] = (norm.bias.detach() / scales).numpy()

    with torch.no_grad():
        h = body.wte.weight.detach()[ids] + body.wpe.weight.detach()[:length][None]
        for index, (block, kind) in enumerate(zip(body.h, config.attention_layers)):
            p = f"transformer.h.{index}"
            attention = block.attn.attention
            x = F.layer_norm(h, (hidden_size,), block.ln_1.weight, block.ln_1.bias, eps)
            projections = {f"{p}.attn.attention.{n}_proj.weight": getattr(attention, f"{n}_proj") for n in "qkv"}
            (wq, wk, wv), scales = group(QKV, index, projections, x, True)
            fold_norm(f"{p}.ln_1", block.ln_1, scales)
            q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
            del x
            context = _attention(q, k, v, heads, config.window_size if kind == "local" else None)
            key_max, value_max = k.abs().amax(dim=(0, 1)), v.abs().amax(dim=(0, 1))
            del q, k, v
            (wo,), scales = group(OUT_PROJ, index, {f"{p}.attn.attention.out_proj.weight": attention.out_proj},
                                  context, True)
            if scales is not None:
                # out_proj's inputs are the values mixed by attention, which is linear in them per
                # channel: dividing the value projection's rows by the scales divides its inputs.
                v_name = f"{p}.attn.attention.v_proj.weight"
                updates[v_name] = updates[v_name].with_row_scales(1.0 / scales.numpy())
                value_max = value_max / scales
            kv_maxima.append((key_max.numpy(), value_max.numpy()))
            h = h + context @ wo.T + attention.out_proj.bias
            del context
            x = F.layer_norm(h, (hidden_size,), block.ln_2.weight, block.ln_2.bias, eps)
            (wfc,), scales = group(C_FC, index, {f"{p}.mlp.c_fc.weight": block.mlp.c_fc}, x, True)
            fold_norm(f"{p}.ln_2", block.ln_2, scales)
            a = _mlp_activation(x, wfc, block.mlp.c_fc.bias, activation)
            del x
            # The activation is not linear: nothing before c_proj can absorb input scales.
            (wproj,), _ = group(C_PROJ, index, {f"{p}.mlp.c_proj.weight": block.mlp.c_proj}, a, False)
            h = h + a @ wproj.T + block.mlp.c_proj.bias
            del a
            if on_layer is not None:
                on_layer()
        if quantize_group is not None:
            x = F.layer_norm(h, (hidden_size,), body.ln_f.weight, body.ln_f.bias, eps)
            if tied:
                # The table is also the token lookup, which reads it unscaled: nothing to fold into.
                group(LM_HEAD, -1, {"transformer.wte.weight": body.wte}, x, False)
            else:  # ln_f is followed by nothing else, but an untied head keeps the plain layout
                group(UNTIED_LM_HEAD, -1, {"lm_head.weight": model.lm_head}, x, False)
    return PassResult(updates, kv_maxima)


def _mlp_activation(x: Any, weight: Any, bias: Any, activation: Callable[[Any], Any]) -> Any:
    """activation(x @ weight.T + bias) over [sequences, length, hidden] x, a few hundred tokens at a
    time: transformers' GELU is several elementwise passes, and over a cache-sized slice they cost
    half what they cost over all the calibration tokens' [tokens, 4 x hidden] at once."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty((flat.shape[0], weight.shape[0]), dtype=flat.dtype)
    for start in range(0, flat.shape[0], ACTIVATION_TOKENS):
        out[start:start + ACTIVATION_TOKENS] = activation(flat[start:start + ACTIVATION_TOKENS] @ weight.T + bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


ACTIVATION_TOKENS = 512


def _attention(q: Any, k: Any, v: Any, heads: int, window: int | None) -> Any:
    """GPT-Neo attention over [sequences, length, hidden] q/k/v: no 1/sqrt(head size) scaling,
    causal, and on local layers only the last `window` positions (the current one included)."""
    import torch

    count, length, hidden = q.shape
    head_size = hidden // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(count, length, heads, head_size).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    positions = torch.arange(length)
    distance = positions[:, None] - positions[None, :]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    out = torch.empty_like(q)
    # A few sequences at a time: the scores of all of them at once would take count x heads x
    # length^2 floats (GBs at 2.7B) if the kernel materialized them. torch's fused attention with
    # scale 1 is GPT-Neo's (every row sees at least its own position, so no row is all -inf), 5x
    # faster than scores, mask and softmax as separate passes.
    chunk = max(1, (64 << 20) // (heads * length * length))
    for start in range(0, count, chunk):
        out[start:start + chunk] = torch.nn.functional.scaled_dot_product_attention(
            q[start:start + chunk], k[start:start + chunk], v[start:start + chunk], attn_mask=visible, scale=1.0)
    return out.transpose(1, 2).reshape(count, length, hidden)


FISHER_FLOATS = 1 << 28  # float32s: 1 GiB


def embedding_fisher(model: Any, batches: np.ndarray) -> np.ndarray:
    """float64 [hidden, hidden]: the mean over calibration positions of g g^T, g the gradient of the
    next-token loss with respect to the token embedding at that position (the empirical Fisher).

    The tied table is also the token lookup, and its rows' errors are judged by what they do
    downstream, not by their own size: this is the second moment that weighs them (GPTQ's H for
    the lookup). It has strong off-diagonal structure: its diagonal alone does little. A few
    sequences at a time through transformers' model (weights untouched: only the embeddings ask
    for gradients), within a memory budget, so a 2.7B model needs the activations of one."""
    import torch

    hidden = model.config.hidden_size
    fisher = torch.zeros((hidden, hidden), dtype=torch.float64)
    table = model.transformer.wte.weight.detach()
    was_grad = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    sequences = np.ascontiguousarray(batches, dtype=np.int64)
    # A few sequences per pass (all have the same length: no padding, and each position's gradient
    # is its own sequence's): one sequence's matrix products are too small to run at full speed. At
    # most FISHER_FLOATS of activations and logits kept for the backward pass, so that a 2.7B model
    # still takes one sequence at a time.
    length = sequences.shape[1]
    per_sequence = length * (16 * hidden * model.config.num_layers + 3 * model.config.vocab_size)
    step = max(1, min(len(sequences), FISHER_FLOATS // per_sequence))
    # A second moment of gradients needs a few significant digits, not fp32's seven: where the CPU
    # multiplies bfloat16 natively (AVX512-BF16, AMX) the passes run in it, in half the time
    # (the sampling error of a few thousand positions is far larger than bfloat16's rounding).
    # Elsewhere bfloat16 would be emulated, slower than fp32. The backward pass keeps a bfloat16
    # copy of every weight it multiplies by (2 bytes a parameter: 5 GB at 2.7B, beside the fp32
    # model), so only models whose copy fits the activations' budget take it.
    parameters = sum(p.numel() for p in model.parameters())
    bfloat16 = 2 * parameters <= 4 * FISHER_FLOATS and _native_bfloat16()
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16)
    # GPT-Neo's attention scores are unscaled (hundreds in a trained model): transformers computes
    # them in fp32 on purpose, and bfloat16 would move them by whole units. The attention modules
    # stay in fp32; the MLPs and the lm_head, most of the work, take bfloat16.
    try:
        if bfloat16:
            for block in model.transformer.h:
                block.attn.attention.forward = _in_fp32(block.attn.attention.forward)
        for first in range(0, len(sequences), step):
            ids = torch.from_numpy(sequences[first:first + step])
            embeddings = table[ids].clone().requires_grad_(True)
            with precision:
                logits = model(inputs_embeds=embeddings).logits[:, :-1]
            logits = logits.float()  # the softmax over the vocabulary in fp32, as autocast would
            # Summed, not averaged: every position's own gradient.
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            (gradient,) = torch.autograd.grad(loss, embeddings)
            g = gradient.reshape(-1, hidden).to(torch.float64)
            fisher += g.T @ g
            count += g.shape[0]
    finally:
        for p, flag in zip(model.parameters(), was_grad):
            p.requires_grad_(flag)
        for block in model.transformer.h:
            block.attn.attention.__dict__.pop("forward", None)  # back to the class's own
    return (fisher / count).numpy()


def _in_fp32(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` with autocast off and its floating-point tensor arguments in fp32."""
    import torch

    def run(*args: Any, **kwargs: Any) -> Any:
        def fp32(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        with torch.autocast("cpu", enabled=False):
            return forward(*map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})

    return run


def _native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (torch's own check; a torch without
    it counts as no)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)
