"""Where store implementations are known: the scheme table, :func:`open_store` and :func:`store_exists`.

A location is what a user writes after ``--index`` (or passes as ``index=`` in Python), handed on unchanged by the
CLI, :class:`~yolo_vq.index.indexer.Indexer`, :class:`~yolo_vq.index.memory.Memory` and edge ingest:

* a directory path (``str`` or :class:`~pathlib.Path`), or ``sqlite:PATH``: :class:`yolo_vq.index.sqlite.SQLiteStore`,
  ``index.db`` (SQLite in WAL mode) in that directory.

A new implementation adds its scheme to :data:`_SCHEMES` (e.g. ``"lance"``), as ``"module:Class"``: implementations
are imported when a location names them, so importing the interface (:mod:`yolo_vq.index.store`) or this module
imports none of them.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .store import CodebookBinding, Store

__all__ = ["open_store", "resolve", "store_exists"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(.*)$", re.DOTALL)  # two letters at least: "C:\\..." is a path

DEFAULT_SCHEME = "sqlite"  # what a plain path opens
# scheme -> the implementation ("module:Class", a Store subclass), imported on first use
_SCHEMES: dict[str, str] = {"sqlite": "yolo_vq.index.sqlite:SQLiteStore"}


def resolve(location: str | Path) -> tuple[type[Store], str | Path]:
    """``(implementation class, its path)`` for a location (see the module docstring).

    Raises:
        StoreError: an unknown scheme (the message names the supported ones), or no path after the scheme.
    """
    scheme, path = DEFAULT_SCHEME, location
    if isinstance(location, str) and (m := _SCHEME.match(location)):
        scheme, path = m.group(1).lower(), m.group(2)
        if scheme not in _SCHEMES:
            supported = ", ".join(f"{s}:PATH" for s in _SCHEMES)
            raise StoreError(f"{location!r}: unknown store scheme {scheme + ':'!r}; supported: an index directory "
                             f"path (SQLite), {supported} (a directory whose name has a colon: write it ./{location})")
        if not path:
            raise StoreError(f"{location!r}: no path after {scheme + ':'!r}: write {scheme}:PATH")
    module, name = _SCHEMES[scheme].split(":")
    return getattr(importlib.import_module(module), name), path


def store_exists(location: str | Path) -> bool:
    """Whether there is an index at ``location`` (or what is left of one: a damaged or foreign index, a file where
    the directory should be), which :func:`open_store` opens, or refuses with its reason, without ``create``. False
    where nothing is stored yet: opening needs ``create=True`` there, and loses nothing.

    Raises:
        StoreError: an unknown scheme."""
    impl, path = resolve(location)
    return impl.exists(path)


def open_store(location: str | Path, *, create: bool = False, readonly: bool = False,
               codebook: CodebookBinding | None = None, timeout: float = 30.0) -> Store:
    """Open (or with ``create=True`` make) the index at ``location``.

    Args:
        location: an index directory (a :class:`~pathlib.Path`, or a ``str`` without a scheme): the SQLite store
            (``index.db`` inside); or ``"scheme:PATH"`` for a given implementation, ``sqlite:PATH`` the same SQLite
            store. A :class:`~pathlib.Path` is always a directory (a directory whose name looks like ``a:b`` can be
            given as a Path, ``./a:b`` or ``sqlite:a:b``).
        create: make the directory and an empty store if missing.
        readonly: open read-only (searchers); never blocks the writer, and works in a read-only folder.
        codebook: bind this codebook in the same transaction that creates the schema; on an existing index it must
            be the index's own (see :meth:`Store.bind_codebook`).
        timeout: seconds to wait for another writer's lock.

    Raises:
        StoreError: an unknown scheme (the message names the supported ones); no store there (without ``create``), a
            damaged, empty or foreign index, one of another schema version, a read-only index opened for writing;
            nothing is modified.
        CodebookError: ``codebook`` is not the index's own.
    """
    impl, path = resolve(location)
    kwargs: dict[str, Any] = {"create": create, "readonly": readonly, "codebook": codebook, "timeout": timeout}
    return impl(path, **kwargs)
