"""Headless Chromium for the gallery tests, driven by Playwright.

Playwright's Python package drives the system's browser (``executable_path``: Debian's
``apt-get install chromium``, or ``HYPERHUMAN_CHROMIUM``), so no browser download is needed.
Host names do not resolve inside the browser (``--host-resolver-rules``), so a page cannot reach
the network even by mistake; :func:`open_page` also records every URL the page requests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
VIEWPORT = {"width": 1280, "height": 900}

# Every <img> of the page: force lazy ones to load, wait (at most 15 s), report the broken ones.
CHECK_IMAGES_JS = """
async () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = 'eager'; });
  const settled = img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done);
  });
  const timeout = new Promise(done => setTimeout(done, 15000));
  await Promise.race([Promise.all(images.map(settled)), timeout]);
  return {
    images: images.length,
    broken: images.filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.getAttribute('src')),
    title: document.title,
    height: document.documentElement.scrollHeight,
  };
}
"""


def find_chromium() -> str | None:
    configured = os.environ.get("HYPERHUMAN_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@contextlib.contextmanager
def chromium(executable: str) -> Iterator:
    """A headless Playwright ``Browser`` on the given Chromium executable."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, headless=True, args=list(FLAGS))
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    """A new page that has loaded ``url``; ``page.requested`` lists every URL it asked for."""
    page = browser.new_page(viewport=VIEWPORT)
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url, wait_until="load")
    return page
