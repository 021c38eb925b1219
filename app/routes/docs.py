"""`/docs`: Swagger UI from an installed package (swagger-ui-py's bundle), so it works offline.

FastAPI's own `/docs` loads Swagger UI from a CDN: blank on a network without internet access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

#: Where the docs' scripts and styles are served from (`app.main` mounts `SWAGGER_UI_DIR` there).
ASSETS_PATH = "/docs/assets"


def _swagger_ui_dir() -> Path:
    # The package's folder without importing it (its __init__ pulls in its own web handlers).
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: `pip install swagger-ui-py` (a dependency)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


SWAGGER_UI_DIR = _swagger_ui_dir()

docs_router = APIRouter(include_in_schema=False)


@docs_router.get("/docs")
def api_docs() -> HTMLResponse:
    """The interactive API reference, every asset from this gateway."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="DreamOmni2 Serve - API",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
    )
