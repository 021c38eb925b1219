"""`/`: the web page, static files shipped in the package (`app/static/`), nothing fetched elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

#: The page's files: index.html, its scripts and app.css (package data, see pyproject.toml).
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

#: The page runs only its own script and style and talks only to this origin; images it shows are
#: the caller's own files and results as blob: URLs. Nothing may frame it (clickjacking).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny; always revalidate so a deployment's new page is seen at once.
    "Cache-Control": "no-cache",
}

page_router = APIRouter(include_in_schema=False)


@page_router.get("/")
def web_page() -> FileResponse:
    """The page: submit jobs, follow them live, download results (the API underneath, same origin)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)
