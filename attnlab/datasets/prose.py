"""Prose corpus from the running Python's standard library, plus a text-space sentence splitter.

Why: the organisms must train and be probed offline, on text present on every machine. The standard
library ships tens of thousands of docstrings and the ``pydoc_data.topics`` reference pages: enough
English-like prose for haystacks, a tokenizer and a small LM.

How the corpus is built (deterministic for a given Python version):

1. Pure-Python modules: every ``.py`` file under the stdlib directory is *parsed* with ``ast`` (never
   imported, so no side effects: ``antigravity``, ``this``, ``turtle`` ... are harmless). Module, class
   and function docstrings are taken in file order. Modules are listed with ``pkgutil.iter_modules``
   walking package directories, sorted by dotted name. Test suites, IDLE, demos and ``site-packages``
   are skipped.
2. Built-in and extension modules (``sys``, ``math``, ``_io`` ...) have no source: they are imported
   inside ``try/except`` (a deny-list skips modules with import-time side effects) and their
   members' ``__doc__`` strings are read.
3. ``pydoc_data.topics``: the language-reference topics, sorted by topic name.

Docstrings are cleaned with ``inspect.cleandoc``, duplicates dropped (first occurrence kept) and very
short ones (< ``MIN_CHARS``) skipped. The result is cached in memory per process.

Note: the corpus differs slightly between Python versions. Anything that must be identical across
machines (e.g. the ICL train/test split of a word) must not depend on list positions in this corpus;
see ``stable_bucket``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import os
import pkgutil
import re
import sys
import sysconfig
import warnings

MIN_CHARS = 40
"""Docstrings shorter than this many characters are dropped (one-word stubs add nothing)."""

_SKIP_TOP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__phello__",
        "__pycache__",
        "venv",
        "pydoc_data",
    }
)
# Extension modules whose import changes process state (terminal, signals) or needs a display/GUI.
_SKIP_BUILTIN = frozenset({"readline", "_tkinter", "_curses", "_curses_panel", "antigravity", "this"})
_SKIP_BUILTIN_PREFIX = ("_test", "xx", "_xx", "_ctypes_test")

_WORD_RE = re.compile(r"(?<![A-Za-z0-9_])[a-z]+(?![A-Za-z0-9_])")  # whole all-lower-case words
# A sentence ends at . ! or ? followed by whitespace and an upper-case letter, digit or quote.
_SENT_BOUNDARY_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _iter_source_modules(root: str, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, file path) of every pure-Python module under ``root``, sorted, no imports."""
    found: list[tuple[str, str]] = []
    for info in sorted(pkgutil.iter_modules([root]), key=lambda m: m.name):
        if not prefix and info.name in _SKIP_TOP:
            continue
        if info.name in {"test", "tests", "idle_test"}:
            continue
        path = os.path.join(root, info.name)
        name = prefix + info.name
        if info.ispkg:
            init = os.path.join(path, "__init__.py")
            if os.path.isfile(init):
                found.append((name, init))
            found.extend(_iter_source_modules(path, name + "."))
        elif os.path.isfile(path + ".py"):
            found.append((name, path + ".py"))
    return found


