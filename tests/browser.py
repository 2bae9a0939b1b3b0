"""Real headless Chromium for the browser tests: Debian's ``chromium`` driven by playwright.

Playwright's own browser download (``playwright install``) is never used: the tests launch the
system's Chromium (``$CHARRNN_CHROMIUM``, else ``/usr/bin/chromium``, else ``chromium`` or
``chromium-browser`` on the PATH), which ``.ci/run`` installs. Where playwright or the browser
is missing, a test using ``chromium_page`` is skipped with a one-line reason saying which.

    from browser import chromium_page

    def test_page(tmp_path):
        with chromium_page() as page:
            page.goto(...)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import pytest

# No GPU, no QUIC, no background traffic of Chromium's own (updates, sync, first-run pages):
# a test page's requests are then the only ones, and a sandbox-less root container works.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL_HINT = "apt-get install chromium (.ci/run does), or set CHARRNN_CHROMIUM"


def chromium_executable() -> Optional[str]:
    """The Chromium the tests launch, or None where there is none."""
    configured = os.environ.get("CHARRNN_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def chromium_page(timeout_ms: float = 60_000) -> Iterator["object"]:
    """A fresh playwright ``Page`` in headless Chromium, closed afterwards; skips the calling
    test (one line) when playwright or the executable is missing.

    ``timeout_ms`` is the page's default wait for actions and ``wait_for_*`` calls (generous:
    CI machines are shared).
    """
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    executable = chromium_executable()
    if executable is None:
        pytest.skip(f"no Chromium executable found: {INSTALL_HINT}")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def record_requests(page) -> list[str]:
    """The URLs of every request ``page`` makes from now on (a list that fills as it runs)."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    return urls


def file_url(path) -> str:
    """``file://`` URL of a local file."""
    return Path(path).resolve().as_uri()
