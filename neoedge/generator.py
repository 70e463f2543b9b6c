"""Load a model package once; generate text from it, whole or streamed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PromptError
from .manifest import Manifest
from .options import GenerationOptions
from .runner import Runner, make_runner
from .sampling import Sampler
from .session import SessionSettings, create_session
from .stopping import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Generator:
    """A loaded GPT-Neo model package.

    Load once and reuse: loading builds the onnxruntime session, which dominates start-up.
    One Generator runs one generation at a time (it owns one KV cache); use one per thread.
    """

    def __init__(self, package_dir: str | os.PathLike[str], *, intra_threads: int = 0,
                 spinning: bool = True, prepack: bool = True, verify: bool = False) -> None:
        """
        package_dir: a directory written by `neoedge export`.
        intra_threads: onnxruntime threads per op (0: one per physical core).
        spinning: keep worker threads spinning between ops (faster decode, busier CPU).
        prepack: let onnxruntime repack weights at load (faster fp32 decode; slower load, and a
            second copy of fp32 weights in memory).
        verify: check every file's sha256 against the manifest (reads the whole package).
        """
        self.package_dir = Path(package_dir)
        self.manifest = Manifest.read(self.package_dir)
        self.manifest.check_files(self.package_dir, verify_hashes=verify)
        self.tokenizer = Tokenizer(self.package_dir / self.manifest.tokenizer)
        settings = SessionSettings(intra_threads=intra_threads, spinning=spinning, prepack=prepack)
        if not prepack and self.manifest.quantization.scheme != "none":
            log.warning("prepack=False with an %s package: its kernels need the packed weights, decode "
                        "will be many times slower", self.manifest.quantization.scheme)
        self.session = create_session(self.package_dir / self.manifest.graph.file, settings)
        self._runner: Runner = make_runner(self.session, self.manifest)

    @classmethod
    def from_dir(cls, package_dir: str | os.PathLike[str], **settings: Any) -> Generator:
        return cls(package_dir, **settings)

    # -- options and prompts --------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """The package's generation defaults, overridden by `options` or keyword arguments."""
        if options is not None:
            if overrides:
                raise ValueError("pass either a GenerationOptions or keyword options, not both")
            return options
        return GenerationOptions.merged(self.manifest.generation, overrides)

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            # Nothing to condition on: start from <|endoftext|>, as GPT-Neo was trained.
            ids = [self.manifest.model.bos_token_id]
        self._check_prompt_length(len(ids))
        return ids

    def _check_prompt_length(self, length: int) -> None:
        context = self.manifest.model.context_length
        if length >= context:
            raise PromptError(
                f"prompt is {length} tokens but the model's context is {context}: "
                f"shorten it to at most {context - 1} tokens to leave room for generation")

    # -- generation -----------------------------------------------------------------------------
    def generate_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions) -> Iterator[int]:
        """Yield new token ids one at a time. Closing the iterator stops the work."""
        if len(prompt_ids) == 0:
            raise PromptError("prompt_ids is empty: pass at least one token (e.g. the bos id)")
        self._check_prompt_length(len(prompt_ids))
        model = self.manifest.model
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= model.vocab_size:
            raise PromptError(f"prompt token ids must be in [0, {model.vocab_size})")
        capacity = min(model.context_length, len(ids) + options.max_new_tokens)
        if len(ids) + options.max_new_tokens > model.context_length:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceeds the context (%d): "
                        "generation stops at the context limit",
                        len(ids), options.max_new_tokens, model.context_length)
        sampler = Sampler(options, model.vocab_size, ids)
        runner = self._runner
        runner.reset(capacity)

        logits = runner.prefill(ids)
        for produced in range(1, options.max_new_tokens + 1):
            token = sampler(logits)
            if token == model.eos_token_id and options.stop_at_eos:
                return
            yield token
            if produced == options.max_new_tokens or runner.length == capacity:
                return
            logits = runner.step(token)

    def stream(self, prompt: str, options: GenerationOptions | None = None, **overrides: Any) -> Iterator[str]:
        """Yield generated text as it is produced: whole characters only, stop strings withheld."""
        opts = self.options(options, **overrides)
        prompt_ids = self.encode_prompt(prompt)
        text = self.tokenizer.stream()
        stops = StopMatcher(opts.stop)
        tokens = self.generate_tokens(prompt_ids, opts)
        try:
            for token in tokens:
                chunk = stops.push(text.push(token))
                if chunk:
                    yield chunk
                if stops.stopped:
                    return
            tail = stops.push(text.flush())
            if not stops.stopped:
                tail += stops.flush()
            if tail:
                yield tail
        finally:
            tokens.close()

    def generate(self, prompt: str, options: GenerationOptions | None = None, **overrides: Any) -> str:
        """The generated continuation of `prompt` (the prompt itself is not included)."""
        return "".join(self.stream(prompt, options, **overrides))

    # -- scoring --------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position of `token_ids`: [len(token_ids), vocab] float32."""
        if len(token_ids) == 0:
            raise PromptError("token_ids is empty")
        if len(token_ids) > self.manifest.model.context_length:
            raise PromptError(f"{len(token_ids)} tokens exceed the model's context "
                              f"({self.manifest.model.context_length})")
        self._runner.reset(len(token_ids))
        return self._runner.prefill(np.asarray(token_ids, dtype=np.int64), all_logits=True)

    def stepwise_logits(self, token_ids: Sequence[int], *, prefill: int = 1) -> np.ndarray:
        """Logits as generation sees them: prefill the first `prefill` tokens, then one step per
        token through the KV cache. [len(token_ids), vocab]; used to validate the cache path."""
        if not 1 <= prefill <= len(token_ids) <= self.manifest.model.context_length:
            raise PromptError("need 1 <= prefill <= len(token_ids) <= context length")
        ids = np.asarray(token_ids, dtype=np.int64)
        out = np.empty((len(ids), self.manifest.model.vocab_size), np.float32)
        self._runner.reset(len(ids))
        out[:prefill] = self._runner.prefill(ids[:prefill], all_logits=True)
        for position in range(prefill, len(ids)):
            out[position] = self._runner.step(int(ids[position]))
        return out
