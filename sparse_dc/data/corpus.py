"""The built-in corpus: real English prose every Python installation carries, so the quickstart needs no download.

Documents are (1) the docstrings of the standard library's modules, classes and functions, read with `ast` from
the source files (nothing is imported, so no module runs), and (2) the topics of the language reference shipped in
`pydoc_data.topics`. On CPython 3.11 that is about 4,600 documents and 2.1 MB of text (~0.5M tokens at a 4K
vocabulary). Order is deterministic for a given Python version: files sorted by path, nodes in source order.
"""
from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator

# Test suites and vendored packages are code, not prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}
MIN_DOC_CHARS = 80  # one-line docstrings ("Return x.") are too short to be useful documents


def builtin_documents() -> Iterator[str]:
    """Yield the built-in corpus's documents in a deterministic order."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for filename in sorted(filenames):
            if filename.endswith(".py") and not filename.startswith("test_"):
                yield from _docstrings(os.path.join(dirpath, filename))
    yield from _reference_topics()


def _docstrings(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return  # a few stdlib files are templates or use another encoding: skip them
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc


def _reference_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped-down Python builds may omit pydoc_data
        return
    for name in sorted(topics):
        yield topics[name]
