"""This module lives in :mod:`yolo_vq_edge._format` (the torch-free code that the yolo-vq-edge distribution ships to
devices, see edge/README.md); the name here is the same module object, kept for existing imports."""

import sys

from yolo_vq_edge import _format

sys.modules[__name__] = _format
