"""This module lives in :mod:`yolo_vq_edge.video` (the torch-free code that the yolo-vq-edge distribution ships to
devices, see edge/README.md); the name here is the same module object, kept for existing imports."""

import sys

from yolo_vq_edge import video

sys.modules[__name__] = video
