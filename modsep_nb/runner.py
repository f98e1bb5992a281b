"""Run the notebooks headless with papermill: `python -m modsep_nb run PARAMS.yaml [--only 01,02] [--out DIR]`.

Each run gets its own folder under outputs/ (never overwriting an earlier one unless --overwrite):
executed notebooks, figures/ (PNG), findings/ (each notebook's findings in words) and summary.md.
Expensive results (statistics, trained models, splits) live in the cache, so a killed run started
again recomputes only what is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from .files import cache_root, respect_umask, write_text_atomic
from .index_page import write_index
from .params import NOTEBOOKS, device_of, dtype_of, load_params
from .scorecard import scorecard_markdown

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"


class RunError(ValueError):
    """A run that cannot start (a folder that cannot be used, unknown notebooks); the message names the fix."""


INCOMPLETE = "INCOMPLETE.md"     # present while a run is under way or after it was interrupted
MARKER = ".modsep-run"           # written into every folder modsep makes a run folder: only those are ever emptied
# everything a run writes into its folder, and so all that --overwrite with other parameters removes
RESULTS = ("params.json", "tasks.json", "summary.md", "index.html", INCOMPLETE, "findings", "figures",
           "statistics", "neurons", "html", "exports")


def run_dir_for(params: dict, out: str | None, overwrite: bool) -> Path:
    """outputs/<run_name>, or the next free outputs/<run_name>-N when that exists (unless overwrite)."""
    if out:
        base = Path(out).expanduser()
    else:
        root = (REPO / "outputs").resolve()
        base = (root / params["run_name"]).resolve()
        if root not in base.parents:       # run_name is validated too; this keeps any name inside outputs/
            raise RunError(f"run_name {params['run_name']!r} leads outside {root}; use letters, digits, - _ .")
    if base.exists() and not base.is_dir():
        raise RunError(f"run folder {base} is a file, not a folder; pass --out with a folder path")
    if overwrite or not base.exists() or not any(base.iterdir()):
        return base
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return Path(f"{base}-{n}")


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` and a probe file in it, so that an unusable folder stops the run before any work
    (os.access says yes to root even on a read-only mount)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".modsep-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise RunError(f"{what} {folder} cannot be written ({err.strerror or type(err).__name__}); "
                             f"choose a writable folder") from None


def check_ours(run_dir: Path) -> None:
    """A folder that holds anything must carry modsep's marker: --overwrite never removes or replaces the files
    of a folder modsep did not make (say one that holds a params.json and a figures/ of another tool)."""
    if run_dir.is_dir() and not (run_dir / MARKER).is_file() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir} holds files and was not made by modsep (no {MARKER} marker in it), so --overwrite "
                       f"will not touch it; pass --out with a new or empty folder")


def run(params_path, *, only=None, out=None, overwrite=False, log=print) -> Path:
    import papermill as pm
    from filelock import FileLock, Timeout
    os.environ["MODSEP_HEADLESS"] = "1"   # the kernels inherit it: widgets are skipped
    params = load_params(params_path)       # validated before any heavy work
    selected = [n.strip() for n in only.split(",")] if isinstance(only, str) else (only or params["notebooks"])
    unknown = [n for n in selected if n not in NOTEBOOKS]
    if unknown:
        raise RunError(f"--only names {unknown}; available: {', '.join(NOTEBOOKS)}")
    run_dir = run_dir_for(params, out, overwrite).resolve()
    check_ours(run_dir)
    for folder in cache_folders(params):
        check_writable(folder, "cache folder")
    check_writable(run_dir, "run folder")
    lock = FileLock(str(run_dir / ".modsep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"another run is writing into {run_dir}; wait for it or pass another --out") from None
    try:
        _prepare(run_dir, params, log)
        log(f"modsep: running notebooks {', '.join(selected)} with {params_path} into {run_dir}")
        timings = {}
        try:
            for key in selected:
                timings[NOTEBOOKS[key]] = _run_notebook(pm, NOTEBOOKS[key], params_path, run_dir, log)
        except BaseException:
            write_summary(run_dir, params, timings)     # says which notebooks finished; INCOMPLETE.md stays
            raise
        (run_dir / INCOMPLETE).unlink()
        write_summary(run_dir, params, timings)
        log(f"modsep: report at {write_index(run_dir)}")
        log(f"modsep: summary at {run_dir / 'summary.md'}")
    finally:
        lock.release()
    return run_dir


def cache_folders(params: dict) -> list[Path]:
    """Every cache folder the notebooks write: `cache_dir` (statistics, splits; load_params made it absolute, so
    it is the folder the notebooks use from notebooks/) and the package's cache (models converted or trained
    here, the paper's scores), one folder unless cache_dir is set."""
    return list(dict.fromkeys([Path(params["cache_dir"] or cache_root()), cache_root()]))


