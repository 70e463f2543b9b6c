"""`Generator`, the 0.1 API, kept for one release as a thin layer over `Model` (deprecated).

Each call runs on a fresh sequence, so unlike 0.1 a Generator is now safe to share between threads.
New code should use `Model` and `Model.sequence()`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import PromptError
from .model import Model
from .options import GenerationOptions
from .session import SessionSettings


class Generator:
    """Deprecated: use `neoedge.Model` (same package, same settings, typed results)."""

    def __init__(self, package_dir: str | os.PathLike[str], *, intra_threads: int = 0,
                 spinning: bool = True, prepack: bool = True, verify: bool | str = "auto") -> None:
        # 0.1's verify=False meant "sizes only"; every load now checks hashes ("auto" uses stamps).
        verify = "full" if verify is True else "auto" if verify is False else verify
        warnings.warn("neoedge.Generator is deprecated: use neoedge.Model (model.generate(...).text)",
                      DeprecationWarning, stacklevel=2)
        self.model = Model(package_dir, settings=SessionSettings(
            intra_threads=intra_threads, spinning=spinning, prepack=prepack), verify=verify)
        self.package_dir = self.model.package_dir
        self.manifest = self.model.manifest
        self.tokenizer = self.model.tokenizer
        self.session = self.model.session

    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        return self.model.options(options, **overrides)

    def encode_prompt(self, prompt: str) -> list[int]:
        ids = self.model.encode(prompt) or [self.manifest.model.bos_token_id]
        if len(ids) >= self.manifest.model.context_length:
            raise PromptError(f"prompt is {len(ids)} tokens but the model's context is "
                              f"{self.manifest.model.context_length}")
        return ids

    def generate_tokens(self, prompt_ids: Sequence[int], options: GenerationOptions) -> Iterator[int]:
        stream = self.model.sequence(tokens=list(prompt_ids)).stream(options=options)
        try:
            for event in stream:
                if event.token is not None:
                    yield event.token
        finally:
            stream.close()

    def stream(self, prompt: str, options: GenerationOptions | None = None, **overrides: Any) -> Iterator[str]:
        stream = self.model.stream(prompt, options, **overrides)
        try:
            yield from stream.text()
        finally:
            stream.close()

    def generate(self, prompt: str, options: GenerationOptions | None = None, **overrides: Any) -> str:
        return self.model.generate(prompt, options, **overrides).text

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.model.logits(token_ids)

    def stepwise_logits(self, token_ids: Sequence[int], *, prefill: int = 1) -> np.ndarray:
        return self.model.stepwise_logits(token_ids, prefill=prefill)
