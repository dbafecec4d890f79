"""`lgur serve`: a small web page and a JSON API over one Searcher (model loaded once at startup).

    GET  /                 the search page (static/index.html: text box, k selector, grid of hits)
    POST /api/search       {"query": str (1..max_query_chars), "k": int (1..max_k)} -> {"query", "k", "results":
                           [{"rank", "score", "id", "path", "url"}], "ms"}
    GET  /api/info         gallery size, model, search engine
    GET  /img/{id}         gallery image `id` (an index row); ids only, never a user-supplied path

Bad requests get a 4xx with {"error": message}. Search runs in FastAPI's thread pool (the endpoint is a plain
def) so the event loop stays free while the model encodes.
"""
# no `from __future__ import annotations`: FastAPI must see the request model class defined inside
# create_app (its limits come from the config), not a string it cannot resolve
import mimetypes
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lgur.search.searcher import Searcher

STATIC = Path(__file__).with_name("static")


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    return f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid request")


def create_app(searcher: Searcher, max_query_chars: int | None = None, max_k: int | None = None) -> FastAPI:
    """The app around an already-loaded `searcher` (limits default to the search: config section)."""
    max_query_chars = int(max_query_chars or searcher.cfg.max_query_chars)
    max_k = int(max_k or searcher.cfg.max_k)

    class SearchRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")
        query: str = Field(min_length=1, max_length=max_query_chars)
        k: int = Field(default=10, ge=1, le=max_k)

    app = FastAPI(title="lgur person search", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return JSONResponse({"error": "; ".join(_describe(e) for e in errors[:5]) or "invalid request"},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info() -> dict:
        m = searcher.index.manifest
        return {"images": len(searcher), "model": m["model"], "fingerprint": m["fingerprint"],
                "engine": type(searcher.engine).__name__, "max_k": max_k, "max_query_chars": max_query_chars}

    @app.post("/api/search")
    def search(req: SearchRequest) -> dict:
        if not req.query.strip():
            return JSONResponse({"error": "query: must contain some text"}, status_code=422)
        t = time.perf_counter()
        [result] = searcher.search([req.query], k=req.k)
        hits = [{**h.to_dict(), "url": f"/img/{h.id}"} for h in result.hits]
        return {"query": req.query, "k": req.k, "results": hits, "ms": round((time.perf_counter() - t) * 1e3, 2)}

    @app.get("/img/{image_id}")
    def image(image_id: str) -> FileResponse:
        # the id is parsed here rather than typed as int so that anything but a row number ("..", "-1",
        # "1e3", "%2e%2e%2fetc") is a plain 404, never a path; files are looked up only through the index
        if not (image_id.isascii() and image_id.isdigit()) or int(image_id) >= len(searcher):
            return JSONResponse({"error": f"no gallery image {image_id[:40]!r}"}, status_code=404)
        path = searcher.index.file(int(image_id))
        if not path.is_file():
            return JSONResponse({"error": f"gallery image {image_id} is gone from disk"}, status_code=404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(searcher), host=host, port=port, log_level="info")
