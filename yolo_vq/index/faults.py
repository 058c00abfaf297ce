"""What a store says when its storage fails: one :class:`~yolo_vq.errors.StoreError` line per kind of fault, naming
the file and what to do, the same words whatever the implementation.

An implementation recognises its own errors (SQLite's "disk is full", "database is locked", ...) and turns each into
one of these (:func:`fault`); the wording, and what the user is told to do, lives here once.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from ..errors import StoreError

__all__ = ["RESTORE", "Fault", "damaged", "fault", "free_bytes"]

RESTORE = "restore it from a backup, or index into a new directory"


class Fault(Enum):
    """The kinds of storage fault a store reports."""

    DISK_FULL = "disk full"
    READ_ONLY = "read-only"
    LOCKED = "locked"  # another writer held the lock past the timeout
    UNOPENABLE = "unopenable"  # the storage cannot be opened at all (a missing or unreadable folder)
    DAMAGED = "damaged"  # anything else: a damaged or foreign file


def fault(kind: Fault, path: Path, doing: str, detail: str) -> StoreError:
    """The error for a fault of ``kind`` at ``path`` while ``doing`` something, ``detail`` being the storage's own
    words (quoted in parentheses)."""
    if kind is Fault.DISK_FULL:
        return StoreError(f"{path}: the disk is full ({detail}) while {doing}: everything committed before is kept and "
                          f"this batch was rolled back; free space on the disk of {path.parent} and re-run the same "
                          f"command to resume")
    if kind is Fault.READ_ONLY:
        return StoreError(f"{path} is read-only ({detail}) while {doing}: make the index folder and its files "
                          f"writable, or index into a writable directory (search works on a read-only index)")
    if kind is Fault.LOCKED:
        return StoreError(f"{path}: another process held its write lock for too long ({detail}) while {doing}: wait "
                          f"for it to finish (or stop it) and re-run")
    if kind is Fault.UNOPENABLE:
        return StoreError(f"{path}: it cannot be opened ({detail}) while {doing}: check that the folder exists and is "
                          f"readable")
    return StoreError(f"{path} is damaged or not a yolo_vq index ({detail}) while {doing}: {RESTORE} (nothing was "
                      f"changed)")


def damaged(path: Path, what: str) -> StoreError:
    """A store whose content is not what it must be (``what``: e.g. "its meta 'x' is ..., not ..."): restore or
    re-index; nothing was changed."""
    return StoreError(f"{path} is damaged: {what}; {RESTORE} (nothing was changed)")


def free_bytes(folder: Path) -> int | None:
    """Bytes free for this user on the disk of ``folder`` (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