def _same_params(a: dict, b: dict) -> bool:
    ignore = ("params_file",)       # the same parameters may come from another copy of the file
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def params_record(params: dict) -> dict:
    """What params.json holds: the parameters, and under "resolved" what "auto" became on this machine (the
    device, each section's dtype), so that results computed in bfloat16 and in float32 never count as one set."""
    record = json.loads(json.dumps(params, default=str))
    record["resolved"] = {"device": device_of(params), **{kind: {"dtype": dtype_of(params, kind)}
                                                          for kind in ("lm", "vit")}}
    return record


def _prepare(run_dir: Path, params: dict, log) -> None:
    """One parameter set per folder (check_ours made sure modsep made it): results of other parameters are
    removed (with a message), leftovers of a killed run (hidden partial notebooks) too; then the INCOMPLETE
    marker and params.json are written."""
    write_text_atomic(run_dir / MARKER, "A run folder made by modsep: `--overwrite` may replace what it wrote here "
                                        f"({', '.join(RESULTS)} and the executed notebooks).\n")
    record = params_record(params)
    try:
        old = json.loads((run_dir / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):     # none (a new folder, or a run killed at its start) or unreadable
        old = None
    if old is None or not _same_params(old, record):
        removed = _remove_results(run_dir)
        if removed:
            log(f"modsep: {run_dir} held results of other parameters; removed them ({', '.join(removed)})")
    for stale in run_dir.glob(".*.ipynb"):       # a killed run's partial notebook (we hold the folder's lock)
        stale.unlink()
    write_text_atomic(run_dir / INCOMPLETE, "This run has not finished (it is running, or it was interrupted). "
                                            "summary.md lists the notebooks that finished.\n")
    write_text_atomic(run_dir / "params.json", json.dumps(record, indent=1))


def _remove_results(run_dir: Path) -> list[str]:
    """Everything a run writes into its folder (and nothing else the folder may hold)."""
    names = list(RESULTS) + [f"{n}{ext}" for n in NOTEBOOKS.values() for ext in (".ipynb", ".failed.ipynb")]
    removed = []
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def kill_processes(processes) -> None:
    """Kill each psutil.Process, skipping those already gone."""
    import psutil
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _interruptible(execute) -> None:
    """execute() in a worker thread, so that Ctrl-C (SIGINT) reaches this thread as KeyboardInterrupt. In the
    main thread nbclient takes SIGINT for itself (it starts shutting the kernel down) and, depending on when the
    signal lands, may then wait on the kernel's reply for good. On Ctrl-C the kernel (this process's child) is
    killed, the worker's client fails on the dead kernel, and the interrupt goes on up."""
    import psutil
    outcome = []

    def work():
        try:
            execute()
        except BaseException as err:        # handed to the main thread
            outcome.append(err)
    worker = threading.Thread(target=work, name="modsep-notebook", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        kill_processes(psutil.Process().children(recursive=True))
        worker.join(60)                     # the client notices the dead kernel and stops writing
        raise
    if outcome:
        raise outcome[0]


def from_notebooks(path) -> Path | None:
    """A path from a notebook's parameters cell, which gives them relative to the notebooks' folder (papermill
    runs them there, JupyterLab opens them there), wherever the kernel runs (an executed copy opened in
    outputs/<run>/, say). Without a notebooks folder (the package installed alone), as given."""
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() or not NOTEBOOK_DIR.is_dir() else NOTEBOOK_DIR / path


def _run_notebook(pm, name: str, params_path, run_dir: Path, log) -> float:
    """Execute one notebook into run_dir/<name>.ipynb (atomically); on failure keep <name>.failed.ipynb."""
    start = time.time()
    final, failed = run_dir / f"{name}.ipynb", run_dir / f"{name}.failed.ipynb"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".ipynb", dir=run_dir)
    os.close(fd)
    respect_umask(tmp, 0o666)
    try:
        _interruptible(lambda: pm.execute_notebook(
            str(NOTEBOOK_DIR / f"{name}.ipynb"), tmp, cwd=str(NOTEBOOK_DIR),
            # relative to the notebooks' folder (the kernel's cwd): the report shows no machine's paths
            parameters={"params_file": os.path.relpath(Path(params_path).resolve(), NOTEBOOK_DIR),
                        "out_dir": os.path.relpath(run_dir, NOTEBOOK_DIR)},
            kernel_name="python3", progress_bar=False,
            # the kernel's own log is noise here: start-up warnings (TCP without encryption on localhost), and a
            # traceback when Ctrl-C closes its sockets mid-reply. A notebook's errors are in the executed
            # notebook, and the runner reports them.
            extra_arguments=["--IPKernelApp.log_level=CRITICAL"]))
        _repeat_warnings(name, tmp, log)
        os.replace(tmp, final)
        failed.unlink(missing_ok=True)
    except BaseException:
        _repeat_warnings(name, tmp, log)
        if _readable_notebook(tmp):     # kept for reading the traceback; never mistaken for a result
            os.replace(tmp, failed)
            log(f"modsep: {name} failed; the executed notebook is {failed}")
        else:                           # e.g. a full disk truncated it: keep the previous one, if any
            log(f"modsep: {name} failed and its executed notebook could not be saved (disk full?)")
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    seconds = round(time.time() - start, 1)
    log(f"modsep: {name} done in {seconds} s")
    return seconds


def _readable_notebook(path) -> bool:
    try:
        return "cells" in json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


WARNING_LINE = re.compile(r"\b(\w*Warning): (.*)")


def _repeat_warnings(name: str, path, log) -> None:
    """Warnings (e.g. a cache found corrupted and recomputed) are printed inside the executed notebook;
    repeat them on the terminal, once each."""
    try:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return
    seen = []
    for cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = "".join(output.get("text", ""))
                for match in WARNING_LINE.finditer(text):
                    line = f"{match.group(1)}: {match.group(2).strip()}"
                    if line not in seen:
                        seen.append(line)
    for line in seen:
        log(f"modsep: {name}: {line}")


def write_summary(run_dir: Path, params: dict, timings: dict) -> None:
    parts = [f"# modsep run `{params['run_name']}`\n", f"Parameters: `{params.get('params_file')}`; "
             f"seed {params['seed']}; device {params['device']}.\n"]
    state = []
    for key, name in NOTEBOOKS.items():
        if (run_dir / f"{name}.ipynb").is_file():
            state.append(f"{key} finished")
        elif (run_dir / f"{name}.failed.ipynb").is_file():
            state.append(f"{key} failed")
    parts.append(f"Notebooks in this folder: {', '.join(state) or 'none finished'}"
                 f"{'; the run did not finish (see ' + INCOMPLETE + ')' if (run_dir / INCOMPLETE).is_file() else ''}."
                 f"\n")
    parts.append(scorecard_markdown(run_dir))        # the paper's findings vs this run's claims, first
    for key, name in NOTEBOOKS.items():
        findings = run_dir / "findings" / f"{name}.md"
        if findings.is_file() and (run_dir / f"{name}.ipynb").is_file():
            parts.append(findings.read_text(encoding="utf-8"))
            if name in timings:
                parts.append(f"_{name} ran in {timings[name]} s._\n")
    write_text_atomic(run_dir / "summary.md", "\n".join(parts))
