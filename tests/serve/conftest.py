"""An index of bikes.mp4 (every 2nd frame, tracked, thumbnails) to serve: built once for the serve tests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from yolo_vq import assets

STRIDE = 2


def digest(index: Path) -> dict[str, str]:
    """sha256 of every file in an index folder (serving must change none and add none), but SQLite's own -wal and
    -shm files, which any reader of a WAL database may create and which hold no committed change here."""
    return {str(p.relative_to(index)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(index.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture(scope="session")
def served(pose_vq, tmp_path_factory):
    """(index folder, its codebook, the video it was built from: a copy of bikes.mp4 that tests may move)."""
    from yolo_vq import Indexer

    model, cb = pose_vq
    tmp = tmp_path_factory.mktemp("served")
    video = tmp / "bikes.mp4"
    shutil.copyfile(assets.bikes_video(), video)
    with Indexer(model, tmp / "index", codebook=cb, conf=0.1, track=True, thumb_every=1, keep_vectors=True) as ix:
        ix.index_source(video, stride=STRIDE, progress=False)
    return tmp / "index", cb, video
