"""The real `binlat serve` process driven by headless Chromium: opening the page with a prompt and autorun=1
must put a generated PNG in the gallery, drawn by the generator the query names (else the first registered).
Chromium is Debian's package (`./dev test` installs it when it can)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from PIL import Image

from binlat.pipeline import Pipeline

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
    reason=f"{CHROMIUM} is not installed (Debian package 'chromium'; `./dev test` installs it when run as root)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`binlat serve --model <tiny bundle> --port 0` in a subprocess; yields its base URL."""
    bundle = Pipeline.random_tiny().save_pretrained(tmp_path_factory.mktemp("serve") / "tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "binlat.cli", "serve", "--model", str(bundle), "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        if not found.wait(60):
            proc.kill()
            pytest.fail(f"server did not start: stdout {''.join(lines)!r} stderr {proc.stderr.read()[-2000:]!r}")
        base = url[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server never answered /healthz"
            time.sleep(0.1)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts have run (virtual time waits while fetches are pending)."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def gallery_pngs(dom: str) -> list[str]:
    gallery = dom[dom.index('id="gallery"') :]
    return re.findall(r'<img class="result" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', gallery)


def test_page_generates_an_image_into_the_gallery(server, tmp_path) -> None:
    url = f"{server}/?prompt=a+red+circle&steps=3&seed=5&n=2&autorun=1"
    dom = ""
    for attempt in range(2):  # one retry: a very slow machine may outlast the virtual-time budget
        dom = dump_dom(url, tmp_path / f"profile-{attempt}")
        if gallery_pngs(dom):
            break
    images = gallery_pngs(dom)
    assert len(images) == 2, dom[-3000:]
    for b64 in images:
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.format == "PNG" and image.size == (64, 64)
    assert 'data-seed="5"' in dom and 'data-seed="6"' in dom
    # The generator the page starts on is the first registered kind the model has, as the API's default
    metas = re.findall(r'<div class="meta">([^<]*)</div>', dom)
    assert len(metas) == 2 and all(" · diffusion · " in meta for meta in metas), metas
    assert 'class="download"' in dom and 'download="binlat-generate-seed5.png"' in dom
    status = re.search(r'<div id="status"[^>]*>([^<]*)</div>', dom)
    assert status and "2 image(s)" in status.group(1), status
    # The untrained model is announced in the header.
    assert "randomly initialised" in dom


def test_page_shows_a_server_error(server, tmp_path) -> None:
    dom = dump_dom(f"{server}/?prompt=x&steps=1000&autorun=1", tmp_path / "profile")
    assert not gallery_pngs(dom)
    status = re.search(r'<div id="status"[^>]*class="error"[^>]*>([^<]*)</div>', dom) or re.search(
        r'<div id="status"[^>]*>([^<]*)</div>', dom
    )
    assert status and "max_steps" in status.group(1), status


def test_page_takes_the_generator_from_the_query(server, tmp_path) -> None:
    """?generator= picks the generator (the page once lost it when it learnt the model's kinds, and drew with the
    first of them)."""
    dom = dump_dom(f"{server}/?prompt=a+red+circle&generator=ar&cfg=2&seed=1&autorun=1", tmp_path / "profile")
    metas = re.findall(r'<div class="meta">([^<]*)</div>', dom)
    assert len(metas) == 1 and " · ar · " in metas[0], (metas, dom[-3000:])
