"""GET /api/images: the indexed images, a page at a time, for the web page's opening grid.

The page opens on the collection, so "more like this" needs no file at hand: a click on any listed
image searches by its row id. Images are listed by id with their file name and the URLs of the image
and its thumbnail; the full path is included as search results include it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from focalsearch.api import FocalSearch

MAX_PAGE = 500


def image_entry(image_id: str, path: str) -> dict:
    """How the API shows one indexed image (the same fields as a search hit, less the scores)."""
    return {
        "image_id": image_id,
        "path": path,
        "name": Path(path).name,
        "image": f"/api/images/{image_id}",
        "thumbnail": f"/api/thumbnails/{image_id}?size=256",
    }


def gallery_router(engine: FocalSearch) -> APIRouter:
    router = APIRouter()

    @router.get("/api/images")
    async def images(offset: int = Query(0, ge=0, le=10**9), limit: int = Query(48, ge=1, le=MAX_PAGE)):
        """The indexed images sorted by path, ``limit`` from ``offset``, with the total count.

        They are read from the condition with the most rows (every condition of one indexing run
        holds the same images); ``instruction`` names it.
        """
        page = await run_in_threadpool(engine.images, offset=offset, limit=limit)
        return {
            "total": page.total, "offset": page.offset, "limit": limit, "instruction": page.instruction,
            "images": [image_entry(image_id, path) for image_id, path in page.images],
        }

    return router
