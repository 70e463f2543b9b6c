"""Load a GPT-Neo checkpoint (hub id or local directory) and check that it is one we can export exactly.

Every config transformers loads as a GPTNeoForCausalLM either exports exactly or is refused here with
an ExportError naming the field: nothing is guessed, clamped or silently changed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoedge.errors import ExportError, ManifestError
from neoedge.manifest import GenerationDefaults, ModelInfo

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
    # The package's defaults: the checkpoint's generation_config.json, as transformers reads it.
    generation: GenerationDefaults = GenerationDefaults(max_new_tokens=128)

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
    largest = max(tokenizer.get_vocab().values(), default=-1)  # ids need not be dense
    if largest >= config.vocab_size:
        raise ExportError(f"{source}: the tokenizer has token id {largest} but vocab_size is "
                          f"{config.vocab_size}, so that id has no embedding")
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
    generation = generation_defaults(_generation_config(source), source, eos)
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    log.info("loaded %s: %d layers, hidden %d, %d parameters%s", source, info.num_layers, info.hidden_size,
             sum(int(np.prod(p.shape)) for p in model.parameters()), "" if tied else ", untied lm_head")
    return Checkpoint(source=source, model=model, info=info,
                      tokenizer_json=tokenizer.backend_tokenizer.to_str(),
                      layer_norm_eps=float(config.layer_norm_epsilon), activation=config.activation_function,
                      tied_embeddings=tied, generation=generation)


# Without a generation_config.json (or a max_new_tokens in it) a package generates at most this many.
DEFAULT_MAX_NEW_TOKENS = 128
# Fields neoedge maps; the others of generation_config.json are ignored with a warning (never
# silently: num_beams, no_repeat_ngram_size, max_length ... would change what transformers generates).
MAPPED_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
_BOOKKEEPING = {"transformers_version", "_from_model_config", "_commit_hash", "bos_token_id", "pad_token_id"}


def _generation_config(source: str) -> Any | None:
    """The checkpoint's transformers GenerationConfig, or None if it has no generation_config.json."""
    from transformers import GenerationConfig

    # transformers raises OSError both for a missing file and for one it cannot parse: a local
    # checkpoint's file that exists but fails is an error, not an absence.
    local = Path(source) / "generation_config.json"
    try:
        return GenerationConfig.from_pretrained(source)
    except OSError as exc:
        if os.path.lexists(local):
            raise ExportError(f"cannot read {local}: {exc}") from exc
        log.info("%s has no generation_config.json: the package's defaults are greedy decoding, at most %d "
                 "new tokens", source, DEFAULT_MAX_NEW_TOKENS)
        return None
    except Exception as exc:
        raise ExportError(f"cannot read the generation_config.json of {source!r}: {exc}") from exc


def generation_defaults(config: Any | None, source: str, eos_token_id: int | None = None) -> GenerationDefaults:
    """The package's default generation options from a transformers GenerationConfig, meaning what
    `generate()` would do with it: greedy unless do_sample, and then transformers' own defaults for
    what the file leaves out (temperature 1, top_k 50, top_p 1). Every field set in the file that
    neoedge cannot honour is named in a warning; a value neoedge would refuse is an ExportError."""
    if config is None:
        return GenerationDefaults(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    given = config.to_diff_dict()  # only the fields the file sets to something other than the default
    values: dict[str, Any] = {"max_new_tokens": config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS}
    if config.do_sample:
        values.update(temperature=float(config.temperature if config.temperature is not None else 1.0),
                      top_k=int(config.top_k or 0), top_p=float(config.top_p if config.top_p is not None else 1.0))
    else:
        ignored = [k for k in ("temperature", "top_k", "top_p") if k in given]
        if ignored:
            log.warning("%s: generation_config.json sets %s without do_sample: transformers decodes greedily "
                        "then, and so does the package", source, ", ".join(f"{k}={given[k]!r}" for k in ignored))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        values["repetition_penalty"] = float(config.repetition_penalty)
    for key in sorted(set(given) - set(MAPPED_FIELDS) - _BOOKKEEPING):
        if key == "eos_token_id":
            eos = given[key]
            if eos != eos_token_id and eos != [eos_token_id]:
                log.warning("%s: generation_config.json's eos_token_id %r is ignored: the package ends at the "
                            "model's eos_token_id %r", source, eos, eos_token_id)
            continue
        if key == "max_length" and "max_new_tokens" not in given:
            log.warning("%s: generation_config.json's max_length=%r (prompt and output together) is ignored: "
                        "the package generates at most %d new tokens", source, given[key], values["max_new_tokens"])
            continue
        log.warning("%s: generation_config.json's %s=%r is ignored: neoedge has no such generation option",
                    source, key, given[key])
    try:
        defaults = GenerationDefaults(**values)
    except ManifestError as exc:
        raise ExportError(f"{source}: generation_config.json cannot be the package's defaults: "
                          f"{str(exc).removeprefix('generation: ')}") from None
    log.info("%s: package generation defaults %s", source, defaults.as_options())
    return defaults


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
