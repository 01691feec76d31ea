"""A real headless browser for tests: Debian's Chromium (/usr/bin/chromium) driven by Playwright.

Playwright cannot download its own browser here, so it drives the system one; `.ci/install-packages`
installs it. A test module takes the module-scoped fixture with

    from tests.browser import browser  # noqa: F401 - a pytest fixture

and asks for `browser` (a playwright Browser); each test opens its own context (cookies, credentials).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

#: The browser binary; DISPATCHER_TEST_CHROMIUM points elsewhere (macOS, a Chrome build).
CHROMIUM = Path(os.environ.get("DISPATCHER_TEST_CHROMIUM", "/usr/bin/chromium"))
#: Without the background-networking switches Chromium keeps calling Google's hosts, which this
#: network refuses; no sandbox because CI runs as root (Playwright adds --no-sandbox itself too).
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module. A missing browser fails the test, never skips it."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium with .ci/install-packages", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
