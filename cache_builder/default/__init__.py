"""The default teacher and the corpus it was trained on, both available on any machine with Python.

The corpus is English technical prose that ships with every CPython interpreter: the pydoc
topics (``pydoc_data.topics``, the language reference pages behind ``help("FOR")``) and the
docstrings of a fixed allow-list of standard-library modules together with their public classes,
functions and methods. Nothing is downloaded.

The text is extracted deterministically from the *running* interpreter, so it is identical
between runs and processes of one Python build (whatever else the process has imported, and
wherever it is installed), but it differs slightly between Python versions (docstrings are
edited, modules gain and lose members, a few modules are removed) and between operating systems
(``os``, ``signal`` and ``socket`` expose different functions). The committed teacher records the
Python version whose documentation it was trained on, and a hash of each split, in
``teacher/TRAINING.json``; a cache's dataset fingerprint tells the texts apart.

Example::

    from cache_builder.default import DEFAULT_TEACHER_DIR, write_default_dataset

    path = write_default_dataset("data", "train")  # data/default-train.jsonl

A build without --dataset reads the corpus from :func:`default_dataset_url`, a file in the
process's own memory: builds running at once, and the ranks of one torchrun build, share no file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import uuid
import warnings
from pathlib import Path
from types import ModuleType
from typing import Literal

__all__ = [
    "DEFAULT_TEACHER_DIR",
    "STDLIB_MODULES",
    "default_corpus",
    "default_dataset_url",
    "write_default_dataset",
]

Split = Literal["train", "validation"]

DEFAULT_TEACHER_DIR: Path = Path(__file__).resolve().parent / "teacher"
"""The committed default teacher: a small Llama and its byte-level BPE tokenizer
(``save_pretrained`` layout, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``).
``make_teacher.py`` in this package regenerates it."""

STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.base_events", "asyncio.events",
    "asyncio.exceptions", "asyncio.locks", "asyncio.protocols", "asyncio.queues",
    "asyncio.runners", "asyncio.streams", "asyncio.tasks", "asyncio.transports", "atexit",
    "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd",
    "code", "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall",
    "concurrent.futures", "concurrent.futures.process", "configparser", "contextlib",
    "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "dbm",
    "decimal", "difflib", "dis", "doctest", "email", "email.charset", "email.encoders",
    "email.errors", "email.feedparser", "email.generator", "email.header",
    "email.headerregistry", "email.iterators", "email.message", "email.policy", "email.utils",
    "encodings", "enum", "errno", "faulthandler", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.metadata", "importlib.resources", "importlib.util", "inspect",
    "io", "ipaddress", "itertools", "json", "json.decoder", "json.encoder", "keyword",
    "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma", "mailbox",
    "marshal", "math", "mimetypes", "multiprocessing", "multiprocessing.connection",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.process",
    "multiprocessing.shared_memory", "netrc", "numbers", "operator", "optparse", "os",
    "os.path", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri",
    "random", "re", "reprlib", "runpy", "sched", "secrets", "select", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing",
    "unicodedata", "unittest", "unittest.case", "unittest.loader", "unittest.main",
    "unittest.mock", "unittest.result", "unittest.runner", "unittest.suite", "urllib.error",
    "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "venv",
    "warnings", "wave", "weakref", "wsgiref", "wsgiref.handlers", "wsgiref.headers",
    "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate", "xml.dom", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport",
    "zlib", "zoneinfo",
)  # fmt: skip
"""Standard-library modules whose import has no side effects, sorted. Modules missing from a
build (``sqlite3`` or ``ssl`` without their C libraries, ``tomllib`` before 3.11) are skipped."""

MIN_CHARS = 200
"""Documents shorter than this are dropped (a one-line module docstring teaches little)."""

VALIDATION_PERCENT = 10
"""About this share of documents (chosen by a hash of their source name) is held out."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # reprs of sentinel defaults differ per process


