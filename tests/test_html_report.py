"""The HTML report: self-contained, every layer's picture present, rendered by a real headless Chromium that
is given a proxy which counts connections (none may be made)."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import bncheck

pytest.importorskip("matplotlib", reason="the html extra is not installed: pip install '.[html]'")
from bncheck.render import html as html_render

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ARTIFACTS = Path(os.environ.get("BNCHECK_ARTIFACTS", Path(__file__).resolve().parent.parent / ".artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Links(html.parser.HTMLParser):
    """Every attribute that can make a browser fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "action", "poster", "data") and value:
                self.targets.append(value)
            if name == "id" and value:
                self.ids.add(value)


@pytest.fixture(scope="module")
def drift_page(tmp_path_factory) -> Path:
    report = bncheck.probe(str(SAMPLES / "stale_drift.onnx"), data=str(SAMPLES / "calib_drift.npz"))
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(html_render.render(report), encoding="utf-8")
    return path


def test_page_fetches_nothing_from_anywhere(drift_page):
    text = drift_page.read_text(encoding="utf-8")
    links = _Links()
    links.feed(text)
    assert [t for t in links.targets if not t.startswith("#")] == []
    assert "<script" not in text and "@import" not in text
    assert re.findall(r"url\((?!#)", text) == []  # SVG clip paths point at ids inside the page only


def test_every_layer_has_its_statistics_picture_and_the_probe_plots_are_there(drift_page):
    links = _Links()
    links.feed(drift_page.read_text(encoding="utf-8"))
    assert {"stats-bn1", "stats-bn2", "stats-bn3", "dependence", "set-size"} <= links.ids


def test_the_layer_table_says_which_layers_the_probe_left_unmeasured_and_why():
    page = html_render.render(bncheck.probe(str(SAMPLES / "clean_resnet.onnx"), batch_sizes=[1, 2]))
    assert '<p class="muted">6 layer(s) not measured, each in inference mode: an affine map per channel' in page


def test_model_supplied_names_are_escaped(tmp_path):
    from tests.builders import bn_model

    path = bn_model(tmp_path / "evil.onnx", name="<script>alert(1)</script>")
    page = html_render.render(bncheck.inspect(str(path)))
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_fix_report_shows_before_and_after(tmp_path):
    out = tmp_path / "fixed.onnx"
    report = bncheck.fix(str(SAMPLES / "stale_drift.onnx"), str(out), data=str(SAMPLES / "calib_drift.npz"))
    page = html_render.render(report)
    assert "Fix: " in page and "Findings of the written model" in page and "recalibrated" in page
    # counted as the table's summary says them, not a Python dict ({'error': 3, ...})
    assert "Findings before: 3 errors, 0 warnings, 0 info; after (the written model re-checked): 0 errors" in page


#: Chromium's own services (clock, component updates), contacted whatever page is open.
BROWSER_SERVICES = re.compile(
    rb"^(GET http://|POST http://|CONNECT )[a-z0-9.-]*(google\.com|googleapis\.com|gvt1\.com)[:/]"
)


def _request_line(conn: socket.socket) -> bytes:
    """The first line a client sent on ``conn`` (empty when it closed without sending anything)."""
    conn.settimeout(5)
    data = b""
    try:
        while b"\r\n" not in data and len(data) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data.split(b"\r\n")[0]


def _chromium(page: Path, *extra: str) -> tuple[str, list[bytes]]:
    """Open ``page`` in headless Chromium behind a local proxy; the DOM and the requests the page made."""
    requests: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:  # the proxy every http(s) request has to go through
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            line = _request_line(conn)
            # a connection closed before any byte is Chromium's preconnect, not a request
            if line and not BROWSER_SERVICES.match(line):
                requests.append(line)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={page.parent / 'chromium-profile'}",
        "--window-size=1280,2400",
        f"--proxy-server=http://127.0.0.1:{server.getsockname()[1]}",
        "--proxy-bypass-list=<-loopback>",
    ]
    try:
        dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        if extra:
            subprocess.run([*flags, *extra, page.as_uri()], capture_output=True, timeout=120)
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()
    return dom.stdout, requests


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_browser_check_sees_a_page_that_fetches(tmp_path):
    page = tmp_path / "fetching.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://bncheck-test.example/x.png"></body></html>')
    _, requests = _chromium(page)
    assert any(b"bncheck-test.example" in r for r in requests)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_headless_chromium_renders_the_page_without_any_request(drift_page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "html_report.png"
    shot.unlink(missing_ok=True)
    dom, requests = _chromium(drift_page, f"--screenshot={shot}")
    assert 'id="stats-bn3"' in dom and "<svg" in dom
    assert shot.exists() and shot.stat().st_size > 20_000  # a page with pictures, kept as the test's artifact
    assert requests == []
