"""Load a GPT-Neo checkpoint (hub id or local directory) and check that it is one we can export exactly.

Every config transformers loads as a GPTNeoForCausalLM either exports exactly or is refused here with
an ExportError naming the field: nothing is guessed, clamped or silently changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoedge.errors import ExportError
from neoedge.manifest import ModelInfo

from .activations import ACTIVATIONS
from .graph import Weights

log = logging.getLogger(__name__)

SUPPORTED = "GPT-Neo (model_type 'gpt_neo', GPTNeoForCausalLM), e.g. EleutherAI/gpt-neo-125m, -1.3B, -2.7B"


@dataclass
class Checkpoint:
    source: str
    model: Any  # transformers.GPTNeoForCausalLM, in eval mode, fp32
    info: ModelInfo
    tokenizer_json: str
    layer_norm_eps: float
    activation: str  # config.activation_function, one of graph.ACTIVATIONS
    tied_embeddings: bool  # lm_head is the token embedding table (GPT-Neo's usual layout)

    def weights(self) -> Weights:
        arrays = {name: tensor.detach().float().numpy() for name, tensor in self.model.state_dict().items()}
        if self.tied_embeddings:
            # The same storage as transformer.wte.weight: the graph stores the table once.
            arrays.pop("lm_head.weight", None)
        return Weights(arrays)


def load_checkpoint(source: str) -> Checkpoint:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPTNeoForCausalLM

    path = Path(source)
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ExportError(f"checkpoint directory not found: {source}")
    if path.exists() and not path.is_dir():
        raise ExportError(f"{source} is a file, not a checkpoint directory")
    if path.exists() and not (path / "config.json").is_file():
        raise ExportError(f"{source} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ExportError(f"cannot load the config of {source!r}: {exc}") from exc
    if config.model_type != "gpt_neo":
        raise ExportError(f"{source} is a {config.model_type!r} model; neoedge exports {SUPPORTED}")
    check_config(config, source)
    try:
        model, loading = GPTNeoForCausalLM.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise ExportError(f"cannot load the weights of {source!r}: {exc}") from exc
    model.eval()
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise ExportError(f"{source} lacks weights for {', '.join(missing[:4])}"
                          f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}: transformers would "
                          f"start them at random, so the export would not be the model")
    _check_weights_finite(model, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ExportError(f"cannot load the tokenizer of {source!r} (neoedge needs its tokenizer.json): {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json); neoedge needs one")
    if len(tokenizer) > config.vocab_size:
        raise ExportError(f"{source}: the tokenizer has {len(tokenizer)} tokens but vocab_size is "
                          f"{config.vocab_size}, so some token ids have no embedding")
    eos = _token_id(config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id,
                    "eos_token_id", config.vocab_size, source)
    bos = _token_id(config.bos_token_id if config.bos_token_id is not None else eos,
                    "bos_token_id", config.vocab_size, source)
    info = ModelInfo(
        architecture="GPTNeoForCausalLM",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        context_length=config.max_position_embeddings,
        window_size=config.window_size,
        attention_layers=tuple(config.attention_layers),
        bos_token_id=bos,
        eos_token_id=eos,
        source=source,
    )
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    log.info("loaded %s: %d layers, hidden %d, %d parameters%s", source, info.num_layers, info.hidden_size,
             sum(int(np.prod(p.shape)) for p in model.parameters()), "" if tied else ", untied lm_head")
    return Checkpoint(source=source, model=model, info=info,
                      tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                      layer_norm_eps=float(config.layer_norm_epsilon), activation=config.activation_function,
                      tied_embeddings=tied)


def check_config(config: Any, source: str) -> None:
    """Refuse, naming the field, a GPT-Neo config the export cannot reproduce exactly."""
    def positive_int(field: str, minimum: int = 1) -> int:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ExportError(f"{source}: {field} must be an integer >= {minimum}, got {value!r}")
        return value

    activation = config.activation_function
    if activation not in ACTIVATIONS:
        raise ExportError(f"{source}: activation_function {activation!r} is not supported (neoedge exports "
                          f"parameter-free activations exactly: {', '.join(sorted(ACTIVATIONS))})")
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "window_size"):
        positive_int(field)
    # A context of one position leaves nothing to generate: every prompt fills it.
    positive_int("max_position_embeddings", 2)
    if config.hidden_size % config.num_heads:
        raise ExportError(f"{source}: hidden_size {config.hidden_size} is not a multiple of num_heads "
                          f"{config.num_heads}")
    kinds = set(config.attention_layers)
    if not kinds <= {"global", "local"}:
        raise ExportError(f"{source}: attention_types may name only 'global' and 'local' layers, "
                          f"not {sorted(kinds - {'global', 'local'})}")
    eps = config.layer_norm_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ExportError(f"{source}: layer_norm_epsilon must be a positive number, got {eps!r}")


def _token_id(value: Any, field: str, vocab_size: int, source: str) -> int:
    if value is None:
        raise ExportError(f"{source}: neither the config nor the tokenizer gives an {field}")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ExportError(f"{source}: {field} must be one token id in [0, {vocab_size}), got {value!r}")
    return value


def _check_weights_finite(model: Any, source: str) -> None:
    import torch

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{source}: weight {name} holds NaN or infinite values")
