"""Exceptions raised by neoedge. Every error a user can cause has its own clear type."""

from __future__ import annotations


class NeoedgeError(Exception):
    """Base class of all neoedge errors."""


class PackageError(NeoedgeError):
    """A model package is missing, incomplete, corrupt or of an unsupported format version."""


class ManifestError(PackageError):
    """The manifest (neoedge.json) breaks the package schema: a missing or unknown key, a value of
    the wrong type, or a value out of range."""


class FormatVersionError(ManifestError):
    """The package was written for another version of the package format."""


class IntegrityError(PackageError):
    """A package file is missing, or its bytes are not the ones the manifest records (size or sha256),
    or the manifest's own seal does not match."""


class PackagePathError(PackageError):
    """A path named by the package leads outside it (absolute, `..`, a symlink that escapes), or the
    graph reads a file the manifest does not list."""


class GraphMismatchError(PackageError):
    """The ONNX graph does not match the manifest (names, dimensions, element types)."""


class TokenizerMismatchError(PackageError):
    """The tokenizer does not fit the model (its ids exceed the vocabulary, bos/eos are wrong)."""


class PromptError(NeoedgeError, ValueError):
    """A prompt cannot be generated from (for example: longer than the model's context)."""


class OptionsError(NeoedgeError, ValueError):
    """A generation option or session setting is invalid (wrong type or out of range)."""


class RunError(NeoedgeError):
    """onnxruntime failed while running the model graph."""


class ExportError(NeoedgeError):
    """An export failed: unsupported model, refused output directory, failed validation."""
