"""The search page's HTTP API over one index (FastAPI), and the page itself (plain HTML/CSS/JS from the package).

    from yolo_vq.serve import create_app
    app = create_app("yolo_vq_demo/index")      # then: uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (OpenAPI page at ``/docs``):

- ``POST /search`` (form): one query, ``image`` (an uploaded JPEG/PNG; ``box`` = "x1,y1,x2,y2" pixels in it, else its
  first detection) or ``detection`` (a stored id) or ``track`` ("SOURCE:TRACK"); filters ``classes`` (names, comma
  separated), ``source`` (id), ``time_from``/``time_to`` (s), ``min_conf``; ``k``; ``rerank`` (exact re-ranking of
  that many), ``per_track`` (results by appearance). Results are the rows of ``yolo-vq search --json`` for the same
  query.
- ``POST /detect`` (form, ``image``): the detections the index's model finds in an uploaded image, to click on.
- ``GET /detections/{id}`` (row), ``/detections/{id}/crop.jpg``, ``/detections/{id}/frame.jpg`` (its frame with the
  boxes drawn, from the video while it is still there, else its stored thumbnail), ``GET /tracks/{source}/{track}``,
  ``GET /sources``, ``GET /sources/{source}/frames/{frame}`` (+ ``.jpg``: neighbouring frames), ``GET /info``.

Errors are JSON ``{"detail": "<one readable line>"}`` with a 4xx status. The index is opened read-only and never
changed; every request first picks up detections another process (a running ``yolo-vq index``) stored meanwhile.
No request parameter is ever a file path: sources are ids, mapped to their stored paths here only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..detections import FRAME, ID, SOURCE_ID, Detections
from ..index.memory import Memory
from ..index.query import Query, result_rows
from ..index.thumbs import PREFER, SourceFrames
from ..viz import encode_jpeg

__all__ = ["MAX_UPLOAD", "create_app"]

MAX_UPLOAD = 10 * 1024 * 1024  # bytes of one uploaded image
T = TypeVar("T")
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}


class _Index:
    """The opened index (read-only :class:`Memory`) and the query model (loaded on the first image), used from one
    thread of their own: requests arrive on a thread pool, SQLite connections belong to the thread that made them,
    and one search at a time is what 2 cores can serve anyway. :meth:`call` runs a function there."""

    def __init__(self, index: str | Path, model: Any, imgsz: int):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="yolo-vq-index")
        self._model_arg, self._model, self.imgsz = model, None, imgsz
        self.memory = self.call(Memory, index)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the index's thread; its result, or its exception raised here."""
        return self._thread.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.call(self.memory.close)
        self._thread.shutdown()

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..model import load_model

            self._model = self._model_arg if not isinstance(self._model_arg, str | Path | None) \
                else load_model(self._model_arg)
        return self._model

    def detections(self, ids: list[int]) -> Detections:
        try:
            return self.memory.store.get(ids)
        except KeyError:
            raise HTTPException(404, f"no stored detection with id {ids[0] if len(ids) == 1 else ids}: ids come "
                                     f"from search results (this index holds {len(self.memory)})") from None

    def source(self, source_id: int):
        for s in self.memory.store.sources():
            if s.id == source_id:
                return s
        known = [s.id for s in self.memory.store.sources()]
        raise HTTPException(404, f"no source with id {source_id}: this index has sources {known} (GET /sources)")


def _image(upload: UploadFile, limit: int) -> np.ndarray:
    """An uploaded file as a (h, w, 3) uint8 BGR image, or a 413 (too large) / 415 (not an image)."""
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{upload.filename or 'the upload'} is larger than the {limit // 1024 // 1024} MB "
                                 f"limit for query images: send a smaller JPEG or PNG")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise HTTPException(415, f"{upload.filename or 'the upload'} ({len(data)} bytes) is not an image OpenCV can "
                                 f"decode: send a JPEG or PNG")
    return image


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)) or box[0] >= box[2] or box[1] >= box[3]:
        raise HTTPException(422, f"box {text!r}: expected x1,y1,x2,y2 in pixels of the image with x1 < x2, y1 < y2")
    return box  # type: ignore[return-value]


