"""Attack 3, area B: parameters, `check`, and how the runner hands parameters to the notebooks."""
from __future__ import annotations

import logging
import os
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from modsep_nb import runner
from modsep_nb.__main__ import main
from modsep_nb.files import cache_root
from modsep_nb.params import MAX_MESSAGE, ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- relative paths -------------------------------------------------------------------------------------------
@pytest.fixture
def relative_set(tmp_path):
    """A params file in project/params/ whose paths are all relative (model folders exist, so they are paths)."""
    project = tmp_path / "project"
    (project / "models" / "lm").mkdir(parents=True)
    (project / "ckpt" / "final").mkdir(parents=True)
    path = write(project / "params" / "mine.yaml", """
        cache_dir: ../cache
        lm:
          model: ../models/lm
          data_dir: ../data/hub
          revisions: [step1000, ../ckpt/final]
        vit:
          model: google/vit-base-patch16-224
          data_dir: ~/images
        paper_scores: {dir: scores}
        """)
    return project, path


def test_relative_paths_are_read_from_the_params_folder(relative_set, tmp_path, monkeypatch):
    project, path = relative_set
    expected = {"cache_dir": project / "cache", "lm.model": project / "models" / "lm",
                "lm.data_dir": project / "data" / "hub", "vit.data_dir": Path.home() / "images",
                "paper_scores.dir": project / "params" / "scores"}
    for cwd, given in ((tmp_path, path), (project / "models", Path("..") / "params" / "mine.yaml")):
        monkeypatch.chdir(cwd)                  # the runner starts anywhere; the notebooks run in notebooks/
        p = load_params(given)
        got = {"cache_dir": p["cache_dir"], "lm.model": p["lm"]["model"], "lm.data_dir": p["lm"]["data_dir"],
               "vit.data_dir": p["vit"]["data_dir"], "paper_scores.dir": p["paper_scores"]["dir"]}
        assert got == {k: str(v) for k, v in expected.items()}, cwd
        assert p["lm"]["revisions"] == ["step1000", str(project / "ckpt" / "final")]    # a hub revision stays
        assert p["vit"]["model"] == "google/vit-base-patch16-224"                      # a hub id stays


def test_cache_probe_checks_the_folder_the_notebooks_use(tmp_path, monkeypatch):
    """From the params folder cache_dir is unusable (it lies under a file); from the current folder the same
    relative path is a fine folder. The probe used to check the latter while the notebooks wrote the former."""
    write(tmp_path / "p" / "blocked", "a file, not a folder")
    path = write(tmp_path / "p" / "x.yaml", "cache_dir: blocked/cache\n")
    (tmp_path / "cwd" / "blocked").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert runner.cache_folders(load_params(path)) == [tmp_path / "p" / "blocked" / "cache", cache_root()]
    with pytest.raises(runner.RunError, match="cache folder .*p/blocked/cache cannot be written"):
        runner.run(str(path), only="01", out=str(tmp_path / "out"))
    assert not (tmp_path / "cwd" / "blocked" / "cache").exists()


