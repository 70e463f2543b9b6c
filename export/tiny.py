"""Small GPT-Neo checkpoints built on this machine: the hub is not always reachable.

Used by the test suite (random weights, tiny sizes, a small window so short sequences exercise local
attention), by the benchmarks, and — the trained one below — by `neoedge demo` when the hub is out
of reach. The tokenizer is a byte-level BPE trained on text every Python installation has: the
standard library's docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"

# Modules whose documentation makes the offline English corpus (deterministic per Python version).
CORPUS_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "zipfile", "ast", "codecs", "configparser", "copy",
    "ctypes", "dis", "doctest", "filecmp", "fnmatch", "ftplib", "getopt", "gettext", "imaplib", "ipaddress",
    "locale", "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse",
    "platform", "plistlib", "poplib", "pydoc", "quopri", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "smtplib", "socketserver", "ssl", "stat", "struct", "symtable", "sysconfig",
    "timeit", "tokenize", "trace", "traceback", "types", "urllib.request", "weakref", "wsgiref.handlers",
    "xml.dom.minidom", "xml.etree.ElementTree", "xmlrpc.client", "zipimport", "zoneinfo",
    "concurrent.futures", "importlib.metadata", "importlib.resources", "json.decoder", "email.message",
    "http.server", "http.cookies", "logging.handlers", "unittest.mock", "asyncio.tasks", "asyncio.events",
)


def stdlib_docstrings() -> list[str]:
    """Docstrings of the standard library modules above and their public members, in a fixed order."""
    docs: list[str] = []
    with warnings.catch_warnings():  # some members (typing.io) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            _module_docs(name, docs)
    return docs


def _module_docs(name: str, docs: list[str]) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return
    seen = set(docs)

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    add(module)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        value = getattr(module, attr)
        # A submodule is an attribute only once something has imported it: counting its docs would
        # make the corpus depend on what else the process imported before.
        if inspect.ismodule(value):
            continue
        add(value)
        if inspect.isclass(value) and getattr(value, "__module__", None) == module.__name__:
            for member in sorted(vars(value)):
                if not member.startswith("_"):
                    add(getattr(value, member, None))


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A GPT-2-style byte-level BPE tokenizer with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_checkpoint(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """Write model and tokenizer as a Hugging Face checkpoint directory (safetensors)."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS,
                            unk_token=EOS).save_pretrained(directory)
    return directory


def tiny_config(vocab_size: int, **overrides: Any) -> Any:
    """A GPT-Neo config with mixed global/local layers and a small window."""
    from transformers import GPTNeoConfig

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, max_position_embeddings=256, hidden_size=64, num_layers=4,
        num_heads=4, attention_types=[[["global", "local"], 2]], window_size=8,
        bos_token_id=0, eos_token_id=0,
    )
    settings.update(overrides)
    return GPTNeoConfig(**settings)


# -- the trained tiny model ---------------------------------------------------------------------
# Random weights cannot show what quantization costs; this small GPT-Neo, trained in minutes on the
# standard library's docstrings, can. Its checkpoint and held-out text ship with neoedge.export.
TRAINED_DIR = Path(__file__).parent / "assets" / "gpt-neo-stdlib-tiny"
HELDOUT_FILE = "heldout.txt"
# The calibration text that ships with neoedge (export/assets/calibration/README.md): a fixed
# snapshot of docstrings, so that an export does not depend on the running Python's standard library.
CALIBRATION_CORPUS = Path(__file__).parent / "assets" / "calibration" / "stdlib-docstrings.txt"


def trained_checkpoint() -> Path:
    """Directory of the committed trained tiny GPT-Neo (config, safetensors, tokenizer, held-out text)."""
    if not (TRAINED_DIR / "config.json").is_file():
        raise FileNotFoundError(f"trained tiny model not found at {TRAINED_DIR}; "
                                "run benchmarks/train_tiny_model.py")
    return TRAINED_DIR


def split_corpus(docs: list[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document is held out."""
    return ([d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every])


def corpus_snapshot(docs: list[str], heldout: str, min_line: int = 30) -> str:
    """The documents that share no line of `min_line` or more characters with `heldout`, joined by
    blank lines: training text that cannot leak the held-out text into what it is judged on (the
    held-out file was cut from another Python version's docstrings, so an index split alone would
    not keep them apart)."""
    held_lines = {line.strip() for line in heldout.splitlines() if len(line.strip()) >= min_line}
    kept = [doc for doc in docs
            if not any(line.strip() in held_lines for line in doc.splitlines() if len(line.strip()) >= min_line)]
    return "\n\n".join(kept) + "\n"
