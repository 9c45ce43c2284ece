"""The JavaScript client shipped with the package, and a Starlette route that serves it.

The file is read once, when the route is made; its ETag is a hash of its bytes (not of an
mtime), so every worker of a deployment answers with the same ETag.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_SCRIPT = Path(__file__).resolve().parent / "static" / "wsession-client.js"
_MEDIA_TYPE = "text/javascript; charset=utf-8"


def client_script_path() -> Path:
    """The path of ``wsession-client.js`` inside the installed package.

    For apps that serve static files their own way (a CDN, ``StaticFiles``, a build step
    that copies it). :func:`client_script_route` serves the same file.

    Returns:
        The absolute path of the script (a plain ES2020 file, no build step needed).
    """
    return _SCRIPT


def _etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, as RFC 9110)."""
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


def client_script_route(
    path: str = "/wsession-client.js", *, cache_control: str = "no-cache"
) -> Route:
    """A route that serves the JavaScript client (``GET`` and ``HEAD``).

    Add it to the app's routes, next to the WebSocket endpoint::

        app = Starlette(routes=[WebSocketRoute("/ws", ws), client_script_route()])
        # FastAPI: app.router.routes.append(client_script_route())

    and load it in the page with ``<script src="/wsession-client.js"></script>``. The response
    has ``Content-Type: text/javascript; charset=utf-8``, an ``ETag`` (a hash of the file)
    and ``Cache-Control``; a request whose ``If-None-Match`` names the ETag gets
    ``304 Not Modified``. The client's API is described in the "JavaScript client" page of the
    documentation.

    Args:
        path: Where to serve it.
        cache_control: The ``Cache-Control`` value. The default, ``no-cache``, lets browsers
            keep a copy but revalidate it (a cheap 304) on each load, so an upgraded package
            is picked up at once; use e.g. ``"public, max-age=3600"`` to skip revalidation.

    Returns:
        A :class:`starlette.routing.Route` named ``wsession_client_script``.

    Raises:
        FileNotFoundError: The script is missing from the installed package.
    """
    body = _SCRIPT.read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": cache_control}

    async def serve(request: Request) -> Response:
        if _etag_matches(request.headers.get("if-none-match", ""), etag):
            return Response(status_code=304, headers=headers)
        if request.method == "HEAD":  # the headers of the GET, without the body
            return Response(
                headers={**headers, "Content-Length": str(len(body))}, media_type=_MEDIA_TYPE
            )
        return Response(body, headers=headers, media_type=_MEDIA_TYPE)

    return Route(path, serve, methods=["GET", "HEAD"], name="wsession_client_script")
