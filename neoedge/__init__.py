"""neoedge: GPT-Neo on ordinary CPUs, from a self-contained ONNX model package.

    from neoedge import Generator
    gen = Generator("my-package", intra_threads=2)
    print(gen.generate("The quick brown fox", max_new_tokens=32))
    for text in gen.stream("Once upon a time", temperature=0.8, top_p=0.95, seed=1):
        print(text, end="", flush=True)

The runtime needs only onnxruntime, numpy and tokenizers (no torch, transformers or onnx).
"""

import logging

from .errors import ExportError, NeoedgeError, PackageError, PromptError
from .generator import Generator
from .manifest import FORMAT_VERSION, Manifest
from .options import GenerationOptions
from .session import SessionSettings

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ExportError",
    "GenerationOptions",
    "Generator",
    "Manifest",
    "NeoedgeError",
    "PackageError",
    "PromptError",
    "SessionSettings",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
