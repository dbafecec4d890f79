"""`lgur serve`: a small web page and a JSON API over one Searcher (model loaded once at startup).

    GET  /                 the search page (static/index.html: text box, k selector, grid of hits)
    POST /api/search       {"query": str (1..max_query_chars), "k": int (1..max_k), optional "where": "camera=3" or
                           a list of clauses, "after"/"before": Unix seconds or ISO 8601, "per_track": bool
                           (video indexes: one hit per track)} -> {"query", "k", "results": [{"rank", "score",
                           "id", "path", "url", "meta", ...}], "ms"}
    POST /api/explain      {"query": str, "k": int (the same bounds as /api/search), "ids": [int] (optional, at
                           most max_k index rows; default: the query's top k)} -> lgur.search.explain's
                           QueryExplanation as JSON (words coloured by part, per hit its parts ranked by their
                           share of the score with their top words, the part/foreground maps) + per hit "url" and
                           "panels": [{"name", "src"}] (crop, foreground, strongest part; JPEG data URLs)
    GET  /api/info         gallery size, model, search engine, limits
    GET  /img/{id}         gallery image `id` (an index row); ids only, never a user-supplied path
    GET  /frame/{id}       video indexes: the frame that crop `id` was cut from (hits then also carry video,
                           t, box, track, span, frame_size and frame_url); opened like /img, inside OUT.media/frames

Every request is hostile until checked, and every refusal is a 4xx with {"error": message}, never a traceback:

- bodies: at most `search.max_body_bytes` (413 beyond, checked on Content-Length and on the bytes actually
  received), parsed and validated in a worker thread (`read_body`: one place for every JSON endpoint), so a
  large or many-keyed body never stalls the event loop;
- images: only by row id (at most 20 digits), and the file is opened through lgur.search.paths.open_gallery_file:
  resolved again on every request and required to stay under the index's images root, so a file swapped
  for a symlink after indexing is refused (403), not followed;
- concurrent searches are encoded together (`QueryBatcher`): requests wait in an asyncio queue; one worker
  takes up to search.serve_batch_max of them (waiting search.serve_batch_window_ms for more after the first)
  and runs one Searcher.search over them in a thread. serve_batch_max: 1 encodes each request alone.
"""
# no `from __future__ import annotations`: FastAPI must see the request model class defined inside
# create_app (its limits come from the config), not a string it cannot resolve
import asyncio
import base64
import io
import json
import logging
import mimetypes
import os
import time
from pathlib import Path
from typing import Any, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lgur.search.explain import explain_hits, hit_panels
from lgur.search.filters import filter_from_request
from lgur.search.index import SearchError
from lgur.search.paths import OutsideGallery, open_gallery_file
from lgur.search.searcher import QueryResult, Searcher

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_ID_DIGITS = 20  # /img/{id}: longer digit strings are refused before int() (5000 digits used to be a 500)
READ_CHUNK = 1 << 16


class RequestError(Exception):
    """A request the server refuses: `status` (4xx/5xx) and a readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = err.get("msg", "invalid")
    return f"{where}: {msg}" if where else msg


# ---------------------------------------------------------------------------------------------------------
# request bodies


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, whether announced by Content-Length
    or streamed (chunked); the app never sees more than `max_bytes` of body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def _refuse(self, send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body larger than {self.max_bytes} bytes (search.max_body_bytes / --max-body-bytes)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not (value.isdigit() and len(value) <= 20):
                    return await self._refuse(send, 400, "invalid Content-Length header")
                if int(value) > self.max_bytes:
                    return await self._refuse(send, 413, too_big)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestError(413, too_big)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestError as e:
            if started:
                raise
            await self._refuse(send, e.status, e.message)


def parse_body(body: bytes, model: type[BaseModel]) -> BaseModel:
    """JSON object `body` -> validated `model` (strict: no type coercion, no unknown keys); RequestError(422)
    with a readable message otherwise. CPU-bound: call it off the event loop (`read_body`)."""
    if not body.strip():
        raise RequestError(422, "empty body: send a JSON object, e.g. {\"query\": \"a man in a red coat\", \"k\": 10}")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(422, "body is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise RequestError(422, f"body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(422, "body is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"body must be a JSON object, not {type(data).__name__}")
    unknown = [key for key in data if key not in model.model_fields]
    if unknown:  # named here, not by pydantic, which would build one error per key (200k keys: seconds)
        shown = ", ".join(repr(key[:40]) for key in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise RequestError(422, f"unknown field(s) {shown}{more}; expected {', '.join(model.model_fields)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError(422, "; ".join(_describe(err) for err in e.errors()[:5]) or "invalid request") from None


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The one entry point for JSON request bodies: read (bounded by BodyLimit), then parse and validate in
    a worker thread so that the event loop keeps answering other requests meanwhile."""
    return await run_in_threadpool(parse_body, await request.body(), model)


