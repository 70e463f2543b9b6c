"""neoedge: GPT-Neo on ordinary CPUs, from a self-contained ONNX model package.

    from neoedge import Model
    model = Model("my-package")                       # load once, share everywhere
    print(model.generate("The quick brown fox", max_new_tokens=32).text)
    chat = model.sequence()                           # a conversation that keeps its KV cache
    for event in chat.stream("Once upon a time", temperature=0.8, top_p=0.95, seed=1):
        print(event.text, end="", flush=True)

The runtime needs only onnxruntime, numpy and tokenizers (no torch, transformers or onnx).
"""

import logging

from .cancel import CancelToken
from .errors import (ContextFullError, EngineClosedError, ExportError, FormatVersionError, GraphMismatchError,
                     IntegrityError, ManifestError, NeoedgeError, OptionsError, PackageError, PackagePathError,
                     PromptError, QueueFullError, RequestBusyError, RunError, SequenceBusyError, StateFileError,
                     TokenizerMismatchError)
from .events import Completion, ContinuationScore, FinishReason, TokenEvent, TopLogprob, Usage
from .generation import Stream
from .generator import Generator
from .manifest import FORMAT_VERSION, Manifest
from .model import Model
from .options import ContextPolicy, GenerationOptions
from .sequence import Sequence
from .session import SessionSettings

__version__ = "0.2.0"

__all__ = [
    "FORMAT_VERSION",
    "CancelToken",
    "Completion",
    "ContextFullError",
    "ContextPolicy",
    "EngineClosedError",
    "FormatVersionError",
    "GraphMismatchError",
    "IntegrityError",
    "ManifestError",
    "OptionsError",
    "PackagePathError",
    "QueueFullError",
    "TokenizerMismatchError",
    "ContinuationScore",
    "ExportError",
    "FinishReason",
    "GenerationOptions",
    "Generator",
    "Manifest",
    "Model",
    "NeoedgeError",
    "PackageError",
    "PromptError",
    "RequestBusyError",
    "RunError",
    "Sequence",
    "SequenceBusyError",
    "SessionSettings",
    "StateFileError",
    "Stream",
    "TokenEvent",
    "TopLogprob",
    "Usage",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
