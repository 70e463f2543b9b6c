"""neoedge's export pipeline (installed as `neoedge.export`): GPT-Neo checkpoint → model package.

Needs the `[export]` extra (torch, transformers, onnx); the runtime never imports this package.
"""

from .destination import OutputExistsError
from .pipeline import ExportOptions, export_package

__all__ = ["ExportOptions", "OutputExistsError", "export_package"]
