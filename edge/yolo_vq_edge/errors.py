"""The errors yolo_vq raises for input it cannot use: one base, one class per domain.

Every class is a ``ValueError`` (bad input, not a bug) under :class:`YoloVQError`, so callers can catch them all
at once; the CLI turns each into its one-line ``error:`` and exit code 2. Messages name the value, what was expected
and the fix. This module imports nothing, so torch-free modules (the edge runner, records) can use it.
"""

from __future__ import annotations

__all__ = ["CodebookError", "EdgeError", "ExportError", "ModelError", "RecordError", "SourceError", "StoreError",
           "YoloVQError"]


class YoloVQError(ValueError):
    """Base of every error yolo_vq raises for unusable input (files, options, models, indexes)."""


class CodebookError(YoloVQError):
    """A codebook file is unreadable, or does not belong to the model/embedding/index it is used with."""


class StoreError(YoloVQError):
    """An index directory that cannot be used as asked (missing, damaged, read-only, full, foreign schema or
    codebook); nothing stored is changed by the operation that raised it."""


class SourceError(YoloVQError):
    """A video, image folder or stream that cannot be read as one (not a video container, no decodable images)."""


class ModelError(YoloVQError):
    """A ``--model`` that is not a loadable YOLO model, or a name that needs a download this machine cannot do."""


class RecordError(YoloVQError):
    """An edge records file that cannot be written or read (the message says what and how to fix it)."""


class EdgeError(YoloVQError):
    """An exported graph or input the torch-free edge runner cannot use."""


class ExportError(YoloVQError):
    """A model/codebook/option combination that cannot be exported as one ONNX graph."""
