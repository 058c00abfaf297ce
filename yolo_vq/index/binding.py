"""The codebook binding, shared by every store: an index's codes belong to one codebook, copied into the index
directory (``codebook.safetensors`` + ``codebook.json``, plus ``codebook.coarse.safetensors`` where it has search
lists) and identified by the sha256 of its tensors in ``meta['codebook_sha256']``.

The binding is decided once, inside the store's write transaction that creates the index (or, for an existing
index, under its write lock: :meth:`Store.bind_codebook`), so two processes creating one index cannot both win. The
files are verified against the recorded checksum whenever the codebook is used; a missing or damaged copy is an
error (never a reason to fit a new one), which the same codebook, bound again, repairs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CodebookError, StoreError

if TYPE_CHECKING:
    from .store import CodebookBinding, Store

__all__ = ["CODEBOOK_STEM", "bind", "own_codebook_problem", "recorded_sha256", "verified_codebook"]

CODEBOOK_STEM = "codebook"  # <index>/codebook.safetensors + codebook.json: the codebook of every stored code


def recorded_sha256(store: Store) -> str | None:
    """The checksum of the codebook ``store``'s codes belong to (``meta['codebook_sha256']``); for an index written
    before it was recorded, its codebook file's own record. None: no codebook bound.

    Raises:
        CodebookError: an older index records no checksum and its codebook file is unreadable."""
    have = store.get_meta("codebook_sha256")
    if have is None and store.get_meta("embedding") is not None:  # bound by an older yolo_vq
        from ..quant.io import codebook_checksum

        have = codebook_checksum(store.directory / CODEBOOK_STEM)
        if have is None:
            raise CodebookError(f"{store.directory}: the index's own codebook ({CODEBOOK_STEM}.json) is missing or "
                                f"unreadable, and this index (made by an older yolo_vq) has no record of its checksum: "
                                f"restore the codebook the index was made with into it, or re-index into a new "
                                f"directory; nothing was changed")
    return have


def bind(store: Store, codebook: CodebookBinding) -> bool:
    """Bind ``codebook`` to ``store`` (see :meth:`Store.bind_codebook`); the caller holds the store's write
    transaction, so the decision and the metadata it records commit (or roll back) together. Returns True when
    this call bound it."""
    from ..quant.coarse import coarse_path
    from ..quant.io import codebook_checksum, codebook_paths

    want = codebook_checksum(codebook.path)
    if want is None:
        raise CodebookError(f"codebook {codebook.path}: no readable codebook JSON with a tensor checksum there "
                            f"(expected the .safetensors + .json written by `yolo-vq fit` / save_codebook)")
    have = recorded_sha256(store)
    if have is None:
        if store.get_meta("code_size") is not None:  # set with the first codes stored
            raise StoreError(f"{store.path} holds codes but records no codebook: they could belong to any; index "
                             f"into a new directory")
    elif have != want:
        if codebook.fitted:
            raise CodebookError(
                f"while this run fitted a codebook ({want[:16]}...) for the new index {store.directory}, another "
                f"process created it with codebook {have[:16]}...: this run's codebook was not used and nothing "
                f"was stored; re-run the same command to index with the index's own codebook")
        raise CodebookError(
            f"{store.directory} is bound to codebook {have[:16]}... (its {CODEBOOK_STEM}.json, recorded in "
            f"{store.path.name}), and the codebook passed, {codebook.path} ({want[:16]}...), is another one: its codes "
            f"could not be compared with the stored ones; omit --codebook to use the index's own, or index into "
            f"a new directory")
    elif own_codebook_problem(store.directory, have) is None:
        if store.get_meta("codebook_sha256") is None:
            store.set_meta("codebook_sha256", have)  # an older index: record what its file says
        return False
    # copy (a first binding, or the same codebook restoring a missing or damaged copy); temp + rename per file,
    # the coarse quantizer (IVF lists) first where the codebook has one, the JSON that lists it last
    files = list(zip(codebook_paths(codebook.path), (".safetensors", ".json")))
    if (coarse := coarse_path(codebook.path)).is_file():
        files.insert(0, (coarse, ".coarse.safetensors"))
    for src, suffix in files:
        _copy(src, store.directory / f"{CODEBOOK_STEM}{suffix}")
    if problem := own_codebook_problem(store.directory, want):
        raise CodebookError(f"codebook {codebook.path} does not match its own checksum once copied ({problem})")
    if have is None:
        store.set_meta("codebook_sha256", want)
        store.set_meta("embedding", codebook.embedding)
        store.set_meta("model_fingerprint", codebook.model_fingerprint)
        store.set_meta("names", {int(k): v for k, v in codebook.names.items()})
    return have is None


def _copy(src: Path, dst: Path) -> None:
    """``src`` to ``dst`` by a temp file and a rename: never a half file at ``dst``."""
    if dst.exists() and dst.samefile(src):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:  # e.g. the disk is full: the transaction rolls back, no half file stays
        tmp.unlink(missing_ok=True)
        raise StoreError(f"{dst}: cannot copy the codebook into the index ({e.strerror or e}): nothing was stored; "
                         f"free space or fix permissions of {dst.parent} and re-run") from None


def own_codebook_problem(directory: Path, sha: str) -> str | None:
    """What is wrong with the copy in ``directory`` of the codebook of checksum ``sha`` (None: nothing)."""
    from ..quant.coarse import load_coarse
    from ..quant.files import file_sha256
    from ..quant.io import codebook_checksum

    st, js = (directory / f"{CODEBOOK_STEM}{x}" for x in (".safetensors", ".json"))
    if missing := [p.name for p in (st, js) if not p.is_file()]:
        return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    if (recorded := codebook_checksum(js)) != sha:
        return f"{js.name} is unreadable" if recorded is None else \
            f"{js.name} describes codebook {recorded[:16]}..., not the index's"
    if file_sha256(st) != sha:
        return f"{st.name} is damaged (its sha256 differs)"
    try:  # the search lists' coarse quantizer, where the JSON lists one
        load_coarse(directory / CODEBOOK_STEM)
    except CodebookError as e:
        return str(e).split(": restore it")[0]
    return None


def verified_codebook(store: Store) -> Path | None:
    """The stem of ``store``'s own codebook, verified against the recorded checksum (see :meth:`Store.codebook_path`)."""
    with store.snapshot():
        sha = store.codebook_sha256
    if sha is None:
        return None
    if problem := own_codebook_problem(store.directory, sha):
        raise CodebookError(
            f"{store.directory}: the index's own codebook is unusable: {problem}. {store.path.name} records its "
            f"checksum {sha[:16]}...: restore {CODEBOOK_STEM}.safetensors and {CODEBOOK_STEM}.json with that checksum "
            f"(`yolo-vq index ... --codebook PATH` with the codebook the index was made with puts them back), or "
            f"re-index into a new directory; nothing was changed")
    return store.directory / CODEBOOK_STEM
