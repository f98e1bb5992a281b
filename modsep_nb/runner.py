"""Run the notebooks headless with papermill: `python -m modsep_nb run PARAMS.yaml [--only 01,02] [--out DIR]`.

Each run gets its own folder under outputs/ (never overwriting an earlier one unless --overwrite):
executed notebooks, figures/ (PNG), findings/ (each notebook's findings in words) and summary.md.
Expensive results (statistics, trained models, splits) live in the cache, so a killed run started
again recomputes only what is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .files import write_text_atomic
from .index_page import write_index
from .params import NOTEBOOKS, load_params

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"


def run_dir_for(params: dict, out: str | None, overwrite: bool) -> Path:
    """outputs/<run_name>, or the next free outputs/<run_name>-N when that exists (unless overwrite)."""
    base = Path(out) if out else REPO / "outputs" / params["run_name"]
    if overwrite or not base.exists() or not any(base.iterdir()):
        return base
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return Path(f"{base}-{n}")


def record_findings(out_dir, notebook: str, title: str, text: str, figures=()) -> None:
    """Called by each notebook's findings cell: what this run shows, in words, and which figures."""
    figs = "\n".join(f"![{Path(f).stem}](figures/{Path(f).name})" for f in figures)
    write_text_atomic(Path(out_dir) / "findings" / f"{notebook}.md", f"## {title}\n\n{text.strip()}\n\n{figs}\n")


def save_results(out_dir, name: str, results: dict) -> Path:
    """A notebook's numbers (matrices, fractions, overlaps) as JSON in out_dir/statistics/name.json."""
    import numpy as np

    def plain(x):
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if hasattr(x, "tolist"):
            return plain(x.tolist())
        if isinstance(x, float) and not np.isfinite(x):
            return None
        return x
    path = Path(out_dir) / "statistics" / f"{name}.json"
    write_text_atomic(path, json.dumps(plain(results), indent=1))
    return path


def run(params_path, *, only=None, out=None, overwrite=False, log=print) -> Path:
    import papermill as pm
    os.environ["MODSEP_HEADLESS"] = "1"   # the kernels inherit it: widgets are skipped
    params = load_params(params_path)       # validated before any heavy work
    selected = [n.strip() for n in only.split(",")] if isinstance(only, str) else (only or params["notebooks"])
    unknown = [n for n in selected if n not in NOTEBOOKS]
    if unknown:
        raise SystemExit(f"--only names {unknown}; available: {', '.join(NOTEBOOKS)}")
    run_dir = run_dir_for(params, out, overwrite).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "params.json", json.dumps(params, indent=1, default=str))
    log(f"modsep: running notebooks {', '.join(selected)} with {params_path} into {run_dir}")
    timings = {}
    for key in selected:
        name = NOTEBOOKS[key]
        start = time.time()
        final = run_dir / f"{name}.ipynb"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".ipynb", dir=run_dir)
        os.close(fd)
        try:
            pm.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), tmp, cwd=str(NOTEBOOK_DIR),
                                parameters={"params_file": str(Path(params_path).resolve()), "out_dir": str(run_dir)},
                                kernel_name="python3", progress_bar=False,
                                # the kernel's start-up warnings (TCP without encryption on localhost) are noise
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])
            os.replace(tmp, final)
        except BaseException:
            failed = run_dir / f"{name}.failed.ipynb"   # kept for reading the traceback; never mistaken for a result
            if os.path.exists(tmp):
                shutil.move(tmp, failed)
            log(f"modsep: {name} failed; the executed notebook is {failed}")
            raise
        timings[name] = round(time.time() - start, 1)
        log(f"modsep: {name} done in {timings[name]} s")
    write_summary(run_dir, params, timings)
    log(f"modsep: report at {write_index(run_dir)}")
    log(f"modsep: summary at {run_dir / 'summary.md'}")
    return run_dir


def write_summary(run_dir: Path, params: dict, timings: dict) -> None:
    parts = [f"# modsep run `{params['run_name']}`\n", f"Parameters: `{params.get('params_file')}`; "
             f"seed {params['seed']}; device {params['device']}.\n"]
    for key, name in NOTEBOOKS.items():
        findings = run_dir / "findings" / f"{name}.md"
        if findings.is_file():
            parts.append(findings.read_text())
            if name in timings:
                parts.append(f"_{name} ran in {timings[name]} s._\n")
    write_text_atomic(run_dir / "summary.md", "\n".join(parts))
