"""``--model``: a name or path -> a loaded Ultralytics ``YOLO`` with a detection head, or a one-line :class:`ModelError`.

``YOLO(x)`` accepts almost anything and fails late or at length: a text file "loads" (``model.model`` is a str) and
breaks at predict time, a damaged ``.pt`` raises a multi-line TypeError, an asset name offline retries a download
until ConnectionError. :func:`load_model` checks what it can before Ultralytics runs, resolving names the way
Ultralytics 8.4 does (``engine/model.py`` ``Model._load``, ``utils/downloads.py`` ``attempt_download_asset``): a
local path, else ``SETTINGS["weights_dir"] / name``, else a download of a name in ``GITHUB_ASSETS_NAMES``, which is
refused up front when :func:`ultralytics.utils.is_online` says no (it returns before any DNS lookup when
``YOLO_OFFLINE`` is set).

Ultralytics unpickles ``.pt`` files (``torch.load(weights_only=False)``): load only weights you trust.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ModelError

__all__ = ["load_model"]

_WEIGHTS = (".pt",)
_YAML = (".yaml", ".yml")
_REMOTE = ("http://", "https://", "ul://", "gs://")
_ASSETS_URL = "https://github.com/ultralytics/assets/releases"
_HEADS = "a detect, segment, pose or obb model (YOLOv8, YOLO11, YOLO26)"


def _first_line(e: BaseException, limit: int = 240) -> str:
    """``TypeName: first line`` of an exception (at most ``limit`` characters), without Ultralytics' ``ERROR ❌️``."""
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = re.sub(r"^ERROR\W*", "", text)
    text = text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _suffix_error(shown: str, path: Path) -> ModelError:
    suffix = path.suffix.lower()
    kind = f"a {suffix} file" if suffix else "a file without a .pt/.yaml suffix"
    head = f"is {kind}" if path.exists() else f"is no file, and {kind} would not do either"
    need = "yolo_vq taps the PyTorch modules of a YOLO model, so it needs its .pt weights (or a .yaml model config)"
    if suffix == ".onnx":
        fix = (f"pass the .pt it was exported from; to run a graph exported by `yolo-vq export` use "
               f"`yolo-vq edge {shown} VIDEO --out detections.jsonl`")
    elif suffix:
        fix = "pass the .pt the file was made from"
    else:
        fix = "rename it if it is one, or pass an Ultralytics asset name such as yolo11n-pose.pt"
    return ModelError(f"--model {shown} {head}: {need}: {fix}")


def _offline_error(shown: str, name: str, where: str = _ASSETS_URL) -> ModelError:
    return ModelError(
        f"--model {shown} is not a local file and Ultralytics would download it, but this machine is offline "
        f"(YOLO_OFFLINE=1 / no DNS): download it where there is internet ({where}) and pass its path, "
        f"e.g. --model /path/to/{name}"
    )


def _resolve(shown: str, raw: str) -> tuple[str, bool]:
    """``(what to hand to YOLO, whether it may download)``, or a ModelError for a name that cannot work here."""
    from ultralytics.utils import SETTINGS, is_online
    from ultralytics.utils.checks import check_model_file_from_stem, check_yolov5u_filename
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    if raw.lower().startswith(_REMOTE):
        if not is_online():
            raise _offline_error(shown, Path(raw.split("?")[0]).name or "model.pt", "that URL")
        return raw, True
    # the names Ultralytics rewrites before it looks: yolo11n -> yolo11n.pt, yolov5n.pt -> yolov5nu.pt
    name = check_yolov5u_filename(str(check_model_file_from_stem(raw)), verbose=False)
    path = Path(name).expanduser()
    if path.is_dir():
        best = next((p for p in (path / "weights" / "best.pt", path / "best.pt") if p.is_file()), None)
        hint = f": did you mean --model {best}?" if best else ": pass the .pt file inside it (e.g. weights/best.pt)"
        raise ModelError(f"--model {shown} is a folder, expected a .pt weights file or a .yaml model config{hint}")
    if not path.exists():
        cached = Path(SETTINGS["weights_dir"]) / name  # attempt_download_asset's second place to look
        if cached.is_file():
            path = cached
    suffix = path.suffix.lower()
    if path.exists():
        if suffix not in _WEIGHTS + _YAML:
            raise _suffix_error(shown, path)
        return str(path), False
    if suffix in _YAML:  # Ultralytics also finds model YAMLs by name in its own cfg/ (no network)
        return name, False
    if suffix and suffix not in _WEIGHTS:
        raise _suffix_error(shown, path)
    if path.name in GITHUB_ASSETS_NAMES:  # attempt_download_asset downloads it (to that path)
        if not is_online():
            raise _offline_error(shown, path.name)
        return name, True
    raise ModelError(
        f"--model {shown}: no such model file (nor in Ultralytics' weights_dir {SETTINGS['weights_dir']}), and "
        f"{path.name} is not an Ultralytics asset name: pass the path of a .pt weights file or .yaml model config, "
        f"an asset name such as yolo11n-pose.pt, or omit --model for the offline yolo11n-pose"
    )


