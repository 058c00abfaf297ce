"""The public API a newcomer reaches with a bare ``import yolo_vq`` (a fresh interpreter each, so no earlier import
of a submodule hides a missing attribute)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_assets_reachable_after_bare_import():
    # the README tells users to call yolo_vq.assets.pose_weights() after `import yolo_vq`
    out = _run("import yolo_vq, sys; print(yolo_vq.assets.pose_weights().name); print('torch' in sys.modules)")
    assert out.split() == ["yolo11n-pose.pt", "False"]


def test_every_error_is_one_catchable_value_error():
    out = _run(
        "import yolo_vq\n"
        "from yolo_vq import errors\n"
        "from yolo_vq.index.store import StoreError\n"
        "from yolo_vq.quant import CodebookError\n"
        "from yolo_vq.edge.records import RecordError\n"
        "from yolo_vq.edge.runner import EdgeError\n"
        "names = [n for n in errors.__all__ if n != 'YoloVQError']\n"
        "assert all(issubclass(getattr(errors, n), yolo_vq.YoloVQError) for n in names), names\n"
        "assert issubclass(yolo_vq.YoloVQError, ValueError)\n"
        "assert StoreError is errors.StoreError and CodebookError is errors.CodebookError\n"
        "assert RecordError is errors.RecordError and EdgeError is errors.EdgeError\n"
        "print(len(names))\n"
    )
    assert int(out) >= 7


def test_building_the_cli_imports_nothing_heavy():
    """Every sub-command's parser is built at start: on a device with the edge runner's packages only, that must not
    import yaml, torch, Ultralytics, OpenCV or even numpy (each command imports what it needs when it runs)."""
    out = _run("import sys\nfrom yolo_vq.cli import _parser\n_parser()\n"
               "print(sorted(m for m in ('yaml', 'torch', 'ultralytics', 'cv2', 'numpy', 'faiss') if m in sys.modules))")
    assert out.strip() == "[]"


def test_the_edge_distribution_matches_the_full_one():
    """yolo-vq-edge (edge/pyproject.toml) has the full package's version, and its `yolo-vq` knows every full-package
    command (to say what to install for it)."""
    import tomllib

    from yolo_vq.cli import _parser
    from yolo_vq_edge.cli import FULL_COMMANDS

    root = Path(__file__).resolve().parent.parent
    full, edge = (tomllib.loads((root / p / "pyproject.toml").read_text())["project"] for p in (".", "edge"))
    assert edge["version"] == full["version"]
    assert edge["scripts"]["yolo-vq"] == "yolo_vq_edge.cli:main"
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - {"edge"} == set(FULL_COMMANDS)
