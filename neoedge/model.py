"""A loaded model package: immutable, shared by any number of sequences and threads.

    model = Model("gpt-neo-125m-int4")                 # manifest, tokenizer, one onnxruntime session
    print(model.generate("The meaning of life is").text)  # one call, a fresh sequence
    chat = model.sequence()                             # one conversation: its own KV cache
    chat.append("User: hi\\nAssistant:")
    reply = chat.generate(max_new_tokens=64, stop=["\\nUser:"])

Loading builds the onnxruntime session, which dominates start-up: load once, then make a sequence
per conversation. Sequences share the weights; each adds only its KV cache to memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cancel import CancelToken
from .errors import PromptError
from .events import Completion, ContinuationScore
from .generation import Stream
from .manifest import Manifest, ModelInfo
from .options import ContextPolicy, GenerationOptions
from .runner import Runner, make_runner
from .sequence import Sequence, Tokens
from .session import SessionSettings, create_session
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .aio import AsyncStream

log = logging.getLogger(__name__)


class Model:
    """A GPT-Neo model package loaded for generation and scoring. Safe to use from any thread."""

    def __init__(self, package_dir: str | os.PathLike[str], *, settings: SessionSettings | None = None,
                 verify: bool = False) -> None:
        """
        package_dir: a directory written by `neoedge export`.
        settings: onnxruntime settings (threads, spinning, prepack); defaults suit most machines.
        verify: check every file's sha256 against the manifest (reads the whole package).
        """
        package_dir = Path(package_dir)
        settings = settings or SessionSettings()
        manifest = Manifest.read(package_dir)
        manifest.check_files(package_dir, verify_hashes=verify)
        if not settings.prepack and manifest.quantization.scheme != "none":
            log.warning("prepack=False with an %s package: its kernels need the packed weights, decode "
                        "will be many times slower", manifest.quantization.scheme)
        session = create_session(package_dir / manifest.graph.file, settings)
        self._set(package_dir=package_dir, manifest=manifest, settings=settings,
                  tokenizer=Tokenizer(package_dir / manifest.tokenizer), session=session,
                  runner=make_runner(session, manifest), fingerprint=package_fingerprint(manifest))

    # Attributes are set once, here: a Model is shared between threads and never changes.
    package_dir: Path
    manifest: Manifest
    settings: SessionSettings
    tokenizer: Tokenizer
    runner: Runner
    fingerprint: str
    """Identifies the package's content (a hash of its files' hashes): saved sequences carry it."""

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a Model is immutable (it is shared by every sequence); cannot set {name}")

    @property
    def info(self) -> ModelInfo:
        return self.manifest.model

    def __repr__(self) -> str:
        return (f"Model({str(self.package_dir)!r}, {self.info.num_layers} layers, hidden {self.info.hidden_size}, "
                f"{self.manifest.quantization.scheme}, context {self.info.context_length})")

    # -- options, text and tokens -------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """The package's generation defaults, overridden by `options` or keyword arguments."""
        if options is not None:
            if overrides:
                raise ValueError("pass either a GenerationOptions or keyword options, not both")
            if not isinstance(options, GenerationOptions):
                raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
            return options
        return GenerationOptions.merged(self.manifest.generation, overrides)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def decode(self, ids: Tokens) -> str:
        return self.tokenizer.decode(self.check_tokens(ids, "token ids"))

    def check_tokens(self, ids: Tokens, what: str = "token ids") -> list[int]:
        """`ids` as a list of ints, each a token of this model; anything else is a PromptError."""
        vocab = self.info.vocab_size
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise PromptError(f"{what} must be a 1-D array of integers, got {ids.dtype} of shape {ids.shape}")
            values = ids.tolist()
        elif isinstance(ids, (list, tuple)):
            values = list(ids)
            for value in values:
                if type(value) is not int and not isinstance(value, np.integer):
                    raise PromptError(f"{what} must be integers, got {type(value).__name__} {value!r}")
            values = [int(v) for v in values]
        else:
            raise PromptError(f"{what} must be a list of integers, got {type(ids).__name__}")
        bad = [v for v in values if not 0 <= v < vocab]
        if bad:
            raise PromptError(f"{what} must be in [0, {vocab}): got {bad[0]}")
        return values

    # -- sequences ----------------------------------------------------------------------------------
    def sequence(self, text: str | None = None, *, tokens: Tokens | None = None,
                 policy: ContextPolicy | None = None) -> Sequence:
        """A new, empty sequence on this model (optionally starting with `text` or `tokens`)."""
        seq = Sequence(self, policy=policy)
        if text is not None or tokens is not None:
            seq.append(text, tokens=tokens)
        return seq

    def load_sequence(self, path: str | os.PathLike[str], *, policy: ContextPolicy | None = None) -> Sequence:
        """A sequence saved by `Sequence.save`, restored exactly. Refused if saved by another package."""
        return Sequence.load(self, path, policy=policy)

    # -- one-call generation (a fresh sequence each time) --------------------------------------------
    def stream(self, prompt: str = "", options: GenerationOptions | None = None, *,
               cancel: CancelToken | None = None, **overrides: Any) -> Stream:
        return self.sequence().stream(prompt, options, cancel=cancel, **overrides)

    def generate(self, prompt: str = "", options: GenerationOptions | None = None, *,
                 cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        """The continuation of `prompt` (not including it). An empty prompt starts from <|endoftext|>."""
        return self.stream(prompt, options, cancel=cancel, **overrides).run()

    def astream(self, prompt: str = "", options: GenerationOptions | None = None, *,
                cancel: CancelToken | None = None, **overrides: Any) -> AsyncStream:
        return self.sequence().astream(prompt, options, cancel=cancel, **overrides)

    async def agenerate(self, prompt: str = "", options: GenerationOptions | None = None, *,
                        cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        return await self.astream(prompt, options, cancel=cancel, **overrides).run()

    def score(self, prompt: str | Tokens, continuations: Seq[str | Tokens], *,
              cancel: CancelToken | None = None) -> list[ContinuationScore]:
        """Log-probabilities of each continuation after `prompt`; the prompt is processed once."""
        seq = self.sequence() if isinstance(prompt, str) and not prompt else \
            self.sequence(prompt) if isinstance(prompt, str) else self.sequence(tokens=prompt)
        return seq.score(continuations, cancel=cancel)

    # -- raw logits ---------------------------------------------------------------------------------
    def logits(self, token_ids: Tokens) -> np.ndarray:
        """Next-token logits at every position of `token_ids`: [len(token_ids), vocab] float32."""
        ids = np.asarray(self.check_tokens(token_ids), dtype=np.int64)
        self._check_length(ids)
        state = self.runner.new_state(len(ids))
        chunk = self.runner.chunk
        parts = [self.runner.forward(state, ids[i: i + chunk], all_logits=True) for i in range(0, len(ids), chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def stepwise_logits(self, token_ids: Tokens, *, prefill: int = 1) -> np.ndarray:
        """Logits as generation sees them: prefill the first `prefill` tokens, then one step per
        token through the KV cache. [len(token_ids), vocab]; used to validate the cache path."""
        ids = np.asarray(self.check_tokens(token_ids), dtype=np.int64)
        self._check_length(ids)
        if not 1 <= prefill <= len(ids):
            raise PromptError("need 1 <= prefill <= len(token_ids)")
        out = np.empty((len(ids), self.info.vocab_size), np.float32)
        state = self.runner.new_state(len(ids))
        chunk = self.runner.chunk
        for i in range(0, prefill, chunk):
            out[i: min(i + chunk, prefill)] = self.runner.forward(state, ids[i: min(i + chunk, prefill)],
                                                                  all_logits=True)
        for position in range(prefill, len(ids)):
            out[position] = self.runner.step(state, int(ids[position]))
        return out

    def _check_length(self, ids: np.ndarray) -> None:
        if ids.shape[0] == 0:
            raise PromptError("token_ids is empty")
        if ids.shape[0] > self.info.context_length:
            raise PromptError(f"{ids.shape[0]} tokens exceed the model's context ({self.info.context_length})")


def package_fingerprint(manifest: Manifest) -> str:
    """A hash of the package's files' hashes: equal for two packages exactly when their files are."""
    files = {name: entry.sha256 for name, entry in sorted(manifest.files.items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
