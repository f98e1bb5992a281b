"""Headless Chromium for the browser tests: Debian's `chromium` driven by the PyPI `playwright` package
(its own browser download is not used). `make test` installs both; a machine without them, where we
cannot install them (not root), skips these tests and says how to get them. Also: reading the links of an
HTML page with the standard library's parser."""
from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

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


class Links(HTMLParser):
    """Every href/src and every element id of a page."""
    def __init__(self):
        super().__init__()
        self.links, self.images, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key) is not None:
                self.links.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src"))


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text())
    return parser


def assert_links_resolve(page: Path) -> Links:
    """Every href/src of the page is relative and names an existing file beside it (or an element on it)."""
    links = parse(page)
    assert links.links, f"{page} has no links"
    for target in links.links:
        parts = urlsplit(target)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), \
            f"{target} in {page} is not a relative link"
        if parts.path:
            assert (page.parent / unquote(parts.path)).is_file(), f"{target} in {page} does not resolve"
        if parts.fragment:
            assert parts.fragment in links.ids, f"{target} in {page} names no element"
    return links


def drawn_content(png: bytes) -> tuple[float, int]:
    """What a figure's PNG, composited on white as a page shows it, has drawn: the fraction of its pixels that
    are not (near) white, and how many drawn regions span at least 80 px each way (an axes with its frame and
    what it holds, or a picture); text, ticks and stray marks are smaller."""
    import io

    import numpy as np
    from PIL import Image
    from scipy import ndimage
    with Image.open(io.BytesIO(png)) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=float) / 255
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])      # a transparent pixel shows white
    ink = (rgb < 0.9).any(axis=-1)
    labels, _ = ndimage.label(ink, structure=np.ones((3, 3)))
    panels = sum(1 for rows, cols in ndimage.find_objects(labels)
                 if rows.stop - rows.start >= 80 and cols.stop - cols.start >= 80)
    return float(ink.mean()), panels


def assert_drawn(png: bytes, what: str) -> None:
    """The figure has content: at least 2% of its pixels drawn and at least one axes (or picture)."""
    ink, panels = drawn_content(png)
    assert ink >= 0.02 and panels >= 1, f"{what} is blank: {ink:.2%} of its pixels drawn, {panels} axes or pictures"


def open_and_check_images(browser, path: Path):
    """Open an HTML file in Chromium (file://); every <img> must have loaded with a non-zero size.
    Returns the page and the number of images."""
    page = browser.new_page()
    page.goto(Path(path).resolve().as_uri())
    page.wait_for_load_state("load")
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src').slice(0, 80), "
                                             "e.complete, e.naturalWidth])")
    broken = [src for src, complete, width in sizes if not (complete and width > 0)]
    assert not broken, f"images not shown in {path}: {broken}"
    return page, len(sizes)
