"""The HTTP API (binlat.serve) refuses what a browser sends for another site's page, before reading its body,
and serves same-origin and non-browser requests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from serve_support import LOCAL, assert_error, client, pipe  # noqa: F401  (client is made from pipe)


@pytest.mark.parametrize(
    "headers", [{"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}]
)
@pytest.mark.parametrize(
    "body",
    [
        {"content": b'{"prompt": "a red circle"}'},  # JSON with no Content-Type
        {"content": b"prompt=x", "ctype": "application/x-www-form-urlencoded"},
        {"content": b"--b--\r\n", "ctype": "multipart/form-data; boundary=b"},
    ],
)
def test_a_browser_request_from_another_site_is_refused(client, headers, body) -> None:
    """Another site's page may POST "simple" requests here without the user's say; they are refused before any
    body is read, whatever the endpoint."""
    sent = dict(headers, **({"content-type": body["ctype"]} if "ctype" in body else {}))
    for path in ("/v1/generate", "/v1/reconstruct", "/v1/edit"):
        assert_error(client.post(path, content=body["content"], headers=sent), 403, "cross-site request refused")


def test_same_origin_and_non_browser_requests_are_served(client) -> None:
    request = {"prompt": "a red circle", "steps": 1, "seed": 0}
    for headers in ({}, {"origin": LOCAL, "sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"}):
        response = client.post("/v1/generate", json=request, headers=headers)
        assert response.status_code == 200, (headers, response.text)
