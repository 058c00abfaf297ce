"""The README's Python examples run as written, with the offline model, clip and image swapped in."""

from __future__ import annotations

import re
from pathlib import Path

from yolo_vq import assets
from yolo_vq.index.registry import open_store
from yolo_vq.video import fingerprint_name

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the codebook example writes codebook.safetensors/.json
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    code = "\n".join(blocks)
    for name, path in {
        '"yolo11n-pose.pt"': repr(str(assets.pose_weights())),
        '"video.mp4"': repr(str(assets.bikes_video())),
        '"bus.jpg"': repr(str(assets.ultralytics_image("bus.jpg"))),
    }.items():
        assert name in code
        code = code.replace(name, path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    det = scope["det"]
    assert det.embeddings.shape[1] == scope["emb"].dim
    assert len(scope["maps"]) == len(scope["tap"].info) == 4
    assert scope["result"].vq_codes.shape == (len(scope["result"].boxes), 32)
    assert (tmp_path / "codebook.json").is_file()
    dets = scope["dets"]  # the edge example: onnxruntime on bus.jpg, codes of the README's codebook
    assert dets["codes"].shape == (len(dets["xyxy"]), 32) and len(dets["xyxy"]) >= 3
    hits = scope["hits"]
    assert 0 < len(hits) <= 5 and (hits.class_id == 0).all() and (hits.data["score"][:-1] >= hits.data["score"][1:]).all()
    with open_store(tmp_path / "idx", readonly=True) as s:  # the user's-own-loop example
        cam, photos = (s.source(fingerprint=fingerprint_name(n)) for n in ("cam0", "photos"))
        assert len(s.frames_done(cam.id)) == 250 and s.frames_done(photos.id).tolist() == [0]
        det = s.get(s.codes()[0])
        assert (det.data["source_id"] == photos.id).sum() >= 4  # bus.jpg: people and a bus
