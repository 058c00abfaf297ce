"""``load_model``: every ``--model`` value either loads a YOLO with a detection head or ends in one ModelError line,
decided before Ultralytics touches the file or the network."""

from __future__ import annotations

import shutil
import socket
import time
import zipfile

import numpy as np
import pytest
import torch

from yolo_vq import assets
from yolo_vq.errors import ModelError
from yolo_vq.model import load_model


@pytest.fixture
def no_network(monkeypatch):
    """Any DNS lookup or connection fails the test (ModelError is what must come back, never a network attempt)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _text(p):
    p.write_text("these are not weights\n")


def _garbage(p):
    p.write_bytes(np.random.default_rng(0).bytes(4096))


def _zip(p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("notes.txt", "a zip, not a checkpoint")


def _truncated(p):
    data = assets.pose_weights().read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _classify(p):
    from ultralytics import YOLO

    torch.save({"model": YOLO("yolo11n-cls.yaml").model}, p)  # a real checkpoint of a classification model


def _folder(p):
    (p / "weights").mkdir(parents=True)
    shutil.copy(assets.pose_weights(), p / "weights" / "best.pt")


# (file to create in tmp_path, how to fill it, what to pass, words the one-line error must hold)
BAD = [
    ("text.pt", _text, "{f}", ["not a loadable Ultralytics PyTorch checkpoint", "text.pt"]),
    ("garbage.pt", _garbage, "{f}", ["not a loadable", "garbage.pt"]),
    ("empty.pt", lambda p: p.write_bytes(b""), "{f}", ["not a loadable", "EOFError"]),
    ("archive.pt", _zip, "{f}", ["not a loadable", "archive.pt"]),
    ("half.pt", _truncated, "{f}", ["not a loadable", "truncated"]),
    ("cls.pt", _classify, "{f}", ["classify model with a Classify head", "detect, segment, pose or obb"]),
    ("broken.yaml", lambda p: p.write_text("nc: [80\nbackbone: {"), "{f}", ["not a loadable Ultralytics model config"]),
    ("notes.txt", _text, "{f}", ["is a .txt file", "needs its .pt weights"]),
    ("model.onnx", lambda p: p.write_bytes(b"\x08\x07"), "{f}", ["is a .onnx file", "yolo-vq edge"]),
    ("run", _folder, "{f}", ["is a folder", "run/weights/best.pt"]),
    (None, None, "{d}/missing/foo.pt", ["foo.pt", "no such model file", "not an Ultralytics asset name"]),
    (None, None, "{d}/missing.onnx", ["is no file", "yolo-vq edge"]),
    (None, None, "not-a-model", ["not-a-model", "no such model file"]),
    (None, None, "nosuch-net.yaml", ["nosuch-net.yaml", "does not exist", ".yaml model config"]),
    (None, None, "yolo11n-cls.yaml", ["classify model", "Classify head"]),
    (None, None, "yolo26n.pt", ["--model yolo26n.pt is not a local file and Ultralytics would download it",
                                "offline", "github.com/ultralytics/assets/releases", "--model /path/to/yolo26n.pt"]),
    (None, None, "yolo26n", ["would download it", "/path/to/yolo26n.pt"]),
    (None, None, "https://example.com/w/best.pt", ["offline", "/path/to/best.pt"]),
    (None, None, "", ["is empty", "omit --model"]),
]


@pytest.mark.parametrize(("file", "make", "arg", "words"), BAD, ids=[b[0] or b[2].split("/")[-1] or "empty" for b in BAD])
def test_bad_model_is_one_modelerror_line_without_network(file, make, arg, words, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    if file:
        make(tmp_path / file)
    arg = arg.format(f=file, d=tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_model(arg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert time.perf_counter() - t0 < 5, "offline checks must not wait for a network timeout"
    for w in words:
        assert w in msg, msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(("arg", "task", "head"), [
    (None, "pose", "Pose"),
    ("yolo11n.yaml", "detect", "Detect"),  # Ultralytics' own config, found by name offline (random weights)
    ("yolo11n-pose.yaml", "pose", "Pose"),
])
def test_good_models_load(arg, task, head, no_network):
    from yolo_vq.features.tap import detect_head

    model = load_model(arg)
    assert isinstance(model.model, torch.nn.Module) and model.task == task
    assert type(detect_head(model.model)).__name__ == head


def test_weights_dir_is_searched_like_ultralytics(tmp_path, monkeypatch, no_network):
    """A bare name that is not in the working folder is looked up in Ultralytics' weights_dir (attempt_download_asset)."""
    import ultralytics.utils

    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copy(assets.pose_weights(), wdir / "mine.pt")
    monkeypatch.setattr(ultralytics.utils, "SETTINGS", {**ultralytics.utils.SETTINGS, "weights_dir": str(wdir)})
    monkeypatch.chdir(tmp_path)
    assert load_model("mine.pt").task == "pose"


def test_online_asset_names_go_to_ultralytics(monkeypatch):
    """Online, an asset name is handed to Ultralytics to download as usual; its failure still ends in one line."""
    import ultralytics
    import ultralytics.utils

    seen = []

    def fake_yolo(name, task=None):
        seen.append(name)
        raise ConnectionError("❌  Download failure for https://github.com/ultralytics/assets/releases/yolo26n.pt.\n"
                              "Retry limit reached.")

    monkeypatch.setattr(ultralytics.utils, "is_online", lambda: True)
    monkeypatch.setattr(ultralytics, "YOLO", fake_yolo)
    with pytest.raises(ModelError, match="could not be downloaded or loaded") as e:
        load_model("yolo26n.pt")
    assert seen == ["yolo26n.pt"] and "\n" not in str(e.value)