def _track(text: str) -> tuple[int, int]:
    src, sep, tid = text.partition(":")
    if not (sep and src.strip().isdigit() and tid.strip().isdigit()):
        raise HTTPException(422, f"track {text!r}: expected SOURCE_ID:TRACK_ID as non-negative integers, e.g. 1:7")
    return int(src), int(tid)


def _rows(ix: _Index, dets: Detections) -> list[dict[str, Any]]:
    """Stored detections as the rows search results have (without a score)."""
    rows = result_rows(ix.memory, dets.with_data(score=np.zeros(len(dets), np.float32)))
    return [{k: v for k, v in r.items() if k != "score"} | {"source_id": int(s)}
            for r, s in zip(rows, dets.data[SOURCE_ID])]


def _draw(image: np.ndarray, dets: Detections, chosen: int | None) -> np.ndarray:
    out = image.copy()
    for i, (x1, y1, x2, y2) in enumerate(dets.xyxy.round().astype(int).tolist()):
        mine = int(dets.data[ID][i]) == chosen
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 0, 255) if mine else (0, 200, 255), 3 if mine else 1)
    return out


def _jpeg(image: np.ndarray, picture: str) -> Response:
    return Response(encode_jpeg(image, 90), media_type="image/jpeg",
                    headers={"X-Picture": picture, "Cache-Control": "no-store"})


def _static(name: str, media: str) -> Callable[[], Response]:
    """A handler with no parameters (FastAPI would read any parameter from the request) serving one packaged file."""
    text = (resources.files(__package__) / "static" / name).read_text()

    def page() -> Response:
        return HTMLResponse(text, media_type=media)

    return page


