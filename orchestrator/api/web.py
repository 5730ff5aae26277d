"""The web page: `GET /` and its script and style sheet, packaged in `orchestrator/web/` (docs/api.md "Web page").

The page is a client of `POST /v1/analyze` like any other: it posts the image and question with `stream=true` and
reads the events. Nothing is built, and nothing is fetched from elsewhere at run time: the three files are served as
they are, under a content security policy that allows only this origin's script, style and API (and the picked
image's `blob:` preview). The page puts server text into the document only as text, never as markup.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

web = APIRouter(include_in_schema=False)

ASSET_TYPES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""Every file the page is made of, and its media type; nothing else under `orchestrator/web/` is served."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _served(name: str) -> Response:
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no such file: /web/{name}")
    content = files("orchestrator").joinpath("web", name).read_bytes()
    return Response(content, media_type=media_type, headers=_HEADERS)


@web.get("/")
def page() -> Response:
    """The page (`orchestrator/web/index.html`)."""
    response = _served("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@web.get("/web/{name}")
def asset(name: str) -> Response:
    """The page's script and style sheet (`app.js`, `style.css`)."""
    if name == "index.html":
        raise HTTPException(404, "the page is served at /")
    return _served(name)
