"""Headless Debian Chromium for the browser tests, launched once per test session and shared.

Playwright never downloads a browser here: it drives /usr/bin/chromium (`make test-deps` installs it).
Playwright's sync API keeps an event loop running in the thread that starts it, and any later `asyncio.run()` in
that thread would fail; so the browser lives in a thread of its own, and tests hand it the work to do
(`SharedBrowser.run(fn, ...)` calls `fn(browser, ...)` there and returns its result).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# --no-sandbox: the tests may run as root; the autoplay policy lets the report test start <audio> without a click.
ARGS = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required"]
T = TypeVar("T")


def require_chromium() -> str:
    """The Chromium executable, or a skip saying how to install it."""
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(
            "Debian chromium is not installed at /usr/bin/chromium: run `make test-deps` "
            "(apt-get install chromium chromium-driver); Playwright never downloads its own browser here"
        )
    pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
    return str(CHROMIUM)


class SharedBrowser:
    """One Chromium process (and one Playwright driver) on a dedicated thread."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright = None
        self._browser = self._thread.submit(self._launch).result()

    def _launch(self):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        return self._playwright.chromium.launch(executable_path=self.executable, args=ARGS)

    def run(self, work: Callable[..., T], *args: Any) -> T:
        return self._thread.submit(work, self._browser, *args).result()

    def close(self) -> None:
        def shutdown(browser) -> None:
            try:
                browser.close()
            finally:
                self._playwright.stop()

        try:
            self.run(shutdown)
        finally:
            self._thread.shutdown(wait=True)


_shared: dict[str, SharedBrowser] = {}


def shared_browser(executable: str) -> SharedBrowser:
    """The session's browser for `executable`, launched at first use."""
    if executable not in _shared:
        _shared[executable] = SharedBrowser(executable)
    return _shared[executable]


def close_shared_browsers() -> None:
    while _shared:
        _shared.popitem()[1].close()
