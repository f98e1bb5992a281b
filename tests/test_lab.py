"""A notebook as a person uses it: JupyterLab served on 127.0.0.1, opened in headless Chromium, Run All from
the menu on the smoke settings; no cell may fail, and the score explorer widget must render and redraw when
one of its controls moves. A screenshot of the notebook after the change is saved (its path is printed).

The notebook is a copy in a temporary folder with one cell added after its parameters cell that points it at
params/smoke.yaml, as papermill would inject it; the server runs without MODSEP_HEADLESS and on the user's cache,
as `make lab` does. It runs 01 (the ViT: seconds, where 02's LM takes minutes); test_notebooks covers every
notebook's computation on fresh caches.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import json

import nbformat
import pytest

from browser import browser, save_screenshot  # noqa: F401  (browser is a fixture)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "01_vit_pruning"      # has the score explorer, as 02 does
RUN_ALL_TIMEOUT_S = 1800        # a bound for a stuck kernel, not a speed requirement (cold caches, 2 cores)


def smoke_copy(folder: Path, out_dir: Path) -> Path:
    """The notebook, outputs cleared, with a cell after its parameters cell that selects the smoke settings."""
    nb = nbformat.read(REPO / "notebooks" / f"{NOTEBOOK}.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"params_file = {str(REPO / 'params' / 'smoke.yaml')!r}\nout_dir = {str(out_dir)!r}"))
    path = folder / f"{NOTEBOOK}.ipynb"
    nbformat.write(nb, path)
    return path


def lab_settings(folder: Path) -> None:
    """User settings for this server only: every cell in the page (no windowing, so all prompts can be read),
    and no news toast over the notebook."""
    for name, value in [("notebook-extension/tracker", {"windowingMode": "none"}),
                        ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})]:
        path = folder / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer {url} within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a free 127.0.0.1 port with a token, rooted in a temporary folder holding the notebook copy;
    the server and its kernels are stopped afterwards, whatever happens."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    notebook = smoke_copy(root, tmp_path / "out")
    lab_settings(home / "settings")
    port, token = free_port(), "modsep-test-token"
    env = {k: v for k, v in os.environ.items() if k != "MODSEP_HEADLESS"}     # widgets are shown
    env.update(JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), PYTHONPATH=os.pathsep.join(
                   p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    log = tmp_path / "jupyter.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
                                 f"--port={port}", "--port-retries=0", f"--IdentityProvider.token={token}",
                                 f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--allow-root",
                                 "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        yield {"url": f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}", "notebook": notebook,
               "log": log}
    finally:
        try:                                      # the server stops its kernels, then itself
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown?token={token}",
                                                          method="POST"), timeout=10).close()
        except OSError:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # anything of this server left behind (its own group)
        except ProcessLookupError:
            pass
        proc.wait()


def prompts(page) -> list[str]:
    """The input prompt of every code cell: '[3]:' ran, '[*]:' queued or running, '[ ]:' not run."""
    return page.eval_on_selector_all(".jp-Notebook .jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.innerText"
                                     ".trim())")


def wait_for_idle_kernel(page, timeout_s: float) -> None:
    """Until the status bar shows a started kernel that is idle ('Python 3 (ipykernel) | Idle')."""
    page.wait_for_function("() => [...document.querySelectorAll('.jp-StatusBar-Widget')].some(e => "
                           "e.innerText.includes('| Idle') && !e.innerText.includes('No Kernel'))",
                           timeout=timeout_s * 1000, polling=500)


def run_all(page) -> None:
    """Run > Run All Cells, from the menu bar as a person would."""
    page.locator(".lm-MenuBar-itemLabel").get_by_text("Run", exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()


def explorer_image(page) -> str:
    """The src of the image inside the explorer's output (a data: URI of the current plot), once it has loaded."""
    img = page.locator(".widget-interact .jp-OutputArea-output img").first
    img.wait_for(state="visible", timeout=60_000)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle(), timeout=60_000)
    return img.get_attribute("src")


def test_run_all_in_jupyterlab_and_move_the_explorer(lab, browser, capsys):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(lab["url"])
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-CodeCell", timeout=120_000)
    wait_for_idle_kernel(page, 180)
    n_cells = len(prompts(page))
    run_all(page)
    page.wait_for_function("() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]"
                           ".some(e => e.innerText.includes('*'))", timeout=60_000)
    page.wait_for_function("() => ![...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]"
                           ".some(e => e.innerText.includes('*'))", timeout=RUN_ALL_TIMEOUT_S * 1000, polling=1000)
    # the notebook as JupyterLab saves it: no error output in any cell, and every cell ran
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
                           timeout=60_000)
    saved = nbformat.read(lab["notebook"], as_version=4)
    errors = [(o.ename, o.evalue) for c in saved.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors, errors
    ran = prompts(page)
    assert len(ran) == n_cells and all(p.strip("[]:").isdigit() for p in ran), f"not every cell ran: {ran}"
    assert all(c.execution_count for c in saved.cells if c.cell_type == "code")

    # the explorer: an ipywidgets interact with a task dropdown, two sliders and a plot
    explorer = page.locator(".widget-interact").first
    explorer.scroll_into_view_if_needed()
    dropdown = explorer.locator(".widget-dropdown select")
    assert dropdown.count() == 1 and explorer.locator(".widget-slider").count() == 2
    options = dropdown.locator("option").all_inner_texts()
    assert len(options) >= 2, options
    before = explorer_image(page)
    dropdown.select_option(label=options[1])
    page.wait_for_function("src => { const img = document.querySelector('.widget-interact .jp-OutputArea-output img');"
                           " return img && img.getAttribute('src') !== src && img.complete && img.naturalWidth > 0; }",
                           arg=before, timeout=120_000)
    after = explorer_image(page)
    assert after != before
    explorer.scroll_into_view_if_needed()
    save_screenshot(page, "lab_explorer", capsys)
