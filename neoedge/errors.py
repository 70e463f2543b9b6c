"""Exceptions raised by neoedge. Every error a user can cause has its own clear type."""

from __future__ import annotations


class NeoedgeError(Exception):
    """Base class of all neoedge errors."""


class PackageError(NeoedgeError):
    """A model package is missing, incomplete, corrupt or of an unsupported format version."""


class PromptError(NeoedgeError, ValueError):
    """A prompt cannot be generated from (for example: longer than the model's context)."""


class ExportError(NeoedgeError):
    """An export failed: unsupported model, refused output directory, failed validation."""
