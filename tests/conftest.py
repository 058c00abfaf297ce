"""Shared fixtures: offline models and real media. Nothing here reaches the network."""

from __future__ import annotations

import os

os.environ["YOLO_OFFLINE"] = "1"  # before ultralytics is imported anywhere

import cv2
import numpy as np
import pytest
import torch

from yolo_vq import assets

DEVICE = os.environ.get("TORCH_DEVICE", "cpu")

# Architecture-only models (random weights, built from YAML, offline). Ultralytics 8.4 predicts YOLO26 with its
# one-to-many head + NMS unless predict(..., nms=False) selects the end-to-end (one-to-one) head.
FAMILIES = [
    ("yolov8n.yaml", "detect"),
    ("yolo11n.yaml", "detect"),
    ("yolo11n-seg.yaml", "segment"),
    ("yolo11n-pose.yaml", "pose"),
    ("yolo11n-obb.yaml", "obb"),
    ("yolo26n.yaml", "detect"),
]


def yolo(cfg: str):
    """A fresh YOLO model from a YAML (or .pt) path, seeded for reproducible random weights."""
    from ultralytics import YOLO

    torch.manual_seed(0)
    return YOLO(cfg, verbose=False)


@pytest.fixture(scope="session")
def pose_model_path():
    return str(assets.pose_weights())


@pytest.fixture(scope="session")
def bus():
    return cv2.imread(str(assets.ultralytics_image("bus.jpg")))


@pytest.fixture(scope="session")
def zidane():
    return cv2.imread(str(assets.ultralytics_image("zidane.jpg")))


@pytest.fixture(scope="session")
def bikes_frames() -> list[np.ndarray]:
    """Frames 30-41 of bikes.mp4 (640x272 BGR), where riders and pedestrians appear (none before frame 30)."""
    cap = cv2.VideoCapture(str(assets.bikes_video()))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
    frames = []
    while len(frames) < 12:
        ok, f = cap.read()
        assert ok, "bikes.mp4 could not be decoded"
        frames.append(f)
    cap.release()
    return frames


@pytest.fixture(scope="session")
def pose_vq(tmp_path_factory, pose_model_path):
    """The real yolo11n-pose and a 32-byte codebook (64 centroids) fitted on bikes.mp4 (every 2nd frame, conf 0.1)."""
    from ultralytics import YOLO

    from yolo_vq.fit import fit_codebook

    model = YOLO(pose_model_path)
    cb = tmp_path_factory.mktemp("pose_vq") / "codebook"
    fit_codebook(model, [assets.bikes_video()], cb, code_bytes=32, codebook_size=64, stride=2, conf=0.1,
                 progress=False)
    return model, cb


@pytest.fixture(scope="session")
def index_model(pose_model_path):
    """The real yolo11n-pose for indexer tests (its own object: the indexer tests attach embedders and trackers)."""
    from ultralytics import YOLO

    return YOLO(pose_model_path)


@pytest.fixture(scope="session")
def small_codebook(index_model, tmp_path_factory):
    """A PQ codebook (8 bytes, 16 centroids) of the default recipe on ``index_model``, trained on random unit
    vectors: for tests of storage and the indexer API, not of search quality."""
    from yolo_vq import Embedder
    from yolo_vq.quant import ProductQuantizer

    emb = Embedder(index_model)
    x = np.random.default_rng(0).normal(size=(512, emb.dim)).astype(np.float32)
    pq = ProductQuantizer(dim=emb.dim, m=8, codebook_size=16).fit(x / np.linalg.norm(x, axis=1, keepdims=True))
    path = tmp_path_factory.mktemp("small_codebook") / "cb"
    emb.save_codebook(pq, path)
    return path


@pytest.fixture(scope="session")
def frames_folder(bikes_frames, tmp_path_factory):
    """The 12 ``bikes_frames`` as a PNG folder: a source ``yolo-vq index`` reads in a few seconds."""
    d = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(bikes_frames):
        cv2.imwrite(str(d / f"{i:03d}.png"), f)
    return d


@pytest.fixture(scope="session")
def small_index(index_model, small_codebook, frames_folder, tmp_path_factory):
    """``frames_folder`` indexed with ``small_codebook`` at conf 0.1 (tracked): copy it before changing it."""
    from yolo_vq import Indexer
    from yolo_vq.index.registry import open_store

    idx = tmp_path_factory.mktemp("small_index") / "idx"
    with Indexer(index_model, idx, codebook=small_codebook, conf=0.1, track=True) as ix:
        ix.index_source(frames_folder, progress=False)
    with open_store(idx, readonly=True) as s:
        assert s.count() > 10
    return idx


@pytest.fixture(scope="module")
def one_thread():
    """Tiny data: extra threads only add OpenMP barrier waits on a shared 2-core machine (torch and FAISS at 1 thread
    for the module, restored after)."""
    import faiss
    import torch

    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)
