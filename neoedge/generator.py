"""Load a model package once; generate text from it, whole or streamed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .crosscheck import check_graph, check_tokenizer
from .errors import OptionsError, PromptError
from .inputs import token_ids as checked_token_ids
from .options import GenerationOptions
from .package import VerifyMode, opening_package
from .runner import Runner, make_runner
from .sampling import Sampler
from .session import ORT_ERRORS, SessionSettings, create_session, run_error
from .stopping import StopMatcher
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Generator:
    """A loaded GPT-Neo model package.

    Load once and reuse: loading builds the onnxruntime session, which dominates start-up.
    One Generator runs one generation at a time (it owns one KV cache); use one per thread.
    """

    def __init__(self, package_dir: str | os.PathLike[str], *, intra_threads: int = 0,
                 spinning: bool = True, prepack: bool = True, verify: VerifyMode | bool = "auto") -> None:
        """
        package_dir: a directory written by `neoedge export`.
        intra_threads: onnxruntime threads per op (0: one per physical core).
        spinning: keep worker threads spinning between ops (faster decode, busier CPU).
        prepack: let onnxruntime repack weights at load (faster fp32 decode; slower load, and a
            second copy of fp32 weights in memory).
        verify: every file is checked against the manifest's sha256 on every load ("auto": a file a
            verified stamp shows unchanged since it was hashed is not hashed again); "full" (or True)
            hashes every byte whatever the stamps say. See neoedge.package.
        """
        if verify is True:
            verify = "full"
        settings = SessionSettings(intra_threads=intra_threads, spinning=spinning, prepack=prepack)
        self.package_dir = Path(package_dir)
        # The large files are hashed while the session is built; leaving the block waits for them.
        with opening_package(self.package_dir, verify=verify) as package:
            self.manifest = package.manifest
            if not prepack and self.manifest.quantization.scheme != "none":
                log.warning("prepack=False with an %s package: its kernels need the packed weights, decode "
                            "will be many times slower", self.manifest.quantization.scheme)
            self.session = create_session(package.graph_path, settings)
            check_graph(self.session, self.manifest, package.graph)
            self.tokenizer = Tokenizer(package.tokenizer_path)
            check_tokenizer(self.tokenizer, self.manifest)
        self._graph_path = package.graph_path
        self._runner: Runner = make_runner(self.session, self.manifest)

    @classmethod
    def from_dir(cls, package_dir: str | os.PathLike[str], **settings: Any) -> Generator:
        return cls(package_dir, **settings)

    # -- options and prompts --------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """The package's generation defaults, overridden by `options` or keyword arguments."""
        if options is not None:
            if overrides:
                raise OptionsError("pass either a GenerationOptions or keyword options, not both")
            if not isinstance(options, GenerationOptions):
                raise OptionsError(f"options must be a GenerationOptions, got {type(options).__name__}")
            return options
        return GenerationOptions.merged(self.manifest.generation.as_options(), overrides)

    def encode_prompt(self, prompt: str) -> list[int]:
        context = self.manifest.model.context_length
        ids = self.tokenizer.encode(prompt, max_tokens=context - 1, why=self._context_note)
        if not ids:
            # Nothing to condition on: start from <|endoftext|>, as GPT-Neo was trained.
            ids = [self.manifest.model.bos_token_id]
        return ids

    @property
    def _context_note(self) -> str:
        return (f" (the model's context is {self.manifest.model.context_length}, one position of it "
                "left for generation)")

    # -- generation -----------------------------------------------------------------------------
    def generate_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions) -> Iterator[int]:
        """Yield new token ids one at a time. Closing the iterator stops the work."""
        model = self.manifest.model
        ids = checked_token_ids(prompt_ids, vocab_size=model.vocab_size, max_length=model.context_length - 1,
                                what="prompt_ids", why=self._context_note)
        if not isinstance(options, GenerationOptions):
            raise OptionsError(f"options must be a GenerationOptions, got {type(options).__name__}")
        capacity = min(model.context_length, len(ids) + options.max_new_tokens)
        if len(ids) + options.max_new_tokens > model.context_length:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceeds the context (%d): "
                        "generation stops at the context limit",
                        len(ids), options.max_new_tokens, model.context_length)
        sampler = Sampler(options, model.vocab_size, ids)
        runner = self._runner
        runner.reset(capacity)

        try:
            logits = runner.prefill(ids)
        except ORT_ERRORS as exc:
            raise run_error(exc, f"the prefill of {len(ids)} tokens", self._graph_path) from exc
        for produced in range(1, options.max_new_tokens + 1):
            token = sampler(logits)
            if token == model.eos_token_id and options.stop_at_eos:
                return
            yield token
            if produced == options.max_new_tokens or runner.length == capacity:
                return
            try:
                logits = runner.step(token)
            except ORT_ERRORS as exc:
                raise run_error(exc, f"the decode step at position {runner.length}", self._graph_path) from exc

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
        model = self.manifest.model
        ids = checked_token_ids(token_ids, vocab_size=model.vocab_size, max_length=model.context_length,
                                why=f" (the model's context is {model.context_length})")
        self._runner.reset(len(ids))
        try:
            return self._runner.prefill(ids, all_logits=True)
        except ORT_ERRORS as exc:
            raise run_error(exc, f"scoring {len(ids)} tokens", self._graph_path) from exc

    def stepwise_logits(self, token_ids: Sequence[int], *, prefill: int = 1) -> np.ndarray:
        """Logits as generation sees them: prefill the first `prefill` tokens, then one step per
        token through the KV cache. [len(token_ids), vocab]; used to validate the cache path."""
        model = self.manifest.model
        ids = checked_token_ids(token_ids, vocab_size=model.vocab_size, max_length=model.context_length,
                                why=f" (the model's context is {model.context_length})")
        if isinstance(prefill, bool) or not isinstance(prefill, int) or not 1 <= prefill <= len(ids):
            raise PromptError(f"prefill must be an integer from 1 to len(token_ids) ({len(ids)}), got {prefill!r}")
        out = np.empty((len(ids), model.vocab_size), np.float32)
        self._runner.reset(len(ids))
        try:
            out[:prefill] = self._runner.prefill(ids[:prefill], all_logits=True)
            for position in range(prefill, len(ids)):
                out[position] = self._runner.step(int(ids[position]))
        except ORT_ERRORS as exc:
            raise run_error(exc, f"step-wise scoring of {len(ids)} tokens", self._graph_path) from exc
        return out
