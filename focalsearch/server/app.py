"""`focalsearch serve`: the FocalSearch engine behind a JSON API, and the web gallery (design §3b).

The encoder is loaded once and encodes concurrent queries in shared batches; each condition's
search index is kept while its table is unchanged and reloaded when another process commits to it.
Images and thumbnails are served by row id only, never by a path taken from a request.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import mimetypes
import os
from dataclasses import asdict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_swagger import resources as swagger_ui  # Swagger UI 5: reads OpenAPI 3.1
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from focalsearch import errors, objectstore
from focalsearch.api import FocalSearch, SearchResult
from focalsearch.images import DEFAULT_MAX_QUERY_PIXELS, LoadedImage, SkippedImage, decode_image_bytes, decoded_pixels
from focalsearch.server.budget import PixelBudget
from focalsearch.server.gallery import gallery_router
from focalsearch.server.security import HostPolicy, SiteGuard, loads_json, media_type
from focalsearch.server.thumbnails import ThumbnailCache

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1000 * 1000
TOKEN_COOKIE = "focalsearch_token"
MAX_TEXT = 2000


class PayloadTooLarge(Exception):
    """A request body above the upload limit."""


class WeightedInstruction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(max_length=MAX_TEXT)
    weight: float = 1.0


class SearchBody(BaseModel):
    """POST /api/search as JSON: one query (text or image_id), one instruction or weighted conditions."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=MAX_TEXT)
    image_id: str | None = Field(None, max_length=64)
    instruction: str | None = Field(None, max_length=MAX_TEXT)
    conditions: list[WeightedInstruction] | None = Field(None, min_length=1, max_length=8)
    k: int = Field(10, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=100_000)


class CompareBody(BaseModel):
    """POST /api/compare as JSON: one query under 2 to 4 instructions."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=MAX_TEXT)
    image_id: str | None = Field(None, max_length=64)
    instructions: list[Annotated[str, Field(max_length=MAX_TEXT)]] = Field(min_length=2, max_length=4)
    k: int = Field(10, ge=1, le=1000)


_STATUS = [  # most specific first
    (errors.UnknownConditionError, 404),
    (errors.UnknownImageError, 404),
    (errors.EmptyConditionError, 404),
    (errors.IndexNotFoundError, 404),
    (errors.DamagedIndexError, 409),
    (errors.IndexBusyError, 409),
    (errors.UserError, 400),
]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())[:500]}, status_code=status)


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes, whether they declare a length or stream."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body over the {self.limit} byte limit")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(f"request body over the {self.limit} byte limit")
            return message

        return await self.app(scope, limited, send)


def carries_token(request: Request, token: bytes) -> bool:
    """Whether the request carries ``token``: ``Authorization: Bearer <token>`` or the page's cookie."""
    header = request.headers.get("authorization", "")
    offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(TOKEN_COOKIE, "")
    return hmac.compare_digest(offered.encode(), token)