def query_model(max_query_chars: int, max_k: int) -> type[BaseModel]:
    class SearchRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")
        query: str = Field(min_length=1, max_length=max_query_chars)
        k: int = Field(default=10, ge=1, le=max_k)
        per_track: bool = False  # video indexes: one hit per track
        # metadata filter (lgur.search.filters.filter_from_request checks them further): clauses such as
        # "camera=3", and a time range (Unix seconds or ISO 8601)
        where: str | list[str] | None = None
        after: str | int | float | None = None
        before: str | int | float | None = None

        @field_validator("query")
        @classmethod
        def has_text(cls, v: str) -> str:
            if not v.strip():
                raise ValueError("must contain some text")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid Unicode text (lone surrogate)") from None
            return v

    return SearchRequest


def explain_model(search_model: type[BaseModel], max_k: int) -> type[BaseModel]:
    """/api/explain's body: the search body (the same query/k checks) plus optional row ids to explain."""
    class ExplainRequest(search_model):
        ids: list[int] | None = Field(default=None, min_length=1, max_length=max_k)

    return ExplainRequest


def explain_payload(searcher: Searcher, query: str, ids: list[int], load) -> dict:
    """The /api/explain answer (runs the model: call it in a worker thread). `load(id)` opens a crop inside the
    gallery (lgur.search.paths), for the panels and for rows whose maps the index does not hold."""
    ex = explain_hits(searcher, query, ids, load)
    out = ex.to_dict()
    for hit, hx in zip(out["hits"], ex.hits):
        hit["url"] = f"/img/{hx.id}"
        hit["path"] = searcher.index.files.path(hx.id)
        try:
            crop = load(hx.id)
        except Exception as e:  # noqa: BLE001 -- a gone or refused file: the hit is explained without pictures
            hit["panels"], hit["image_error"] = [], f"crop not available ({type(e).__name__})"
            continue
        hit["panels"] = [{"name": name, "src": _data_url(im)} for name, im in hit_panels(crop, hx)]
    return out


def _data_url(im) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------------------
# micro-batching


