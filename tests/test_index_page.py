"""The run's report page (index.html): built from a hand-made run folder, every link and image must resolve
relative to the folder (parsed with the standard library's HTML parser), every figure must be on it, the
notebooks must be rendered with their outputs, and headless Chromium must show every image."""
import base64
import io
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

from browser import (assert_links_resolve, browser, open_and_check_images, parse,  # noqa: F401 (a fixture)
                     save_screenshot)
from modsep_nb.index_page import write_index


def png(color: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.bar([0, 1], [1, 2], color=color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def executed_notebook(path: Path, image: bytes, error: bool = False) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plot_the_bars()", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("display_data", {"image/png": base64.b64encode(image).decode(),
                                                            "text/plain": "<Figure>"})]
    cells = [nbformat.v4.new_markdown_cell("# Bars\nA *tiny* notebook."), cell]
    if error:
        cells.append(nbformat.v4.new_code_cell("1/0", execution_count=2, outputs=[nbformat.v4.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero", traceback=["ZeroDivisionError"])]))
    nb.cells = cells
    nbformat.write(nb, path)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as the runner leaves it: params, executed notebooks (one failed, one being written),
    figures (one with a space in its name), findings, summary, numbers."""
    d = tmp_path / "my run"
    (d / "figures").mkdir(parents=True)
    (d / "findings").mkdir()
    (d / "statistics").mkdir()
    (d / "params.json").write_text(json.dumps({"run_name": "fake", "seed": 0}))
    for name, color in [("01_overlap.png", "red"), ("01_sweep.png", "blue"), ("02 layers.png", "green")]:
        (d / "figures" / name).write_bytes(png(color))
    executed_notebook(d / "01_first.ipynb", png("black"))
    executed_notebook(d / "02_second.failed.ipynb", png("gray"), error=True)
    executed_notebook(d / ".03_third.abc.ipynb", png("gray"))           # a notebook still being written
    (d / "figures" / ".03_bars.png.x1.png").write_bytes(png("gray"))     # a figure still being written
    (d / "statistics" / ".03_third.json.x1.json").write_text("{")        # numbers still being written
    findings = ("## First: overlap is high\n\nOverlap 0.42 against chance 0.05.\n\n"
                "| claim | value |\n|---|---|\n| overlap above chance | yes |\n\n"
                "![01_overlap](figures/01_overlap.png)\n")
    (d / "findings" / "01_first.md").write_text(findings)
    (d / "summary.md").write_text("# modsep run `fake`\n\n" + findings)
    (d / "statistics" / "01_first.json").write_text("{}")
    return d


def test_every_link_and_image_resolves(run_dir):
    page = write_index(run_dir)
    assert page == run_dir / "index.html"
    links = assert_links_resolve(page)
    # every figure exactly once, whether in the findings or in the figure list
    figures = ["figures/01_overlap.png", "figures/01_sweep.png", "figures/02 layers.png"]
    assert sorted(unquote(s) for s in links.images) == figures
    # the findings are there, table included, and each executed notebook is linked (not the temporary one)
    text = page.read_text()
    assert "Overlap 0.42 against chance 0.05." in text and "<table>" in text and "<td>overlap above chance</td>" in text
    assert {unquote(t) for t in links.links} >= {"html/01_first.html", "html/02_second.failed.html",
                                                   "01_first.ipynb", "params.json", "statistics/01_first.json"}
    assert "failed" in text and "03_third" not in text and "03_bars" not in text     # nothing half-written


def test_notebooks_are_rendered_with_their_outputs_and_nothing_from_the_network(run_dir):
    write_index(run_dir)
    assert sorted(p.name for p in (run_dir / "html").iterdir()) == ["01_first.html", "02_second.failed.html"]
    rendered = (run_dir / "html" / "01_first.html").read_text()
    assert "plot_the_bars" in rendered and "tiny" in rendered
    assert base64.b64encode(png("black")).decode()[:200] in rendered       # the output image, embedded
    assert "ZeroDivisionError" in (run_dir / "html" / "02_second.failed.html").read_text()
    for name in ("01_first.html", "02_second.failed.html"):
        links = parse(run_dir / "html" / name)
        for target in links.links:
            parts = urlsplit(target)
            assert parts.scheme in ("", "data") and not parts.netloc, f"{name} loads {target}"
            assert not parts.path or parts.scheme == "data", f"{name} links to {target}"


def test_same_run_same_page_and_missing_files_are_reported(run_dir):
    first = write_index(run_dir).read_bytes()
    assert write_index(run_dir).read_bytes() == first
    (run_dir / "figures" / "01_overlap.png").unlink()        # referenced by the findings
    with pytest.warns(UserWarning, match="figures/01_overlap.png"):
        write_index(run_dir)
    with pytest.raises(FileNotFoundError, match="run folder"):
        write_index(run_dir / "nope")


def test_a_run_without_summary_shows_the_findings(run_dir):
    (run_dir / "summary.md").unlink()
    text = write_index(run_dir).read_text()
    assert "Overlap 0.42 against chance 0.05." in text and "modsep run fake" in text


def test_chromium_shows_every_image(run_dir, browser, capsys):  # noqa: F811
    page, n_images = open_and_check_images(browser, write_index(run_dir))
    assert n_images == 3
    save_screenshot(page, "index_page", capsys)
    _, n_images = open_and_check_images(browser, run_dir / "html" / "01_first.html")
    assert n_images == 1
