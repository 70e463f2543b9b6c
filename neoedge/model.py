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
from .crosscheck import check_graph, check_tokenizer
from .errors import OptionsError, PromptError
from .events import Completion, ContinuationScore
from .generation import Stream
from .inputs import token_ids
from .manifest import Manifest, ModelInfo
from .options import ContextPolicy, GenerationOptions
from .package import VerifyMode, opening_package
from .runner import Runner, make_runner
from .sequence import Sequence, Tokens
from .kernels import KernelInfo
from .session import SessionSettings, create_session
from .tokenizer import Tokenizer, check_text

if TYPE_CHECKING:
    from .aio import AsyncStream

log = logging.getLogger(__name__)
# Tokens one decode call takes: far beyond any context, a bound on the work one call can ask for.
MAX_DECODE_TOKENS = 1 << 22


class Model:
    """A GPT-Neo model package loaded for generation and scoring. Safe to use from any thread."""

    def __init__(self, package_dir: str | os.PathLike[str], *, settings: SessionSettings | None = None,
                 verify: VerifyMode = "auto") -> None:  # noqa: D417
        """
        package_dir: a directory written by `neoedge export`.
        settings: onnxruntime settings (threads, spinning, prepack); defaults suit most machines.
        verify: every load checks every file against the manifest's sha256 (see neoedge.package);
            "auto" skips a file a verified stamp shows unchanged since it was last hashed, "full"
            hashes every byte whatever the stamps say.
        """
        package_dir = Path(package_dir)
        settings = settings or SessionSettings()
        if not isinstance(settings, SessionSettings):
            raise OptionsError(f"settings must be a SessionSettings, got {type(settings).__name__}")
        # The large files are hashed while the session is built; leaving the block waits for them.
        with opening_package(package_dir, verify=verify) as package:
            manifest = package.manifest
            if not settings.prepack and manifest.quantization.scheme != "none":
                log.warning("prepack=False with an %s package: its kernels need the packed weights, decode "
                            "will be many times slower", manifest.quantization.scheme)
            loaded = create_session(package.graph_path, settings, package.kernel_graph_path,
                                    package.tiled_kernel_graph_path)
            session = loaded.session
            graph = package.graph_at(loaded.path)
            check_graph(session, manifest, graph)
            tokenizer = Tokenizer(package.tokenizer_path)
            check_tokenizer(tokenizer, manifest)
        self._set(package_dir=package_dir, manifest=manifest, settings=settings, tokenizer=tokenizer,
                  session=session, runner=make_runner(session, manifest, loaded.path, graph), kernels=loaded.kernels,
                  fingerprint=package_fingerprint(manifest))

    # Attributes are set once, here: a Model is shared between threads and never changes.
    package_dir: Path
    manifest: Manifest
    settings: SessionSettings
    tokenizer: Tokenizer
    runner: Runner
    kernels: KernelInfo
    """Which kernels run the weight MatMuls: neoedge's native ones (and on which CPU path), or
    onnxruntime's stock ones, and why."""
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
                raise OptionsError("pass either a GenerationOptions or keyword options, not both")
            if not isinstance(options, GenerationOptions):
                raise OptionsError(f"options must be a GenerationOptions, got {type(options).__name__}")
            return options
        return GenerationOptions.merged(self.manifest.generation, overrides)

    def encode(self, text: str, *, what: str = "prompt") -> list[int]:
        """Token ids of `text` (no special tokens added). A text too long for the context is refused
        from its length, before any tokenizing."""
        context = self.info.context_length
        return self.tokenizer.encode(text, max_tokens=context, what=what,
                                     why=f" (the model's context is {context} tokens)")

    def decode(self, ids: Tokens) -> str:
        """Text of `ids`. Not bounded by the context: a generation that shifted it made more tokens."""
        return self.tokenizer.decode(token_ids(ids, vocab_size=self.info.vocab_size, max_length=MAX_DECODE_TOKENS,
                                               what="token ids", why=" (decode takes at most that many)",
                                               allow_empty=True).tolist())

    def check_tokens(self, ids: Tokens, what: str = "token ids") -> list[int]:
        """`ids` as a list of ints, each a token of this model, at most a context of them; anything
        else is a PromptError naming the element."""
        context = self.info.context_length
        return token_ids(ids, vocab_size=self.info.vocab_size, max_length=context, what=what,
                         why=f" (the model's context is {context} tokens)", allow_empty=True).tolist()

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
        check_text(prompt, "prompt")
        return self.sequence().stream(prompt, options, cancel=cancel, **overrides)

    def generate(self, prompt: str = "", options: GenerationOptions | None = None, *,
                 cancel: CancelToken | None = None, **overrides: Any) -> Completion:
        """The continuation of `prompt` (not including it). An empty prompt starts from <|endoftext|>."""
        return self.stream(prompt, options, cancel=cancel, **overrides).run()

    def astream(self, prompt: str = "", options: GenerationOptions | None = None, *,
                cancel: CancelToken | None = None, **overrides: Any) -> AsyncStream:
        check_text(prompt, "prompt")
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
        ids = self._ids(token_ids)
        state = self.runner.new_state(len(ids))
        chunk = self.runner.chunk
        parts = [self.runner.forward(state, ids[i: i + chunk], all_logits=True) for i in range(0, len(ids), chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def stepwise_logits(self, token_ids: Tokens, *, prefill: int = 1) -> np.ndarray:
        """Logits as generation sees them: prefill the first `prefill` tokens, then one step per
        token through the KV cache. [len(token_ids), vocab]; used to validate the cache path."""
        ids = self._ids(token_ids)
        if isinstance(prefill, bool) or not isinstance(prefill, int) or not 1 <= prefill <= len(ids):
            raise PromptError(f"prefill must be an integer from 1 to len(token_ids) ({len(ids)}), got {prefill!r}")
        out = np.empty((len(ids), self.info.vocab_size), np.float32)
        state = self.runner.new_state(len(ids))
        chunk = self.runner.chunk
        for i in range(0, prefill, chunk):
            out[i: min(i + chunk, prefill)] = self.runner.forward(state, ids[i: min(i + chunk, prefill)],
                                                                  all_logits=True)
        for position in range(prefill, len(ids)):
            out[position] = self.runner.step(state, int(ids[position]))
        return out

    def _ids(self, ids: Tokens) -> np.ndarray:
        context = self.info.context_length
        return token_ids(ids, vocab_size=self.info.vocab_size, max_length=context,
                         why=f" (the model's context is {context} tokens)")


def package_fingerprint(manifest: Manifest) -> str:
    """A hash of the package's files' hashes: equal for two packages exactly when their files are."""
    files = {name: entry.sha256 for name, entry in sorted(manifest.files.items())}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
