"""What a notebook's setup cell needs, and nothing else: its parameters, `show(fig, name, caption)` for
figures, the findings in words, and its numbers as JSON. One `Report` per executed notebook.

    report = Report("01_vit_pruning", params_file, out_dir, overrides)
    params, show = report.params, report.show
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import plots
from .claims import claim_line, claims_table, claims_to_json, correct
from .files import file_name, write_text_atomic
from .params import load_params
from .runner import from_notebooks

CLAIMS_CAPTION = "Supported claims have their whole interval (bar) on the claimed side of the null (dashed)."


class Report:
    def __init__(self, notebook: str, params_file, out_dir, overrides: dict | None = None):
        self.notebook, self.out_dir = notebook, from_notebooks(out_dir)     # relative to notebooks/, wherever run
        self.params = load_params(from_notebooks(params_file), overrides)      # validated before any heavy work
        torch.manual_seed(self.params["seed"])
        self.figures: list[Path] = []
        self.captions: dict[str, str] = {}
        self._claims: list = []

    def show(self, fig, name: str, caption: str = ""):
        """Save `fig` as figures/<name>.png; `caption` says what a modular result looks like on it."""
        if caption:
            self.captions[name] = caption
            # "$" escaped: matplotlib's wrapping measures "$...$" as mathtext even with text.parse_math off
            fig.text(0.01, -0.01, caption.replace("$", r"\$"), ha="left", va="top", fontsize=8, style="italic",
                     wrap=True, parse_math=True)
        self.figures.append(plots.save(fig, self.out_dir, name))
        return fig

    def claim(self, *claims) -> None:
        """Record claims (claims.Claim): the findings open with their table and the results JSON lists them."""
        self._claims.extend(claims)

    @property
    def claims(self) -> list:
        """Every claim recorded so far, Holm-adjusted together: the notebook is the family (issue #26), so this
        is the one place a verdict is corrected; the findings, the results JSON and the printouts read it."""
        return correct(self._claims, "holm", family=self.notebook)

    def adjusted(self, claims) -> list:
        """`claims` (recorded here) as they stand in the notebook's family, in the same order."""
        by_id = {c.id: c for c in self.claims}
        return [by_id[c.id] for c in claims]

    def print_claims(self, claims=None) -> None:
        """One line per claim (all recorded so far, or these of them), with p, adjusted p and verdict."""
        shown = self.claims if claims is None else self.adjusted(claims)
        width = max((len(c.id) for c in shown), default=0) + 2
        for c in shown:
            print(claim_line(c, width))

    def claims_figure(self, name: str, claims=None):
        """The forest plot of the claims (all recorded so far, or these of them, adjusted as in the notebook's
        family), saved as figures/<name>.png with the one caption every notebook's claims figure has."""
        shown = self.claims if claims is None else self.adjusted(claims)
        return self.show(plots.claims(shown), name, CLAIMS_CAPTION)

    def findings(self, title: str, text: str, *sections: str) -> None:
        """The notebook's findings: its claims' table, then `text` and any further sections, in that order."""
        text = "".join((text, *sections))
        table = ("**Claims** (supported: the 95% interval excludes the null, and p < 0.05 where there is a test, "
                 "after Holm's correction over the notebook's claims)\n\n"
                 + claims_table(self.claims) + "\n\n") if self._claims else ""
        record_findings(self.out_dir, self.notebook, title, table + text, self.figures)

    def save(self, results: dict) -> Path:
        return save_results(self.out_dir, self.notebook, {"claims": claims_to_json(self.claims), **results})

    def save_tasks(self, study) -> Path:
        """Add `study`'s tasks to the run's tasks.json: {"lm" | "vit": {task: {"source", "statistics": [ids],
        "evaluation": [ids], "file_name"}}}, the documents (images) each task's statistics and evaluation read, and
        the name its files have (statistics/<kind>-<file_name>.safetensors, neurons/<kind>-<file_name>.html)."""
        path = self.out_dir / "tasks.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        record[study.kind] = {task: {**used, "file_name": file_name(task)} for task, used in study.record().items()}
        write_text_atomic(path, json.dumps(record, indent=1))
        return path


def record_findings(out_dir, notebook: str, title: str, text: str, figures=()) -> None:
    """A notebook's findings in words, with its figures, as findings/<notebook>.md."""
    figs = "\n".join(f"![{Path(f).stem}](figures/{Path(f).name})" for f in figures)
    write_text_atomic(Path(out_dir) / "findings" / f"{notebook}.md", f"## {title}\n\n{text.strip()}\n\n{figs}\n")


def plain(x):
    """JSON-able copy: tensors and arrays to lists, tuple keys to strings, non-finite floats to null."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if hasattr(x, "tolist"):
        return plain(x.tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def save_results(out_dir, name: str, results: dict) -> Path:
    """A notebook's numbers (matrices, fractions, overlaps) as JSON in out_dir/statistics/name.json."""
    path = Path(out_dir) / "statistics" / f"{name}.json"
    write_text_atomic(path, json.dumps(plain(results), indent=1))
    return path
