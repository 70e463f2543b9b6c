"""Load a GPT-Neo checkpoint (hub id or local directory) and check that it is one we can export."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoedge.errors import ExportError
from neoedge.manifest import ModelInfo

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

    def weights(self) -> Weights:
        return Weights({name: tensor.detach().float().numpy()
                        for name, tensor in self.model.state_dict().items()})


def load_checkpoint(source: str) -> Checkpoint:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPTNeoForCausalLM

    path = Path(source)
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ExportError(f"checkpoint directory not found: {source}")
    if path.exists() and not (path / "config.json").is_file():
        raise ExportError(f"{source} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ExportError(f"cannot load the config of {source!r}: {exc}") from exc
    if config.model_type != "gpt_neo":
        raise ExportError(f"{source} is a {config.model_type!r} model; neoedge exports {SUPPORTED}")
    try:
        model = GPTNeoForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ExportError(f"cannot load {source!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json); neoedge needs one")
    if not config.tie_word_embeddings:
        raise ExportError(f"{source} has an untied lm_head; neoedge supports GPT-Neo's tied embeddings")
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    bos = config.bos_token_id if config.bos_token_id is not None else eos
    info = ModelInfo(
        architecture="GPTNeoForCausalLM",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        context_length=config.max_position_embeddings,
        window_size=config.window_size,
        attention_layers=tuple(config.attention_layers),
        bos_token_id=int(bos),
        eos_token_id=int(eos),
        source=source,
    )
    log.info("loaded %s: %d layers, hidden %d, %d parameters", source, info.num_layers,
             info.hidden_size, sum(int(np.prod(p.shape)) for p in model.parameters()))
    return Checkpoint(source=source, model=model, info=info,
                      tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                      layer_norm_eps=float(config.layer_norm_epsilon))