class QueryBatcher:
    """Encodes concurrent queries together (one Searcher.search over a batch, in a worker thread).

    `search(text, k, **options)` queues the query and awaits its result. Up to `workers` workers per event loop
    drain the queue (each batch runs in a thread; Searcher.parallel lets that many run at once): a worker takes
    the first waiting query, then more until `max_batch` or until `window_s` has passed since the first,
    searches them together and resolves each request's future; it exits when the queue is empty
    (the next request starts it again), so no task outlives the traffic. More than `max_pending` waiting
    queries: 503. Results equal one-at-a-time search: Searcher.search scans each distinct k separately, and
    queries with different `options` (further Searcher.search keyword arguments, e.g. a filter) go to
    separate calls.
    """

    def __init__(self, searcher: Searcher, max_batch: int, window_s: float, max_pending: int, workers: int = 1):
        self.searcher, self.max_batch, self.window_s = searcher, max(1, int(max_batch)), max(0.0, float(window_s))
        self.max_pending, self.workers = max(1, int(max_pending)), max(1, int(workers))
        self._loop = self._queue = None
        self._tasks: list[asyncio.Task] = []
        self._collecting = 0  # workers gathering a batch now
        self.batches: list[int] = []  # sizes of the last batches run (diagnostics, /api/info)

    @property
    def recent_mean(self) -> float | None:
        return round(sum(self.batches) / len(self.batches), 2) if self.batches else None

    async def search(self, text: str, k: int, **options) -> QueryResult:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use on this loop (a test client may run one loop per request)
            self._loop, self._queue, self._tasks, self._collecting = loop, asyncio.Queue(), [], 0
        if self._queue.qsize() >= self.max_pending:
            raise RequestError(503, f"server busy: {self._queue.qsize()} queries waiting; retry shortly")
        fut = loop.create_future()
        self._queue.put_nowait((text, k, options, fut))
        self._spawn(loop)
        return await fut

    def _spawn(self, loop) -> None:
        """Another worker for the waiting queries, only while every running one is busy searching (a worker
        still collecting a batch takes them) and fewer than `workers` run."""
        self._tasks = [t for t in self._tasks if not t.done()]
        if len(self._tasks) < self.workers and not self._collecting and not self._queue.empty():
            self._collecting += 1  # counted from now, so the next request does not start a worker too
            self._tasks.append(loop.create_task(self._work(self._queue, counted=True)))

    async def _work(self, queue: asyncio.Queue, counted: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while not queue.empty():
            if not counted:
                self._collecting += 1
            counted = False
            try:
                batch = await self._collect(queue, loop)
            finally:
                self._collecting -= 1
            self._spawn(loop)  # queries left over for the next batch: another worker may take them meanwhile
            batch = [b for b in batch if not b[3].done()]  # a cancelled request needs no answer
            if batch:
                self.batches = (self.batches + [len(batch)])[-100:]
            while batch:  # one search per distinct options (usually all equal: one call)
                same = [b for b in batch if b[2] == batch[0][2]]
                batch = [b for b in batch if b[2] != same[0][2]]
                await self._run_one(same)
        if counted:  # started for a query another worker took first
            self._collecting -= 1

    async def _collect(self, queue: asyncio.Queue, loop) -> list:
        """The first waiting query, then more until max_batch or until window_s has passed since the first."""
        batch = [queue.get_nowait()]
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run_one(self, batch: list) -> None:
        try:
            results = await run_in_threadpool(self.searcher.search, [b[0] for b in batch], [b[1] for b in batch],
                                              **batch[0][2])
        except Exception as e:  # noqa: BLE001 -- the worker goes on; only the request(s) at fault get the error
            if len(batch) > 1:  # one query of many failed the batch: run them alone, so the others are answered
                for b in batch:
                    await self._run_one([b])
                return
            if not batch[0][3].done():
                batch[0][3].set_exception(e)
            return
        for (*_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)


# ---------------------------------------------------------------------------------------------------------
# the app


def create_app(searcher: Searcher, max_query_chars: int | None = None, max_k: int | None = None,
               max_body_bytes: int | None = None, batch_max: int | None = None, batch_window_ms: float | None = None,
               follow_symlinks: bool = False, workers: int | None = None) -> FastAPI:
    """The app around an already-loaded `searcher`; every limit defaults to the search: config section.

    follow_symlinks: serve gallery files that are symlinks leading outside the images root (only for an
    index built with `lgur index --follow-symlinks`, whose owner trusts the links in the gallery).
    """
    cfg = searcher.cfg
    pick = lambda value, key: getattr(cfg, key) if value is None else value  # noqa: E731
    max_query_chars, max_k = int(max_query_chars or cfg.max_query_chars), int(max_k or cfg.max_k)
    max_body_bytes = int(pick(max_body_bytes, "max_body_bytes"))
    batch_max = int(pick(batch_max, "serve_batch_max"))
    batch_window_s = float(pick(batch_window_ms, "serve_batch_window_ms")) / 1e3
    SearchRequest = query_model(max_query_chars, max_k)
    ExplainRequest = explain_model(SearchRequest, max_k)
    batcher = None
    if batch_max > 1:
        workers = searcher.parallel(int(pick(workers, "serve_workers")))
        batcher = QueryBatcher(searcher, batch_max, batch_window_s, int(cfg.serve_max_pending), workers)
    root = searcher.index.images_root.resolve()
    frames_root = root.parent / "frames"  # video indexes: OUT.media/crops is the images root (lgur.video.ingest)

    app = FastAPI(title="lgur person search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {str(exc)[:300]})"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    async def info() -> dict:
        m = searcher.index.manifest
        return {"images": len(searcher), "model": m["model"], "fingerprint": m["fingerprint"],
                "engine": type(searcher.engine).__name__, "max_k": max_k, "max_query_chars": max_query_chars,
                "video": "frame_image" in searcher.index.files.metadata_columns,
                "max_body_bytes": max_body_bytes, "batch_max": batch_max,
                "workers": batcher.workers if batcher is not None else 1,
                "batch_recent_mean": batcher.recent_mean if batcher is not None else None}

    def has_filter(req: BaseModel) -> bool:
        return any(v is not None for v in (req.where, req.after, req.before))

    def request_filter(req: BaseModel) -> dict:
        """The search options of a request: {} or {"where": Filter}, checked against the index's columns
        (the selected rows are cached by the searcher, so the search itself reuses them)."""
        try:
            flt = filter_from_request(req.model_dump())
            if not flt:
                return {}
            searcher.select(flt)
        except SearchError as e:
            raise RequestError(422, str(e)) from None
        return {"where": flt}

    @app.post("/api/search")
    async def search(request: Request) -> dict:
        req = await read_body(request, SearchRequest)
        options = await run_in_threadpool(request_filter, req) if has_filter(req) else {}
        t = time.perf_counter()
        if req.per_track:
            options["per_track"] = True
        if batcher is not None:
            result = await batcher.search(req.query, req.k, **options)
        else:
            [result] = await run_in_threadpool(lambda: searcher.search([req.query], req.k, **options))
        hits = [{**h.to_dict(), "url": f"/img/{h.id}", **({"frame_url": f"/frame/{h.id}"} if h.frame_file else {})}
                for h in result.hits]
        return {"query": req.query, "k": req.k, "results": hits, "ms": round((time.perf_counter() - t) * 1e3, 2)}

    def load_crop(i: int):
        """Crop `i` decoded from a file opened inside the gallery (never a path outside it)."""
        fd, st = open_gallery_file(root, searcher.index.files.path(int(i)), follow_symlinks)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > 64 << 20:
                raise OSError("image larger than 64 MiB")
            with Image.open(f) as im:
                return im.convert("RGB")

    @app.post("/api/explain")
    async def explain(request: Request) -> dict:
        req = await read_body(request, ExplainRequest)
        t = time.perf_counter()
        if req.ids is None:  # the hits /api/search would give (same filter)
            options = await run_in_threadpool(request_filter, req) if has_filter(req) else {}
            [result] = await run_in_threadpool(searcher.search, [req.query], req.k, **options)
            ids = [h.id for h in result.hits]
        else:
            bad = [i for i in req.ids if not 0 <= i < len(searcher)]
            if bad:
                raise RequestError(422, f"ids: {bad[0]} is not a gallery row (0..{len(searcher) - 1})")
            ids = list(req.ids)
        out = await run_in_threadpool(explain_payload, searcher, req.query, ids, load_crop)
        out["ms"] = round((time.perf_counter() - t) * 1e3, 2)
        return out

    @app.get("/img/{image_id}")
    def image(image_id: str) -> Any:
        # the id is parsed here rather than typed as int so that anything but a row number ("..", "-1",
        # "1e3", "%2e%2e%2fetc", 5000 digits) is a plain 404, never a path; files are looked up only
        # through the index, and opened only inside its images root
        if not (image_id.isascii() and image_id.isdigit() and len(image_id) <= MAX_ID_DIGITS) \
                or int(image_id) >= len(searcher):
            shown = image_id[:40] + ("..." if len(image_id) > 40 else "")
            return JSONResponse({"error": f"no gallery image {shown!r}"}, status_code=404)
        rel = searcher.index.files.path(int(image_id))
        try:
            fd, st = open_gallery_file(root, rel, follow_symlinks)
        except OutsideGallery as e:
            log.warning("refused /img/%s: %s", image_id, e)
            return JSONResponse({"error": f"gallery image {image_id} is not served: it no longer lies inside "
                                          f"the gallery folder or is not a regular file"}, status_code=403)
        except OSError:
            return JSONResponse({"error": f"gallery image {image_id} is gone from disk"}, status_code=404)
        media = mimetypes.guess_type(rel)[0] or "application/octet-stream"
        return StreamingResponse(_chunks(fd, st.st_size), media_type=media,
                                 headers={"content-length": str(st.st_size), "x-content-type-options": "nosniff"})

    @app.get("/frame/{image_id}")
    def frame(image_id: str) -> Any:
        # video indexes: the same id rule as /img; the frame's path comes from the row (frame_image, relative
        # to OUT.media) and is opened only inside OUT.media/frames
        if not (image_id.isascii() and image_id.isdigit() and len(image_id) <= MAX_ID_DIGITS) \
                or int(image_id) >= len(searcher):
            return JSONResponse({"error": f"no gallery image {image_id[:40]!r}"}, status_code=404)
        cols = searcher.index.files.columns
        rel = bytes(cols["frame_image"][int(image_id)]).decode("utf-8", "replace") if "frame_image" in cols else ""
        if not rel.startswith("frames/"):
            return JSONResponse({"error": f"gallery image {image_id} has no frame"}, status_code=404)
        try:
            fd, st = open_gallery_file(frames_root, rel[len("frames/"):], False)
        except OutsideGallery as e:
            log.warning("refused /frame/%s: %s", image_id, e)
            return JSONResponse({"error": f"the frame of gallery image {image_id} is not served"}, status_code=403)
        except OSError:
            return JSONResponse({"error": f"the frame of gallery image {image_id} is gone from disk"}, status_code=404)
        return StreamingResponse(_chunks(fd, st.st_size), media_type="image/jpeg",
                                 headers={"content-length": str(st.st_size), "x-content-type-options": "nosniff"})

    return app


def _chunks(fd: int, size: int) -> Iterator[bytes]:
    """The first `size` bytes (its size when checked) of an already-opened, checked file; then close it."""
    with os.fdopen(fd, "rb") as f:
        while size > 0 and (chunk := f.read(min(READ_CHUNK, size))):
            size -= len(chunk)
            yield chunk


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Run the app with uvicorn; `limits` are create_app's keyword arguments (None: from the config)."""
    uvicorn.run(create_app(searcher, **limits), host=host, port=port, log_level="info")