class _RequireToken:
    """Every /api request must carry the token: ``Authorization: Bearer <token>`` or the page's cookie."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            if not carries_token(Request(scope), self.token):
                return await _error(401, "missing or wrong token: send Authorization: Bearer <token>")(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(
    index_dir: str | Path,
    *,
    token: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    engine: FocalSearch | None = None,
    max_query_pixels: int = DEFAULT_MAX_QUERY_PIXELS,
    host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The server for one index. Loads the model now, so the first query is as fast as the rest.

    ``host`` is the address it is bound to: with ``localhost`` and ``allowed_hosts`` it is what the
    server answers to in the Host header (see focalsearch.server.security).
    """
    policy = HostPolicy(host, allowed_hosts)
    engine = engine or FocalSearch(index_dir, device=device, precision=precision, threads=threads)
    engine.conditions()  # fails now, with its one-line error, on a folder that is not an index
    engine.enable_batching()
    thumbnails = ThumbnailCache(engine._open_store().root / "thumbnails", engine.max_pixels)
    # Uploads above max_query_pixels are refused; those below share this many decoded pixels at once.
    pixel_budget = PixelBudget(max_query_pixels)

    # Swagger UI from a package rather than FastAPI's default CDN, so /docs works offline too.
    app = FastAPI(title="FocalSearch", description="Instruction-conditioned image search.", version="0.1.0",
                  docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(_BodyLimit, limit=max_upload_bytes)

    if token:
        app.add_middleware(_RequireToken, token=token)
    app.add_middleware(SiteGuard, policy=policy)  # the outermost: Host, Origin and content type first

    @app.exception_handler(errors.FocalSearchError)
    async def focalsearch_error(request: Request, exc: errors.FocalSearchError):
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(PayloadTooLarge)
    async def too_large(request: Request, exc: PayloadTooLarge):
        return _error(413, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}")

    def result_dict(result: SearchResult, query: dict) -> dict:
        out = result.to_dict()
        out["query"] = query
        for hit in out["results"]:
            hit["image"] = f"/api/images/{hit['image_id']}"
            hit["thumbnail"] = f"/api/thumbnails/{hit['image_id']}?size=256"
        return out

    def holds_upload_pixels(handler):
        """Give a handler's request a ticket of the pixel budget, returned when the handler is done."""
        @functools.wraps(handler)
        async def handle(request: Request):
            async with pixel_budget.ticket() as ticket:
                request.state.pixel_ticket = ticket
                return await handler(request)
        return handle

    async def decode_upload(request: Request, data: bytes, name: Path) -> LoadedImage | SkippedImage:
        """Decode an upload off the event loop, once its decoded pixels fit the budget (see server.budget)."""
        min_side = engine._batcher.encoder.min_decode_side
        pixels = await run_in_threadpool(decoded_pixels, data, min_side=min_side)
        if pixels is not None and pixels <= max_query_pixels:  # above the cap, decode refuses from the header
            await request.state.pixel_ticket.take(pixels)
        return await run_in_threadpool(
            decode_image_bytes, data, name, max_pixels=engine.max_pixels, min_side=min_side, max_decoded_pixels=max_query_pixels
        )

    async def read_query(request: Request, model: type[BaseModel]) -> tuple[BaseModel, LoadedImage | None, dict]:
        """The request's fields and, for a multipart upload, the decoded image; plus how to echo the query."""
        if media_type(request.headers.get("content-type", "")) == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=16)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise errors.UserError("a multipart query needs an image file in the field 'image'")
            fields = {}  # every other field, so that a misspelt one or a text beside the image is refused, not dropped
            for name, value in form.multi_items():
                if name == "image" or value == "":
                    continue
                if not isinstance(value, str):
                    raise errors.UserError(f"only the field 'image' may hold a file, not {name[:64]!r}")
                if name in fields:
                    raise errors.UserError(f"the field {name[:64]!r} is given twice")
                fields[name] = loads_json(value) if name in ("conditions", "instructions") else value
            body = model.model_validate(fields)
            data = await upload.read()
            loaded = await decode_upload(request, data, Path(upload.filename or "upload"))
            if not isinstance(loaded, LoadedImage):
                raise errors.InvalidImageError(f"cannot read the uploaded image: {loaded.reason}")
            return body, loaded, {"upload": upload.filename or "upload"}
        try:
            raw = loads_json(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise errors.UserError("the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise errors.UserError("the request body must be a JSON object")
        body = model.model_validate(raw)
        query = {"text": body.text} if body.text is not None else {"image_id": body.image_id}
        return body, None, query

    async def parse(request: Request, model: type[BaseModel]):
        try:
            return await read_query(request, model)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        except json.JSONDecodeError:
            raise errors.UserError("conditions and instructions must be JSON lists") from None

    def query_of(body, upload: LoadedImage | None) -> dict:
        given = {"text": body.text, "image_id": body.image_id, "image": upload}
        query = {key: value for key, value in given.items() if value is not None}
        if len(query) != 1:
            given = " and ".join(key if key != "image" else "an upload" for key in query)
            raise errors.UserError("give one query: text, image_id, or an image file in the field 'image'"
                                   + (f"; this request gives {given}" if given else ""))
        return query

    schema = {"content": {
        "application/json": {"schema": SearchBody.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}, "conditions": {"type": "string"},
            "instruction": {"type": "string"}, "k": {"type": "integer"}, "offset": {"type": "integer"}}}},
    }}

    @app.post("/api/search", openapi_extra={"requestBody": schema})
    @holds_upload_pixels
    async def search(request: Request):
        """One query (text, image_id or an uploaded image) under one instruction or weighted conditions."""
        body, upload, echo = await parse(request, SearchBody)
        conditions = [(c.instruction, c.weight) for c in body.conditions] if body.conditions else None
        result = await run_in_threadpool(
            engine.search, **query_of(body, upload), instruction=body.instruction, conditions=conditions, k=body.k, offset=body.offset
        )
        return JSONResponse(result_dict(result, echo))

    compare_schema = {"content": {
        "application/json": {"schema": CompareBody.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}, "instructions": {"type": "string"}, "k": {"type": "integer"}}}},
    }}

    @app.post("/api/compare", openapi_extra={"requestBody": compare_schema})
    @holds_upload_pixels
    async def compare(request: Request):
        """The same query under 2 to 4 instructions, one ranked list each."""
        body, upload, echo = await parse(request, CompareBody)
        results = await run_in_threadpool(engine.compare, instructions=body.instructions, k=body.k, **query_of(body, upload))
        return JSONResponse({"query": echo, "columns": [
            {"instruction": r.instruction, "results": result_dict(r, echo)["results"]} for r in results
        ]})

    @app.get("/api/conditions")
    async def conditions():
        """Every indexed condition with its rows, size on disk, and whether it is damaged."""
        summaries = await run_in_threadpool(engine.conditions)
        return {"index": engine.location, "conditions": [asdict(s) for s in summaries]}

    def indexed_path(image_id: str) -> Path | str:
        path = engine.image_path(image_id)
        if path is None:
            raise errors.UnknownImageError(f"unknown image_id {image_id[:64]!r}")
        if objectstore.is_uri(path):
            if objectstore.stat(path) is None:
                raise errors.UnknownImageError(f"the object of image {image_id} is gone; reindex the prefix")
            return path
        if not Path(path).is_file():
            raise errors.UnknownImageError(f"the file of image {image_id} is gone; reindex the folder")
        return Path(path)

    @app.get("/api/images/{image_id}")
    async def image(image_id: str):
        """The indexed image file itself, by row id."""
        path = await run_in_threadpool(indexed_path, image_id)
        media = mimetypes.guess_type(str(path).rsplit("/", 1)[-1])[0] or "application/octet-stream"
        headers = {"Cache-Control": "private, max-age=300"}
        if isinstance(path, str):  # an object: read through the object store
            data = await run_in_threadpool(objectstore.read, path)
            if isinstance(data, str):
                raise errors.UnknownImageError(f"the object of image {image_id} cannot be read: {data}")
            return Response(data, media_type=media, headers=headers)
        return FileResponse(path, media_type=media, headers=headers)

    @app.get("/api/thumbnails/{image_id}")
    async def thumbnail(image_id: str, size: int = Query(256, ge=16, le=1024)):
        """A JPEG thumbnail (longest side ``size``), made once and cached beside the index."""
        path = await run_in_threadpool(indexed_path, image_id)
        data = await run_in_threadpool(thumbnails.get, image_id, path, size)
        if data is None:
            raise errors.UnknownImageError(f"the file of image {image_id} can no longer be read")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/healthz")
    async def healthz(request: Request):
        """Whether the server is up; with the token, also the index and the query-batching counters."""
        if not token or not carries_token(request, token.encode()):
            return {"status": "ok"}
        batcher = engine._batcher
        return {"status": "ok", "index": engine.location,
                "queries_encoded": batcher.encoded, "forward_passes": batcher.batches,
                "query_arithmetic": batcher.arithmetic.as_dict() if batcher.arithmetic is not None else None}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="FocalSearch API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.include_router(gallery_router(engine))
    app.mount("/docs-assets", StaticFiles(directory=Path(swagger_ui.__file__).parent), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


SERVE_ENV = "FOCALSEARCH_SERVE"


def app_from_environment() -> FastAPI:
    """The app of one of several server processes (`serve --workers N`), configured through the environment."""
    from focalsearch.threads import configure_threads

    from focalsearch import objectstore

    from focalsearch.models.loading import quiet_transformers

    config = json.loads(os.environ[SERVE_ENV])
    configure_threads(config.pop("threads"))
    quiet_transformers()  # as the one-process server does: no library notices in each worker's log
    objectstore.configure(config.pop("storage_options", {}))
    return create_app(config.pop("index_dir"), **config)