def create_app(index: str | Path, *, model: Any = None, imgsz: int = 640, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The FastAPI app serving ``index`` (read-only). ``model``: the YOLO model of image queries (a loaded one, a
    path or name, or None: the offline yolo11n-pose), loaded on the first image query; it must be the model the
    index was built with. Raises what :class:`Memory` raises for an unusable index (before serving anything)."""
    from .. import __version__

    ix = _Index(index, model, imgsz)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ix.close()

    app = FastAPI(title="yolo-vq", version=__version__, lifespan=lifespan,
                  description=f"Search the stored detections of {Path(index).name} by visual similarity.")
    app.state.index = ix

    def on_index(endpoint: Callable[..., T]) -> Callable[..., T]:
        """Run an endpoint on the index's thread (FastAPI reads its parameters from the signature it wraps)."""
        @functools.wraps(endpoint)
        def run(*args: Any, **kwargs: Any) -> T:
            return ix.call(endpoint, *args, **kwargs)
        return run

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err['loc'] if p not in ('body', 'query', 'path'))}: {err['msg']}"
                 + (f" (got {err['input']!r})" if err.get("input") is not None else "") for err in e.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail
        if detail in ("Not Found", "Method Not Allowed"):  # no route: say which and where the routes are listed
            detail = f"{request.method} {request.url.path}: {detail.lower()} here; the API's endpoints are listed at /docs"
        return JSONResponse({"detail": detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ValueError)  # YoloVQError too: a query the library refuses (no detection in the image,
    def _bad(request: Request, e: ValueError) -> JSONResponse:  # a box outside it, another model, a bad filter)
        return JSONResponse({"detail": " ".join(str(e).split())}, status_code=400)

    for route, (name, media) in _STATIC.items():  # three fixed files: nothing of the request names a file
        app.get(route, include_in_schema=False)(_static(name, media))

    @app.get("/info")
    @on_index
    def info() -> dict[str, Any]:
        """What is searchable: detections, sources, classes, search mode, code size, upload limit."""
        ix.memory.refresh()
        out = ix.memory.info()
        out["index"] = Path(out["index"]).name
        return out | {"classes": sorted(ix.memory.names.values()), "max_upload_bytes": max_upload}

    @app.get("/sources")
    @on_index
    def sources() -> list[dict[str, Any]]:
        """The indexed sources: id, file name, stored path or URL, fps, frames, size."""
        return [{"id": s.id, "name": Path(s.uri).name, "uri": s.uri, "fps": s.fps, "frame_count": s.frame_count,
                 "width": s.width, "height": s.height} for s in ix.memory.store.sources()]

    @app.post("/search")
    @on_index
    def search(image: Annotated[UploadFile | None, File(description="query image (JPEG/PNG)")] = None,
               box: Annotated[str | None, Form(description="x1,y1,x2,y2 in the image's pixels")] = None,
               detection: Annotated[int | None, Form(ge=1, description="a stored detection id")] = None,
               track: Annotated[str | None, Form(description="SOURCE_ID:TRACK_ID")] = None,
               classes: Annotated[str | None, Form(description="class names, comma separated")] = None,
               source: Annotated[int | None, Form(ge=1, description="a source id")] = None,
               time_from: Annotated[float | None, Form()] = None, time_to: Annotated[float | None, Form()] = None,
               min_conf: Annotated[float | None, Form(ge=0, le=1)] = None,
               k: Annotated[int, Form(ge=1, le=1000)] = 10,
               rerank: Annotated[int | None, Form(ge=1)] = None,
               per_track: Annotated[int | None, Form(ge=1, description="at most this many hits per track")] = None,
               ) -> dict[str, Any]:
        """Top-k stored detections like the query; the rows of `yolo-vq search --json`."""
        given = [n for n, v in (("image", image), ("detection", detection), ("track", track)) if v is not None]
        if len(given) != 1:
            raise HTTPException(422, f"give exactly one query: an image, a detection id or a track (got "
                                     f"{', '.join(given) or 'none'})")
        picture = _image(image, max_upload) if image is not None else None
        mem = ix.memory
        mem.refresh()
        if detection is not None:
            ix.detections([detection])
            query, shown = Query.detection(mem, detection), {"kind": "detection", "detection": detection}
        elif track is not None:
            src, tid = _track(track)
            if not len(mem.store.track_ids(src, tid)):
                raise HTTPException(404, f"no track {src}:{tid} in this index: tracks come from indexing with "
                                         f"--track (search results show each detection's track)")
            query, shown = Query.track(mem, src, tid), {"kind": "track", "track": f"{src}:{tid}"}
        else:
            b = _box(box) if box else None
            query = Query.image(mem, ix.model, picture, box=b, imgsz=ix.imgsz)
            shown = {"kind": "image", "box": list(b) if b else None}
        filters = {"classes": [c.strip() for c in classes.split(",") if c.strip()] if classes else None,
                   "source": source, "time_from": time_from, "time_to": time_to, "min_conf": min_conf}
        try:
            found = mem.search(query.vectors[:1], k, exclude=query.exclude, rerank=rerank, per_track=per_track,
                               **filters)[0]
        except ValueError as e:  # an unknown class, a bad time range, rerank without kept vectors
            raise HTTPException(400, " ".join(str(e).split())) from None
        rows = result_rows(mem, found)
        empty = None if rows else mem.why_empty(exclude=query.exclude, **filters)
        return {"query": shown, "results": rows, "empty": empty, "searched": len(mem)}

    @app.post("/detect")
    @on_index
    def detect(image: Annotated[UploadFile, File(description="an image (JPEG/PNG)")]) -> dict[str, Any]:
        """The detections the index's model finds in an uploaded image (boxes to click as queries)."""
        picture = _image(image, max_upload)
        r = ix.model.predict(picture, verbose=False, imgsz=ix.imgsz)[0]
        names = r.names
        return {"width": picture.shape[1], "height": picture.shape[0], "detections": [
            {"box": [round(float(v), 1) for v in b], "class": names.get(int(c), str(int(c))),
             "confidence": round(float(p), 3)}
            for b, c, p in zip(r.boxes.xyxy.tolist(), r.boxes.cls.tolist(), r.boxes.conf.tolist())]}

    @app.get("/detections/{detection_id}")
    @on_index
    def detection_row(detection_id: int) -> dict[str, Any]:
        """One stored detection: source, time, frame, class, track, confidence, box."""
        return _rows(ix, ix.detections([detection_id]))[0]

    @app.get("/detections/{detection_id}/crop.jpg", response_class=Response)
    @on_index
    def detection_crop(detection_id: int, prefer: str = "video") -> Response:
        """The detection's picture: cut from its video while it is there, else its stored thumbnail."""
        if prefer not in PREFER:
            raise HTTPException(422, f"prefer {prefer!r}: expected one of {', '.join(PREFER)}")
        dets = ix.detections([detection_id])
        return _jpeg(ix.memory.pictures(dets, prefer=prefer, size=(128, 256))[0], prefer)

    def frame_image(source_id: int, frame: int, chosen: int | None) -> np.ndarray | None:
        reader = SourceFrames(ix.source(source_id))
        try:
            image = reader.read(frame) if frame >= 0 else None
        finally:
            reader.close()
        if image is None:
            return None
        return _draw(image, ix.memory.store.get(ix.memory.store.frame_ids(source_id, frame)), chosen)

    @app.get("/detections/{detection_id}/frame.jpg", response_class=Response)
    @on_index
    def detection_frame(detection_id: int) -> Response:
        """The detection's frame with its box (red) and the frame's other stored boxes (orange), from the video;
        its stored thumbnail where the video is gone or changed (header X-Picture says which)."""
        dets = ix.detections([detection_id])
        image = frame_image(int(dets.data[SOURCE_ID][0]), int(dets.data[FRAME][0]), detection_id)
        if image is not None:
            return _jpeg(image, "video")
        return _jpeg(ix.memory.pictures(dets, prefer="thumbs")[0], "thumbnail")

    @app.get("/sources/{source_id}/frames/{frame}.jpg", response_class=Response)
    @on_index
    def frame_picture(source_id: int, frame: int) -> Response:
        """One frame of a source with its stored boxes, from the video (404 where it is no longer readable)."""
        image = frame_image(source_id, frame, None)
        if image is None:
            raise HTTPException(404, f"frame {frame} of source {source_id} cannot be read: the video is gone, "
                                     f"changed or shorter (stored thumbnails remain: /detections/ID/crop.jpg)")
        return _jpeg(image, "video")

    @app.get("/sources/{source_id}/frames/{frame}")
    @on_index
    def frame_rows(source_id: int, frame: int) -> dict[str, Any]:
        """The stored detections of one frame of one source (for stepping through neighbouring frames)."""
        s = ix.source(source_id)
        if frame < 0 or (s.frame_count and frame >= s.frame_count):
            raise HTTPException(404, f"frame {frame} is outside source {source_id} ({s.frame_count} frames)")
        ids = ix.memory.store.frame_ids(source_id, frame)
        return {"source_id": source_id, "frame": frame, "frame_count": s.frame_count,
                "detections": _rows(ix, ix.memory.store.get(ids)) if len(ids) else []}

    @app.get("/tracks/{source_id}/{track_id}")
    @on_index
    def track_rows(source_id: int, track_id: int) -> dict[str, Any]:
        """Every stored detection of one track, in order."""
        ids = ix.memory.store.track_ids(source_id, track_id)
        if not len(ids):
            raise HTTPException(404, f"no track {source_id}:{track_id} in this index (tracks come from indexing "
                                     f"with --track)")
        return {"source_id": source_id, "track": track_id, "detections": _rows(ix, ix.memory.store.get(ids))}

    return app
