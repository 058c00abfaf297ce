"""Codebooks inside the pipeline: codes on every Results, saved with the model's fingerprint, refused elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import yolo
from yolo_vq import Detections, Embedder, assets
from yolo_vq.quant import CodebookError, ProductQuantizer


@pytest.fixture(scope="module")
def trained(pose_model_path, tmp_path_factory):
    """A small PQ trained on real embeddings of bikes.mp4, saved through the embedder."""
    model = yolo(pose_model_path)
    with Embedder(model) as emb:
        vecs = [r.vq_embeddings for r in model.predict(str(assets.bikes_video()), stream=True, vid_stride=2,
                                                          conf=0.1, verbose=False)]
    x = np.concatenate(vecs)
    assert len(x) > 100
    pq = ProductQuantizer(dim=emb.dim, m=16, codebook_size=32, iters=10).fit(x)
    path = tmp_path_factory.mktemp("cb") / "bikes_pq"
    emb.save_codebook(pq, path)
    return path, pq, emb.fingerprint


def test_codes_attached_and_follow_tracked_rows(trained, pose_model_path, bikes_frames):
    path, pq, _ = trained
    model = yolo(pose_model_path)
    with Embedder(model, codebook=path) as emb:
        assert emb.codebook.meta["embedding"]["recipe"] == emb.config.name
        results = [model.track(f, persist=True, conf=0.1, verbose=False)[0] for f in bikes_frames[:6]]
    n = 0
    for r in results:
        assert r.vq_codes.shape == (len(r.boxes), 16) and r.vq_codes.dtype == np.uint8
        np.testing.assert_array_equal(r.vq_codes, pq.encode(r.vq_embeddings).numpy())
        d = Detections.from_ultralytics(r)
        np.testing.assert_array_equal(d.codes, r.vq_codes)
        n += len(r.boxes)
    assert n > 0


def test_codebook_of_another_model_is_refused(trained):
    path, _, fingerprint = trained
    other = Embedder(yolo("yolo11n-pose.yaml"))  # same architecture and recipe, other (random) weights
    assert other.fingerprint != fingerprint
    with pytest.raises(CodebookError, match=r"model fingerprint .*PoseModel yolo11n-pose.*Fix: train a codebook"):
        other.load_codebook(path)
    with pytest.warns(UserWarning, match="does not fit"):
        other.load_codebook(path, allow_mismatch=True)


def test_codebook_of_another_recipe_is_refused(trained, pose_model_path):
    path, _, _ = trained
    with pytest.raises(CodebookError, match=r"dim=1088 vectors, got expect_dim=448"):
        Embedder(yolo(pose_model_path), "head-avg", codebook=path)
    with pytest.raises(ValueError, match=r"codebook takes dim=1088 vectors, but recipe 'head-avg'"):
        Embedder(yolo(pose_model_path), "head-avg", codebook=ProductQuantizer(dim=1088, m=8))


def test_part_blocks_follow_the_recipe_layout():
    """fit_codebook's default rotation blocks: each pooled cell's channels, then the whole colour histogram."""
    from yolo_vq.config import load_recipe
    from yolo_vq.fit import part_blocks

    emb = Embedder(yolo("yolo11n.yaml"))
    blocks = part_blocks(emb)
    cfg = load_recipe("s4-8stripes-colour-center")
    (tap,), colour = emb.taps, cfg.colour
    assert blocks[:-1] == [(i * tap.channels, (i + 1) * tap.channels) for i in range(8)]
    assert blocks[-1] == (8 * tap.channels, emb.dim) and emb.dim - 8 * tap.channels == colour.dim
