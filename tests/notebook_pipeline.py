"""Every notebook executed twice, in the background of the test session: by the runner (papermill) on
params/smoke.yaml, and by nbval, which re-executes each executed notebook as soon as the run has finished it and
compares the checked outputs.

The two executions take most of the suite's time, so they start with the session (conftest's autouse
`notebook_pipeline`) while the other tests run beside them; the tests that read them (smoke_run, nbval_run) are
ordered last. Each execution has a cache of its own, made fresh: the papermill run computes every statistic and
split, and nbval's re-execution computes them all again, sharing only the models (the smoke ViT the run trained,
SmolLM2's conversion linked from the user's cache), so the comparison tests determinism, not a cache round-trip.
No statistic is written to the user's cache.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import nbformat
import psutil

from modsep_nb.params import NOTEBOOKS
from modsep_nb.runner import NOTEBOOK_DIR, kill_processes

REPO = Path(__file__).resolve().parent.parent
SMOKE_PARAMS = REPO / "params" / "smoke.yaml"
PRESENT = [k for k, name in NOTEBOOKS.items() if (NOTEBOOK_DIR / f"{name}.ipynb").is_file()]
STAGES = ("papermill", "nbval")


class NotebookPipeline:
    """The two executions, each followed by a thread of its own: nbval re-executes each notebook as soon as the
    papermill run has finished it, so the two overlap. `result("papermill")` waits for the run and returns its
    CompletedProcess; `result("nbval")` waits for nbval and returns {notebook key: CompletedProcess}, stopping at
    the first notebook the run did not finish."""

    def __init__(self, root: Path):
        self.out, self.cache, self.nbval_cache = root / "smoke_run", root / "smoke_cache", root / "nbval_cache"
        self.nbval_out, self._log = root / "nbval_run", root / "smoke_run.log"
        self._done = {stage: Future() for stage in STAGES}
        self._procs: list[subprocess.Popen] = []
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=target, name=f"notebook-pipeline-{stage}", daemon=True)
                         for stage, target in zip(STAGES, (self._papermill, self._nbval))]

    def start(self) -> "NotebookPipeline":
        """Start both; a failure to start is handed to the tests that wait (the other tests still run)."""
        from modsep_nb.models import _smollm2_dir
        try:
            self.cache.mkdir(parents=True)
            self.nbval_cache.mkdir()
            lm = _smollm2_dir()                   # converted once per machine, in the user's cache
            (self.cache / lm.name).symlink_to(lm, target_is_directory=True)
            with open(self._log, "w") as log:     # the child keeps its own handle
                self._popen([sys.executable, "-m", "modsep_nb", "run", str(SMOKE_PARAMS), "--only",
                             ",".join(PRESENT), "--out", str(self.out), "--overwrite"], REPO, self.cache, stdout=log)
        except Exception as e:  # noqa: BLE001
            for future in self._done.values():
                future.set_exception(e)
            return self
        for thread in self._threads:
            thread.start()
        return self

    def result(self, stage: str):
        return self._done[stage].result()

    def stop(self) -> None:
        """End whatever still runs (the session ended early), kernels included."""
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    parent = psutil.Process(proc.pid)
                    kill_processes([*parent.children(recursive=True), parent])
                except psutil.NoSuchProcess:        # it ended meanwhile
                    pass
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=60)

    def _popen(self, cmd: list[str], cwd: Path, cache: Path, stdout) -> subprocess.Popen:
        if self._stopping.is_set():
            raise RuntimeError("the test session ended first")
        env = {**os.environ, "MODSEP_HEADLESS": "1", "MODSEP_CACHE": str(cache)}
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
        self._procs.append(proc)
        return proc

    def _writing_elsewhere(self, executed: Path) -> Path:
        """A copy of the executed notebook whose injected out_dir is nbval's own folder: the re-execution must not
        write into the run folder, which the run is still writing."""
        nb = nbformat.read(executed, as_version=4)
        cell = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
        cell.source, n = re.subn(r"^out_dir = .*$", f"out_dir = {str(self.nbval_out)!r}", cell.source, flags=re.M)
        assert n == 1, f"{executed.name}: papermill's injected cell does not set out_dir once:\n{cell.source}"
        self.nbval_out.mkdir(exist_ok=True)
        copy = self.nbval_out / executed.name
        nbformat.write(nb, copy)
        return copy

    def _papermill(self) -> None:
        try:
            run = self._procs[0]
            run.wait()
            self._done["papermill"].set_result(subprocess.CompletedProcess(run.args, run.returncode,
                                                                           self._log.read_text(), ""))
        except BaseException as e:  # noqa: BLE001 -- handed to the tests that wait
            self._done["papermill"].set_exception(e)

    def _nbval(self) -> None:
        try:
            run, results = self._procs[0], {}
            for key in PRESENT:
                executed = self.out / f"{NOTEBOOKS[key]}.ipynb"       # written atomically when finished
                while not executed.is_file() and run.poll() is None and not self._stopping.is_set():
                    time.sleep(0.5)
                if not executed.is_file() or self._stopping.is_set():
                    break
                for model in self.cache.iterdir():   # models are shared (once built); statistics and splits are not
                    link = self.nbval_cache / model.name
                    if model.is_dir() and model.name not in ("stats", "splits") and not model.name.startswith(".") \
                            and not link.exists():
                        link.symlink_to(model.resolve(), target_is_directory=True)
                proc = self._popen([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                                    "--nbval-current-env", str(self._writing_elsewhere(executed))], NOTEBOOK_DIR,
                                   self.nbval_cache, stdout=subprocess.PIPE)
                output, _ = proc.communicate()
                results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, output, "")
            self._done["nbval"].set_result(results)
        except BaseException as e:  # noqa: BLE001
            self._done["nbval"].set_exception(e)
