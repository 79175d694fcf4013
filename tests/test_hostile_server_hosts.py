"""Hostile-input catalogue, server part (issue 29, item 7): only requests whose Host names this server are
served (DNS rebinding), a browser's POST must come from this server's own origin, the allow-list widens only
as `--host`/`--allowed-host` ask, and `binlat serve` hands its new limits to the server."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from fastapi.testclient import TestClient

from binlat.serve import allowed_hosts_for, create_app
from hostile_server_support import (  # noqa: F401
    LIMITS,
    LOCAL,
    assert_error,
    client,
    pipe,
)


def run_cli(*argv: str) -> int:
    from binlat.cli import main

    try:
        return main(list(argv))
    except SystemExit as e:  # argparse's own exits
        return e.code


def test_host_header_must_name_this_server(client) -> None:
    for host in ("localhost", "localhost:7860", "127.0.0.1:7860", "[::1]:7860", "LOCALHOST"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:7860", "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0"):
        for path, method in (("/", "GET"), ("/healthz", "GET"), ("/v1/generate", "POST")):
            response = client.request(method, path, headers={"host": host}, json={"prompt": "a cat"})
            assert_error(response, 400, f"Host '{host}' is not allowed", "localhost, 127.0.0.1, [::1]")
    assert client.get("/healthz").json()["admitted"] == 0


def test_a_rebound_page_is_refused_though_the_browser_sees_it_same_origin(client) -> None:
    """DNS rebinding: evil.example re-resolves to 127.0.0.1, so its page is same-origin to the browser, which sends
    Host and Origin evil.example. The old check (Origin equals Host) let it through."""
    headers = {"host": "evil.example:7860", "origin": "http://evil.example:7860", "sec-fetch-site": "same-origin"}
    assert_error(client.post("/v1/generate", json={"prompt": "a cat"}, headers=headers), 400, "not allowed")


def test_origin_must_be_this_host_and_on_the_allow_list(pipe) -> None:
    allowed = allowed_hosts_for("127.0.0.1", ["studio.example"])
    with TestClient(create_app(pipe, LIMITS, allowed), base_url="http://studio.example") as c:
        ok = c.post(
            "/v1/generate",
            json={"prompt": "a cat", "steps": 1},
            headers={"origin": "http://studio.example", "sec-fetch-site": "same-origin"},
        )
        assert ok.status_code == 200, ok.text
        for origin in ("http://localhost:8080", "http://evil.example", "http://[::1", "http://studio.example:1"):
            assert_error(
                c.post("/v1/generate", json={"prompt": "a cat"}, headers={"origin": origin}),
                403,
                "cross-site request refused",
            )


def test_allowed_hosts_widen_only_as_asked(pipe, capsys) -> None:
    allowed = allowed_hosts_for("0.0.0.0", ["gpu-box.lan", "*.example.org", "FE80::1"])
    assert allowed == ("localhost", "127.0.0.1", "[::1]", "0.0.0.0", "gpu-box.lan", "*.example.org", "[fe80::1]")
    with TestClient(create_app(pipe, LIMITS, allowed), base_url=LOCAL) as c:
        for host in ("gpu-box.lan:7860", "a.example.org", "0.0.0.0:7860", "[fe80::1]:7860"):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("example.org", "gpu-box.lan.evil", "evil.lan"):
            assert_error(c.get("/healthz", headers={"host": host}), 400, "not allowed")
    for bad in ("a*b", "*example.org", "http://x/"):
        with pytest.raises(ValueError, match="allowed host"):
            allowed_hosts_for("127.0.0.1", [bad])
    assert run_cli("serve", "--allowed-host", "a*b", "--port", "0") == 2  # before any socket or model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allowed host 'a*b'" in err and "Traceback" not in err


def test_serve_command_passes_the_new_limits(pipe, monkeypatch, capsys) -> None:
    import binlat.commands.images as images
    import binlat.serve as serve_mod

    seen = {}
    monkeypatch.setattr(images, "load_pipeline", lambda *a: pipe)
    monkeypatch.setattr(serve_mod, "serve", lambda app, *a, **k: seen.update(app=app))
    assert (
        run_cli(
            "serve",
            "--port",
            "0",
            "--max-connections",
            "5",
            "--header-timeout",
            "3",
            "--body-timeout",
            "4",
            "--allowed-host",
            "box.lan",
            "--allowed-host",
            "*.lan",
        )
        == 0
    )
    limits = seen["app"].state.served.limits
    assert (limits.max_connections, limits.header_timeout, limits.body_timeout) == (5, 3, 4)
    assert seen["app"].state.allowed_hosts == ("localhost", "127.0.0.1", "[::1]", "box.lan", "*.lan")
    for flag in ("--header-timeout", "--body-timeout", "--max-connections"):
        assert run_cli("serve", flag, "0") == 2
        assert capsys.readouterr().err.count("\n") == 1