# -- parameters injected into the notebooks ---------------------------------------------------------------------
def test_injected_parameters_hold_no_absolute_paths(tmp_path, monkeypatch):
    """A fake clone (notebooks/, params/, outputs/) and one small notebook through the runner's execution: the
    injected cell names the params file and the run folder relative to notebooks/, and they resolve there."""
    import nbformat
    clone = tmp_path / "clone"
    params = write(clone / "params" / "p.yaml", "run_name: r\nseed: 7\n")
    cell = nbformat.v4.new_code_cell("params_file = None\nout_dir = None\noverrides = {}")
    cell.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(textwrap.dedent("""
        from pathlib import Path
        from modsep_nb.params import load_params
        p = load_params(params_file)
        Path(out_dir, "seen.txt").write_text(f"{p['seed']} {Path(out_dir).resolve()}")
        """))
    nb = nbformat.v4.new_notebook(cells=[cell, body])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (clone / "notebooks").mkdir()
    nbformat.write(nb, str(clone / "notebooks" / "01_vit_pruning.ipynb"))
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", clone / "notebooks")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")   # for the kernel
    monkeypatch.chdir(tmp_path)
    out = runner.run(str(params), only="01", out=str(clone / "outputs" / "r"), log=lambda *_: None)
    assert (out / "seen.txt").read_text() == f"7 {clone / 'outputs' / 'r'}"       # resolved from notebooks/
    executed = nbformat.read(str(out / "01_vit_pruning.ipynb"), as_version=4)
    injected = [c.source for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert 'params_file = "../params/p.yaml"' in injected[0] and 'out_dir = "../outputs/r"' in injected[0], injected
    assert str(clone) not in injected[0] and str(REPO) not in injected[0] and str(tmp_path) not in injected[0]


def test_notebook_paths_resolve_from_the_notebooks_folder_wherever_the_kernel_runs(tmp_path, monkeypatch):
    """An executed notebook opened in JupyterLab from outputs/<run>/ runs there: its relative paths still mean
    notebooks/../params/... (what papermill's cwd made of them), not outputs/<run>/../params/..."""
    from modsep_nb.report import Report
    monkeypatch.chdir(tmp_path)
    report = Report("01_vit_pruning", "../params/smoke.yaml", "../outputs/somewhere", {"device": "cpu"})
    assert report.out_dir == REPO / "notebooks" / ".." / "outputs" / "somewhere"
    assert Path(report.params["params_file"]).resolve() == REPO / "params" / "smoke.yaml"
    assert report.params["run_name"] == load_params(REPO / "params" / "smoke.yaml")["run_name"]
    assert runner.from_notebooks("/abs/out") == Path("/abs/out") and runner.from_notebooks(None) is None


# -- YAML that expands, and errors that print values ------------------------------------------------------------
BILLION_LAUGHS = """\
description:
  - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  - &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  - &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
  - &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_is_one_short_error(tmp_path, capsys):
    path = write(tmp_path / "bomb.yaml", BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 500                          # 9^9 "lol"s: ~1.5 GB once printed
    tracemalloc.start()
    start = time.perf_counter()
    try:
        assert main(["check", str(path)]) == 2
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 20 * 2**20, (time.perf_counter() - start, peak)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < MAX_MESSAGE + 20 and "aliases" in err and str(path) in err, err


def test_yaml_aliases_within_reason_still_work(tmp_path):
    p = load_params(write(tmp_path / "a.yaml", "overlap: {frac: &f 0.02, sweep: [0.01, *f]}\ndynamics: {frac: *f}\n"))
    assert p["overlap"]["sweep"] == [0.01, 0.02] and p["dynamics"]["frac"] == 0.02
    with pytest.raises(ParamsError, match="contains it"):
        load_params(write(tmp_path / "loop.yaml", "description: &x [*x]\n"))


def test_errors_quote_huge_values_briefly(tmp_path):
    """A value is quoted in at most ~200 characters, and what follows it (the fix) still shows."""
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path / "d.yaml", f"dtype: {'x' * 100_000}\n"))
    message = str(err.value)
    assert len(message) < 400 and "\n" not in message and message.endswith("float32, bfloat16, float16, auto")
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path / "l.yaml", "description: [" + ", ".join(["abc"] * 20_000) + "]\n"))
    assert len(str(err.value)) < 400 and "parameter 'description' must be a string" in str(err.value)


# -- values `check` used to accept --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("pruning: {random_seeds: []}", ["'pruning.random_seeds'", "non-empty"]),
    (f"seed: {2**64}", ["'seed'", "at most 4294967295"]),
    ("random_init: {seeds: [1, 4294967296]}", ["'random_init.seeds'", "4294967295"]),
    ("vit: {tasks: {on: [T-shirt/top], off: [Trouser]}}", ["'vit.tasks'", "bool", "quote them"]),
    ("vit: {tasks: {1: [T-shirt/top], '2': [Trouser]}}", ["'vit.tasks'", "[1]", "int", "quote them"]),
    ("lm: {tasks: [code, yes]}", ["'lm.tasks'", "[True]", "quote them"]),
    ("pruning: {eps: 0}", ["'pruning.eps'", "must be > 0", "1e-3"]),
    ("pruning: {eps_relative: 0}", ["'pruning.eps_relative'", "> 0"]),
    ("evidence: {n_boot: 1000000000}", ["'evidence.n_boot'", "at most 10000"]),
    ("dynamics: {n_splits: 1000000}", ["'dynamics.n_splits'", "at most 10000"]),
    ("vit: {training: {n_train: -5}}", ["'vit.training.n_train'", "at least 1"]),
    ("vit: {training: {lr: -0.1}}", ["'vit.training.lr'", "> 0"]),
])
def test_check_refuses_values_that_fail_later(tmp_path, capsys, text, words):
    assert main(["check", str(write(tmp_path / "p.yaml", text + "\n"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_upper_bounds_leave_the_shipped_and_usual_values():
    load_params(None, {"seed": 2**32 - 1, "evidence": {"n_boot": 10_000}, "vit": {"training": {"n_train": 1}}})


def test_task_named_with_dollar_signs_works_up_to_its_figure(tmp_path):
    """A task name is text: "money $$" used to reach matplotlib as mathtext and fail when the figure was saved."""
    import numpy as np
    from modsep_nb import plots
    from modsep_nb.report import Report
    for i in range(3):
        write(tmp_path / "money" / f"{i}.txt", f"document {i} about prices and money, number {i}\n")
    path = write(tmp_path / "p.yaml", """
        lm:
          tasks: {code: null, "money $$": {files: ["money/*.txt"]}}
        """)
    report = Report("02_mistral_pruning", str(path), tmp_path / "run", {"device": "cpu"})
    assert list(report.params["lm"]["tasks"]) == ["code", "money $$"]
    fig = plots.heatmap(np.eye(2), ["code", "money $$"], title="Cross-task accuracy: money $$", cbar_label="acc")
    report.show(fig, "cross_task", caption="the money $$ row")      # saved: drawn, so parsed
    assert report.figures == [tmp_path / "run" / "figures" / "cross_task.png"]
    assert report.figures[0].stat().st_size > 1000
    assert fig.axes[0].get_title() == "Cross-task accuracy: money $$"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["code", "money $$"]


def test_figures_draw_names_as_text_without_touching_the_users_matplotlib(tmp_path):
    """modsep's figures draw every name as written (no mathtext), set on their own texts: matplotlib's global
    text.parse_math, the user's, stays as it was, so the user's own "$x^2$" still renders as math."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from modsep_nb import plots
    assert matplotlib.rcParams["text.parse_math"] is True               # importing modsep changed nothing
    fig = plots.grouped_bars({"a $$": {"x": 1.0}, "b": {"x": 2.0}}, title="price $ and $ cost", ylabel="$$")
    fig.savefig(tmp_path / "bars.png")                                   # drawn: a parsed "$$" would fail here
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    named = [t for t in texts if "$" in t.get_text()]
    assert len(named) >= 3 and not any(t.get_parse_math() for t in named)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a $$", "b"]
    assert matplotlib.rcParams["text.parse_math"] is True
    mine, ax = plt.subplots()
    assert ax.set_title("$x^2$").get_parse_math()                       # the user's figure: mathtext as usual
    plt.close(mine)


# -- library noise -------------------------------------------------------------------------------------------
def test_cuda_home_notice_is_filtered(tmp_path, monkeypatch, caplog):
    """torch's "No CUDA runtime is found, using CUDA_HOME=..." (a CUDA toolkit without a GPU) is kept out of the
    notebooks; the same logger's other messages still show."""
    import modsep_nb  # noqa: F401  -- the filter is installed with the package
    from torch.utils import cpp_extension
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.set_level(logging.WARNING)
    assert cpp_extension._find_cuda_home() == str(tmp_path)          # the call that logs the notice
    logging.getLogger("torch.utils.cpp_extension").warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "another warning" in messages and not any("No CUDA runtime" in m for m in messages), messages


# -- what own tasks read -------------------------------------------------------------------------------------------
def test_check_lists_what_tasks_read_and_flags_files_outside(tmp_path, capsys):
    secret = write(tmp_path / "elsewhere" / "secret.txt", "a private file outside the project\n")
    for i in range(2):
        write(tmp_path / "p" / "notes" / f"{i}.txt", f"note number {i}, inside the params folder\n")
    (tmp_path / "p" / "notes" / "link.txt").symlink_to(secret)       # counts where it points
    inside = write(tmp_path / "p" / "inside.yaml", """
        lm: {tasks: {code: null, notes: {files: ["notes/[01].txt"]}}}
        """)
    outside = write(tmp_path / "p" / "outside.yaml", f"""
        lm: {{tasks: {{code: null, notes: {{files: ["notes/*.txt", "{secret}"]}}}}}}
        """)
    assert main(["check", str(inside)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"lm.tasks.notes reads {tmp_path / 'p' / 'notes' / '0.txt'}, "
                       f"{tmp_path / 'p' / 'notes' / '1.txt'}"], out
    assert main(["check", str(outside)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("lm.tasks.notes reads ") and str(secret) in out[1]
    warning = out[2]
    assert warning.startswith("warning: lm.tasks.notes reads 2 path(s) outside the project") and len(out) == 3
    assert str(secret) in warning and str(tmp_path / "p" / "notes" / "link.txt") in warning
    assert "0.txt" not in warning and "neuron pages" in warning
