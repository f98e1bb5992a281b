"""The notebooks, end to end: papermill executes each on params/smoke.yaml; nbval re-executes the executed
notebooks and the outputs of the cells marked NBVAL_CHECK_OUTPUT must match (they are deterministic).

Both executions run in the background from the session's start, each on a fresh cache of its own
(tests/notebook_pipeline.py); these tests read what they produced."""
import json

import nbformat
import pytest
from browser import assert_links_resolve, browser, open_and_check_images, save_screenshot  # noqa: F401
from notebook_pipeline import PRESENT, REPO

from modsep_nb.params import NOTEBOOKS
from modsep_nb.runner import NOTEBOOK_DIR


@pytest.mark.parametrize("key", PRESENT)
def test_source_notebook_is_clean(key):
    nb = nbformat.read(NOTEBOOK_DIR / f"{NOTEBOOKS[key]}.ipynb", as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "params_file" in tagged[0].source and "out_dir" in tagged[0].source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "notebooks are stored without outputs"
    assert any("NBVAL_CHECK_OUTPUT" in c.source for c in nb.cells), "some output is checked by nbval"


def test_every_notebook_ran(smoke_run):
    assert not list(smoke_run.glob("*.failed.ipynb"))
    for key in PRESENT:
        name = NOTEBOOKS[key]
        nb = nbformat.read(smoke_run / f"{name}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and "smoke.yaml" in injected[0].source
        results = json.loads((smoke_run / "statistics" / f"{name}.json").read_text())
        assert results, "each notebook records its numbers"
        findings = (smoke_run / "findings" / f"{name}.md").read_text()
        assert len(findings) > 200 and "![" in findings     # words, numbers and figures
    summary = (smoke_run / "summary.md").read_text()
    for key in PRESENT:
        assert (smoke_run / "findings" / f"{NOTEBOOKS[key]}.md").read_text().splitlines()[0] in summary
    figures = list((smoke_run / "figures").glob("*.png"))
    assert len(figures) >= 5 * len(PRESENT) // 2
    assert all(f.stat().st_size > 5000 for f in figures)
    saved = {p.name for p in (smoke_run / "statistics").glob("*.safetensors")}
    assert any(n.startswith("lm-") and "random" not in n for n in saved)
    assert any("random-seed" in n for n in saved)        # random-init artifacts say so in their names
    params = json.loads((smoke_run / "params.json").read_text())
    assert params["run_name"] == "smoke"


def test_nbval_reproduces_checked_outputs(nbval_run):
    results, cache = nbval_run
    assert list(results) == PRESENT, f"nbval ran {list(results)} only: the smoke run stopped early"
    for key, proc in results.items():
        assert proc.returncode == 0 and " passed" in proc.stdout, f"{key}:\n{proc.stdout[-6000:]}"
    assert any((cache / "stats").iterdir()), "the re-execution computed its own statistics"
    assert any(p.is_symlink() and (p / "config.json").is_file() for p in cache.iterdir()), "models are shared"


def test_results_json_holds_this_runs_numbers(smoke_run):
    """Each pruning notebook's saved record is recomputed from the run's own saved statistics: the scores,
    the overlap matrix and the sweep must be those of this run's model (not, say, a replayed 7B model's)."""
    import numpy as np
    import torch

    from modsep_nb.files import file_name
    from modsep_nb.overlaps import overlap_matrix, overlap_sweep
    from modsep_nb.params import load_params
    from modsep_nb.pruning import select_neurons, task_scores
    from modsep_nb.statistics import NeuronStats

    params = load_params(REPO / "params" / "smoke.yaml")
    pr = params["pruning"]
    for name, prefix in (("01_vit_pruning", "vit"), ("02_mistral_pruning", "lm")):
        saved = json.loads((smoke_run / "statistics" / f"{name}.json").read_text())
        stats = {t: NeuronStats.load(smoke_run / "statistics" / f"{prefix}-{file_name(t)}.safetensors")
                 for t in saved["tasks"]}
        retain = params["overlap"]["retain"]          # the overlap sets' retain rule (general: the corpus saved)
        general = (NeuronStats.load(smoke_run / "statistics" / f"{prefix}.general-corpus.safetensors")
                   if retain == "general" else None)
        scores = task_scores(stats, importance=pr["importance"], eps=pr["eps"], eps_relative=pr["eps_relative"],
                             retain=retain, general=general)
        masks = {t: select_neurons(s, params["overlap"]["frac"], pr["mode"]) for t, s in scores.items()}
        np.testing.assert_allclose(np.array(saved["overlap"], dtype=float), overlap_matrix(masks)[1], rtol=1e-12)
        sweep = overlap_sweep(scores, params["overlap"]["sweep"], mode=pr["mode"])
        for key in ("min", "median", "max", "chance"):
            np.testing.assert_allclose(saved["overlap_sweep"][key], sweep[key], rtol=1e-12, err_msg=f"{name} {key}")
        assert len(saved["cross_task_fixed"]) == len(stats) and torch.isfinite(
            torch.tensor(saved["cross_task_fixed"], dtype=torch.float64)).all()
        # the selectivity claim's pseudo-task null is there exactly where the params ask for it, with its size
        findings = (smoke_run / "findings" / f"{name}.md").read_text()
        claim = next(c for c in saved["claims"] if c["id"] == "selectivity")
        if params[prefix]["selectivity_null"]:
            assert len(saved["selectivity_null"]) == params["evidence"]["n_null_ablation"]
            assert f"({params['evidence']['n_null_ablation']} partitions)" in findings and "pseudo-tasks" in claim["statement"]
        else:
            assert saved["selectivity_null"] is None and "partitions" not in findings
            assert "pseudo-tasks" not in claim["statement"]
        # every fixed-matrix entry has its interval, and the interval holds the entry
        ci = np.array(saved["cross_task_fixed_ci"], dtype=float)
        fixed = np.array(saved["cross_task_fixed"], dtype=float)
        assert ci.shape == fixed.shape + (2,) and (ci[..., 0] <= fixed + 1e-12).all() and (fixed <= ci[..., 1] + 1e-12).all()


def test_report_page(smoke_run, browser, capsys):  # noqa: F811
    """The run's index.html: every link resolves, every figure is on it, and Chromium shows every image."""
    links = assert_links_resolve(smoke_run / "index.html")
    figures = {f"figures/{p.name}" for p in (smoke_run / "figures").glob("*.png")}
    assert figures and figures <= set(links.images)
    assert {f"html/{NOTEBOOKS[k]}.html" for k in PRESENT} <= set(links.links)
    page, n_images = open_and_check_images(browser, smoke_run / "index.html")
    assert n_images >= len(figures)
    save_screenshot(page, "smoke_run_index", capsys)

