"""Headless Chromium for the browser tests: Debian's `chromium` driven by the PyPI `playwright` package
(its own browser download is not used). `make test` installs both; a machine without them, where we
cannot install them (not root), skips these tests and says how to get them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "outputs" / "test-screenshots"


def chromium_path() -> str:
    """The Chromium executable ($MODSEP_CHROMIUM, else `chromium` on PATH); skip or fail when it is missing."""
    path = os.environ.get("MODSEP_CHROMIUM") or shutil.which("chromium")
    missing = [] if path else ["Chromium (Debian: apt-get install chromium)"]
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        message = f"the browser tests need {' and '.join(missing)}; `make test` installs them"
        if os.geteuid() != 0:
            pytest.skip(message + " (it needs root for apt-get)")
        pytest.fail(message)
    return path


@pytest.fixture
def browser():
    """A headless Chromium browser (playwright), closed afterwards."""
    from playwright.sync_api import sync_playwright
    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True)
        try:
            yield b
        finally:
            b.close()


def save_screenshot(page, name: str, capsys) -> Path:
    """Save a full-page screenshot under outputs/test-screenshots/ and print its path into the test log."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path
