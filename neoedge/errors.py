"""Exceptions raised by neoedge. Every error a user can cause has its own clear type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Completion


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
    """A prompt or token sequence cannot be used (empty, ids out of range, too long for the context)."""


class ContextFullError(PromptError):
    """A sequence needs more positions than the model's context has, and its policy is "error".

    Raised by an append that does not fit, or by a generation that runs into the end of the context;
    then `completion` holds what was generated until then (the sequence keeps those tokens too).
    """

    def __init__(self, message: str, completion: Completion | None = None) -> None:
        super().__init__(message)
        self.completion = completion


class SequenceBusyError(NeoedgeError, RuntimeError):
    """A sequence was used while another call (another thread, or an open stream) is using it.

    A sequence holds one KV cache and one position: two calls at once would corrupt both, so the
    second one is refused immediately instead of returning wrong text.
    """


class RequestBusyError(NeoedgeError, RuntimeError):
    """An engine request's events were asked for by a second reader. A request has one reader of
    its events (iterating it, or `events()`); `result()` and `result_async()` need none."""


class QueueFullError(NeoedgeError):
    """The engine's request queue is full: try again later (a server answers 503)."""


class EngineClosedError(NeoedgeError):
    """The engine was closed: it takes no more requests, and its unfinished ones end with this."""


class StateFileError(NeoedgeError):
    """A saved sequence state cannot be loaded: not a state file, corrupt, or from another package."""


class OptionsError(NeoedgeError, ValueError):
    """A generation option or session setting is invalid (wrong type or out of range)."""


class RunError(NeoedgeError):
    """onnxruntime failed while running the model graph."""


class ExportError(NeoedgeError):
    """An export failed: unsupported model, refused output directory, failed validation."""
