"""Where a codebook's files live and how they are identified: path rules and sha256 checksums, shared by the codebook
(:mod:`.io`) and the coarse quantizer (:mod:`.coarse`) file handling; imports nothing else of the package."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["bytes_sha256", "coarse_path", "codebook_paths", "file_sha256"]


def codebook_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``"cb"``, ``"cb.safetensors"`` or ``"cb.json"`` -> ``(cb.safetensors, cb.json)``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def coarse_path(codebook: str | os.PathLike) -> Path:
    """``<stem>.coarse.safetensors`` of a codebook (its stem or either of its two files)."""
    st, _ = codebook_paths(codebook)
    return st.with_name(st.name[: -len(".safetensors")] + ".coarse.safetensors")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
