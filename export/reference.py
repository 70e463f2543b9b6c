"""GPT-Neo's forward pass in float64: the exact answer that two fp32 implementations are judged by.

transformers' fp32 logits are themselves rounded. For small models the rounding is far below the
1e-4 that the export's validation demands, but it grows with width and depth: at the gpt-neo-1.3B
shape transformers' own fp32 logits differ from the exact ones by ~5e-4, so two correct fp32
implementations cannot agree to 1e-4 there. When they do not, the export asks this reference which
of them is off, and by how much.

Written out with numpy, one layer at a time (each layer's weights are converted to float64 only
while it runs, so a 2.7B model needs little memory beyond its fp32 copy); only the MLP's activation
is transformers' own module, applied to float64 values. transformers' model cannot serve: its
GPT-Neo attention casts queries and keys to float32 whatever the model's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _layer_norm(x: np.ndarray, module: Any, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _f64(module.weight) + _f64(module.bias)


def _f64(tensor: Any) -> np.ndarray:
    # detach(): no autograd graph is recorded, so no torch.no_grad() is needed around the pass.
    return tensor.detach().double().numpy()


def _linear(x: np.ndarray, module: Any) -> np.ndarray:
    out = x @ _f64(module.weight).T
    return out + _f64(module.bias) if module.bias is not None else out


def _activation(x: np.ndarray, module: Any) -> np.ndarray:
    # transformers' own activation module, run in float64: whatever `activation_function` names, the
    # reference computes exactly its definition (the export accepts only parameter-free ones).
    import torch

    return module(torch.from_numpy(x)).numpy()


def exact_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """Logits [positions, vocab] of a transformers GPTNeoForCausalLM for `ids`, computed in float64."""
    config, body = model.config, model.transformer
    eps, heads = config.layer_norm_epsilon, config.num_heads
    count, head_size = len(ids), config.hidden_size // heads
    positions = np.arange(count)
    distance = positions[:, None] - positions[None, :]
    causal = distance >= 0
    # GPT-Neo's local window holds window_size positions, the current one included.
    local = causal & (distance < config.window_size)
    hidden = _f64(body.wte.weight)[ids] + _f64(body.wpe.weight)[positions]
    for block, kind in zip(body.h, config.attention_layers):
        attention = block.attn.attention
        x = _layer_norm(hidden, block.ln_1, eps)
        q, k, v = (_linear(x, proj).reshape(count, heads, head_size).transpose(1, 0, 2)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        scores = q @ k.transpose(0, 2, 1)  # GPT-Neo does not scale its scores
        scores = np.where(local if kind == "local" else causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(count, config.hidden_size)
        hidden = hidden + _linear(context, attention.out_proj)
        x = _layer_norm(hidden, block.ln_2, eps)
        hidden = hidden + _linear(_activation(_linear(x, block.mlp.c_fc), block.mlp.act), block.mlp.c_proj)
    # lm_head.weight is the embedding table itself when tied, its own matrix when not.
    return _layer_norm(hidden, body.ln_f, eps) @ _f64(model.lm_head.weight).T
