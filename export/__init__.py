"""neoedge's export pipeline (installed as `neoedge.export`): GPT-Neo checkpoint → model package.

Needs the `[export]` extra (torch, transformers, onnx); the runtime never imports this package.
"""

from .pipeline import export_package

__all__ = ["export_package"]