def _split_of(source: str) -> Split:
    """Which split a document belongs to, from its source name alone (order-independent)."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


class _Elided:
    """A default value shown as ``...`` in a signature."""

    def __repr__(self) -> str:
        return "..."


# Defaults computed from the installation (``platform.architecture(executable=sys.executable)``,
# ``sysconfig.get_paths(scheme=get_default_scheme())``) would make the text machine-dependent.
_LOCAL_DEFAULTS = frozenset({sys.executable, sysconfig.get_default_scheme()})


def _signature(obj: object) -> str:
    try:
        signature = inspect.signature(obj)  # type: ignore[arg-type]
    except (ValueError, TypeError):  # many builtins have no introspectable signature
        return ""
    params = [
        p.replace(default=_Elided()) if _is_local(p.default) else p
        for p in signature.parameters.values()
    ]
    return str(signature.replace(parameters=params))


def _is_local(default: object) -> bool:
    """Defaults whose repr depends on the machine or on the process's state so far
    (``logging.shutdown(handlerList=...)`` lists the handlers created until now)."""
    if isinstance(default, (list, dict, set)) and default:
        return True
    return isinstance(default, str) and default in _LOCAL_DEFAULTS


def _own_doc(obj: object) -> str | None:
    """The docstring ``obj`` defines itself (a class's inherited docstring does not count)."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _is_stdlib(module_name: str | None) -> bool:
    """Whether an object defined in ``module_name`` comes with Python (``None``: a C slot)."""
    return module_name is None or module_name.split(".")[0] in sys.stdlib_module_names


def _own_members(module: ModuleType) -> list[tuple[str, object]]:
    """Public classes and functions defined by ``module`` or by its C accelerator.

    ``json.dumps`` belongs to ``json``; ``heapq.heappush`` (from ``_heapq``) to ``heapq``;
    ``asyncio.Task`` is left to ``asyncio.tasks`` so that no docstring appears twice, and
    what other imported packages attach to a standard module is left out.
    """
    name = module.__name__
    owners = {name, "_" + name.rsplit(".", 1)[-1], "_" + name.replace(".", "_")}
    members = []
    for attr, obj in sorted(vars(module).items()):
        if name == "sys" and hasattr(module, f"__{attr}__"):
            obj = getattr(module, f"__{attr}__")  # the original hook, which tools may replace
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        module_of = getattr(obj, "__module__", None)
        if module_of in owners or (name == "builtins" and _is_stdlib(module_of)):
            members.append((attr, obj))
    return members


def _module_text(module: ModuleType) -> str:
    """A module's docstring, then those of its public classes, their methods and functions.

    Each entry is headed by its qualified name and signature, e.g. ``json.dumps(obj, *, ...)``.
    """
    parts = [f"Module {module.__name__}\n\n{inspect.cleandoc(module.__doc__ or '')}"]
    for attr, obj in _own_members(module):
        qualname = f"{module.__name__}.{attr}"
        doc = _own_doc(obj)
        if doc is not None:
            parts.append(f"{qualname}{_signature(obj)}\n\n{doc}")
        if not isinstance(obj, type):
            continue
        for method_name, method in sorted(vars(obj).items()):
            if method_name.startswith("_") or not inspect.isroutine(method):
                continue
            if not _is_stdlib(getattr(method, "__module__", None)):
                continue  # patched in by another package (transformers adds Logger.info_once)
            doc = _own_doc(method)
            if doc is not None:
                parts.append(f"{qualname}.{method_name}{_signature(method)}\n\n{doc}")
    return _ADDRESS.sub("", "\n\n\n".join(parts))


def _import_quietly(name: str) -> ModuleType | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module(name)
        except ImportError:  # not built into this interpreter (sqlite3, ssl, tomllib, ...)
            return None


def _all_documents() -> list[dict[str, str]]:
    from pydoc_data.topics import topics

    docs = [
        {"text": text.strip(), "source": f"pydoc:{name}"} for name, text in sorted(topics.items())
    ]
    for name in STDLIB_MODULES:
        module = _import_quietly(name)
        if module is not None:
            docs.append({"text": _module_text(module), "source": f"module:{name}"})
    return [doc for doc in docs if len(doc["text"]) >= MIN_CHARS]


def default_corpus(split: Split) -> list[dict[str, str]]:
    """The default corpus: CPython's own documentation, one document per topic or module.

    Args:
        split: ``"train"`` (about 90 %) or ``"validation"`` (about 10 %). A document's split
            depends only on a hash of its ``source`` name, so the two never overlap and adding
            a module elsewhere in the list moves no other document.

    Returns:
        Documents ``{"text": str, "source": str}`` sorted by source, with sources such as
        ``"pydoc:for"`` and ``"module:json"``. Identical across runs of one Python build; the
        text differs slightly between Python versions.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    docs = [doc for doc in _all_documents() if _split_of(doc["source"]) == split]
    return sorted(docs, key=lambda doc: doc["source"])


def _jsonl(split: Split) -> bytes:
    """:func:`default_corpus` as jsonl bytes (one ``{"text", "source"}`` per line)."""
    lines = (json.dumps(doc, ensure_ascii=False) + "\n" for doc in default_corpus(split))
    return "".join(lines).encode("utf-8")


def write_default_dataset(directory: str | Path, split: Split) -> Path:
    """Write :func:`default_corpus` as jsonl (one ``{"text", "source"}`` per line).

    The file is written under a name of this call's own, then renamed into place: processes
    writing it at once each rename a whole file, and a reader never sees a partial one.

    Args:
        directory: created if missing.
        split: ``"train"`` or ``"validation"``.

    Returns:
        The path written, ``directory / f"default-{split}.jsonl"``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"default-{split}.jsonl"
    tmp = directory / f".default-{split}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("xb") as f:
            f.write(_jsonl(split))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_dataset_url(split: Split) -> str:
    """The default corpus as a jsonl file in this process's fsspec ``memory://`` filesystem.

    Written on the first call in a process. A build reads it like any data file, twice (the
    data pass, then the teacher pass), and nothing goes to disk: concurrent builds on one
    machine, and the ranks of one torchrun build, cannot collide on a shared temporary file,
    and none is left behind. Its content is this interpreter's corpus, as for every process.
    """
    import fsspec

    url = f"memory://kdcache-default-data/default-{split}.jsonl"
    fs = fsspec.filesystem("memory")
    if not fs.exists(url):
        fs.pipe_file(url, _jsonl(split))
    return url