def load_model(name: str | Path | None, *, task: str | None = None) -> Any:
    """An Ultralytics ``YOLO`` for ``--model name``, checked to be a PyTorch model with a detection head.

    Args:
        name: ``None`` (the offline ``yolo11n-pose.pt`` of :func:`yolo_vq.assets.pose_weights`); a ``.pt`` weights
            file (unpickled by Ultralytics: trusted files only); a ``.yaml``/``.yml`` model config (a local path or
            one of Ultralytics' built-in names, e.g. ``yolo11n.yaml``; random weights); a file in Ultralytics'
            ``weights_dir``; an Ultralytics asset name (``yolo26n.pt``, downloaded by Ultralytics when online).
        task: passed to ``YOLO(..., task=task)`` (used by ``.yaml`` configs; ``.pt`` files carry their own).

    Returns:
        ``ultralytics.YOLO`` whose ``.model`` is an ``nn.Module`` ending in a ``Detect``-family head.

    Raises:
        yolo_vq.errors.ModelError: one line naming the value, what was expected and the fix: an unsupported file type
            (``.onnx``: see ``yolo-vq edge``), a missing file, a name that needs a download while offline (raised
            before any network access), a file Ultralytics cannot load, or a model without a detection head.
    """
    from . import assets

    if name is None:
        name = assets.pose_weights()
    raw = str(name).strip()
    shown = raw if raw and " " not in raw else repr(raw)
    if not raw:
        raise ModelError("--model '' is empty: pass a .pt weights file or .yaml model config, or omit --model for "
                         "the offline yolo11n-pose")
    target, downloads = _resolve(shown, raw)

    import torch
    from ultralytics import YOLO

    try:
        model = YOLO(target, task=task)
    except FileNotFoundError as e:
        raise ModelError(f"--model {shown}: {_first_line(e)}: pass the path of a .pt weights file or .yaml model "
                         f"config (Ultralytics' own: yolo11n.yaml, yolo11n-pose.yaml, yolo26n.yaml, ...)") from e
    except Exception as e:  # anything a damaged or foreign file raises while it is unpickled or built
        if downloads:
            raise ModelError(f"--model {shown} could not be downloaded or loaded ({_first_line(e)}): download it from "
                             f"{_ASSETS_URL} and pass its path") from e
        if Path(target).suffix.lower() in _YAML:
            kind, fix = "model config", "fix it, or start from one of Ultralytics' (ultralytics/cfg/models/)"
        else:
            kind, fix = "PyTorch checkpoint", ("pass weights saved by Ultralytics (e.g. runs/detect/train/weights/"
                                               "best.pt) or re-download/re-export the file")
        raise ModelError(f"--model {shown} is not a loadable Ultralytics {kind} ({_first_line(e)}): {fix}") from e
    net = model.model
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"--model {shown} loaded as {type(net).__name__}, not a PyTorch module: yolo_vq taps the "
                         f"modules of {_HEADS}: pass its .pt weights")
    from .features.tap import detect_head

    try:
        detect_head(net)
    except (TypeError, ValueError) as e:
        layers = getattr(net, "model", None)
        ok = isinstance(layers, torch.nn.Sequential | torch.nn.ModuleList) and len(layers)
        head = f"a {type(layers[-1]).__name__} head" if ok else f"no layer list ({type(net).__name__})"
        raise ModelError(f"--model {shown} is a {getattr(model, 'task', None) or 'non-detection'} model with {head}: "
                         f"yolo_vq embeds detections and needs {_HEADS}") from e
    return model
