"""The search page: ``yolo-vq serve`` serves :func:`create_app` (FastAPI) over one index with uvicorn. Needs the
``serve`` extra (``pip install 'yolo-vq[serve]'``: fastapi, uvicorn, python-multipart)."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
