"""``client_script_route()`` serves the JavaScript client: type, HEAD, ETag and 304."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

import wsession
from wsession import client_script_path, client_script_route

pytestmark = pytest.mark.timeout(10)

SCRIPT = Path(wsession.__file__).resolve().parent / "static" / "wsession-client.js"


@pytest.fixture
def client() -> TestClient:
    return TestClient(Starlette(routes=[client_script_route()]))


def test_the_path_is_the_packaged_script() -> None:
    assert client_script_path() == SCRIPT
    assert SCRIPT.is_file()
    assert b"WSessionClient" in SCRIPT.read_bytes()


def test_get_serves_the_script_as_javascript(client: TestClient) -> None:
    response = client.get("/wsession-client.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.content == SCRIPT.read_bytes()
    assert response.headers["content-length"] == str(len(SCRIPT.read_bytes()))
    assert response.headers["cache-control"] == "no-cache"
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10


def test_head_has_the_headers_of_get_without_a_body(client: TestClient) -> None:
    get = client.get("/wsession-client.js")
    head = client.head("/wsession-client.js")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-length", "etag", "cache-control"):
        assert head.headers[name] == get.headers[name], name


@pytest.mark.parametrize("form", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
def test_a_matching_if_none_match_gets_304(client: TestClient, form: str) -> None:
    etag = client.get("/wsession-client.js").headers["etag"]
    for method in ("GET", "HEAD"):
        response = client.request(
            method, "/wsession-client.js", headers={"If-None-Match": form.format(etag=etag)}
        )
        assert response.status_code == 304, method
        assert response.content == b""
        assert response.headers["etag"] == etag


def test_another_etag_gets_the_script(client: TestClient) -> None:
    response = client.get("/wsession-client.js", headers={"If-None-Match": '"stale"'})
    assert response.status_code == 200
    assert response.content == SCRIPT.read_bytes()


def test_the_etag_is_the_same_for_every_route_instance() -> None:
    """A content hash, not an mtime: every worker of a deployment answers the same ETag."""
    etags = {
        TestClient(Starlette(routes=[client_script_route()]))
        .get("/wsession-client.js")
        .headers["etag"]
        for _ in range(2)
    }
    assert len(etags) == 1


def test_path_and_cache_control_are_configurable() -> None:
    route = client_script_route("/static/ws.js", cache_control="public, max-age=60")
    assert route.name == "wsession_client_script"
    with TestClient(Starlette(routes=[route])) as client:
        assert client.get("/wsession-client.js").status_code == 404
        response = client.get("/static/ws.js")
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=60"


def test_other_methods_are_not_allowed(client: TestClient) -> None:
    assert client.post("/wsession-client.js").status_code == 405