def _docstrings_from_source(path: str) -> list[str]:
    """Module, class and function docstrings of one source file, in file order."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return []
    docs: list[str] = []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes[1:] = sorted(nodes[1:], key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            docs.append(doc)
    return docs


def _builtin_module_names() -> list[str]:
    names = set(sys.builtin_module_names)
    dynload = os.path.join(_stdlib_dir(), "lib-dynload")
    if os.path.isdir(dynload):
        names.update(m.name for m in pkgutil.iter_modules([dynload]))
    keep = [n for n in names if n not in _SKIP_BUILTIN and not n.startswith(_SKIP_BUILTIN_PREFIX) and n != "__main__"]
    return sorted(keep)


def _docstrings_from_builtin(name: str) -> list[str]:
    """Docstrings of an extension module and its public members (imported, failures skipped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure just means "no prose from this module"
        return []
    docs = [mod.__doc__] if isinstance(mod.__doc__, str) else []
    for attr in sorted(vars(mod)):
        if attr.startswith("__"):
            continue
        obj = getattr(mod, attr, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            if isinstance(getattr(obj, "__doc__", None), str):
                docs.append(obj.__doc__)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    d = getattr(vars(obj)[meth], "__doc__", None)
                    if not meth.startswith("__") and isinstance(d, str):
                        docs.append(d)
    return [inspect.cleandoc(d) for d in docs]


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics  # a large module: loaded when the corpus is first built (start-up)
    except ImportError:
        return []
    return [topics[k].strip() for k in sorted(topics)]


@functools.lru_cache(maxsize=1)
def load_prose() -> tuple[str, ...]:
    """All stdlib documents (docstrings and pydoc topics), cleaned and de-duplicated, in fixed order."""
    raw: list[str] = []
    for _, path in _iter_source_modules(_stdlib_dir()):
        raw.extend(_docstrings_from_source(path))
    for name in _builtin_module_names():
        raw.extend(_docstrings_from_builtin(name))
    raw.extend(_pydoc_topics())
    seen: set[str] = set()
    out: list[str] = []
    for doc in raw:
        doc = doc.strip()
        if len(doc) < MIN_CHARS or doc in seen:
            continue
        seen.add(doc)
        out.append(doc)
    return tuple(out)


def _is_prose_line(line: str) -> bool:
    """True for lines that read as running text (not code, tables, doctests or option lists)."""
    s = line.strip()
    if not s or s.startswith((">>>", "...", "$", "-", "*", "|", "+", "=", "#", ":", "[", "{")):
        return False
    if line.startswith((" ", "\t")):  # indented: code examples, parameter tables
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.85 * len(s)


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Running-text paragraphs of the corpus, each one line of space-joined sentences.

    Paragraphs are blank-line separated blocks whose lines all pass a prose filter; they are what
    haystacks are made of, so the needle lands in ordinary sentences rather than code.
    """
    out: list[str] = []
    for doc in load_prose():
        for block in re.split(r"\n\s*\n", doc):
            lines = block.split("\n")
            if not all(_is_prose_line(ln) for ln in lines):
                continue
            para = " ".join(ln.strip() for ln in lines)
            para = re.sub(r"\s+", " ", para).strip()
            if len(para) >= MIN_CHARS and para[-1] in ".!?":
                out.append(para)
    return tuple(out)


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences (text space: no tokenizer involved).

    A boundary is ``.``, ``!`` or ``?`` followed by whitespace and a capital letter, digit, quote or
    parenthesis. Sentences are returned without the separating whitespace; ``" ".join`` of the
    result equals the input with whitespace runs at boundaries collapsed.
    """
    text = text.strip()
    if not text:
        return []
    return [s for s in _SENT_BOUNDARY_RE.split(text) if s]


def sentence_starts(text: str) -> list[int]:
    """Character offsets where sentences begin in ``text`` (always includes 0 for non-empty text)."""
    if not text:
        return []
    return [0] + [m.end() for m in _SENT_BOUNDARY_RE.finditer(text)]


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """All sentences of ``prose_paragraphs()`` in corpus order."""
    out: list[str] = []
    for para in prose_paragraphs():
        out.extend(s for s in split_sentences(para) if len(s) >= 12)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def corpus_vocabulary(min_count: int = 5, min_len: int = 3, max_len: int = 8) -> tuple[str, ...]:
    """Lower-case alphabetic words of the prose paragraphs seen at least ``min_count`` times, sorted."""
    counts: dict[str, int] = {}
    for para in prose_paragraphs():
        for w in _WORD_RE.findall(para):
            counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(w for w, c in counts.items() if c >= min_count and min_len <= len(w) <= max_len))


def stable_bucket(item: str, n_buckets: int = 100) -> int:
    """Bucket of ``item`` from a cryptographic hash: identical on every machine and Python version.

    Used to assign inputs to train/valid/test splits, so a word is in the same split wherever the
    (version-dependent) corpus is built.
    """
    digest = hashlib.sha256(item.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_buckets
