"""The replication scorecard (issue #26): the paper's findings against this run's claims, the first table of
summary.md and index.html. One row per finding, one column per model (the ViT and the language model of this run,
the authors' released 7B scores); each cell the claims that test the finding there, read from the claim records
the notebooks save (statistics/<notebook>.json, "claims"), with estimate, interval, adjusted p and verdict, or
"not testable here" and why. FINDINGS is the one map from a finding to its claims.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .params import NOTEBOOKS

COLUMNS = {"vit": "ViT (this run)", "lm": "language model (this run)", "7b": "the authors' released 7B scores"}
RELEASE_HAS_SCORES_ONLY = "the release holds neuron scores only, no model"
# finding -> {column: [(notebook, claim id), ...] (or that and the reason when none of them was recorded), or the
# reason it cannot be tested there at all}
FINDINGS: list[tuple[str, dict]] = [
    ("Task-specific neurons: pruning a task's neurons hurts that task more than the others",
     {"vit": [("01", "selectivity"), ("01", "selectivity_per_task")],
      "lm": [("02", "selectivity"), ("02", "selectivity_per_task")],
      "7b": f"{RELEASE_HAS_SCORES_ONLY} to prune and evaluate"}),
    ("Overlap is higher between related tasks",
     {"vit": [("01", "related_share_more")], "lm": [("02", "related_share_more")],
      "7b": ([("02", "related_share_more[llama-7b]"), ("02", "related_share_more[mistral-7b]")],
             "the released scores were not found by this run (02 says how to get them)")}),
    ("The structure persists at random initialisation",
     {"vit": [("04", "pattern_persists[vit]")], "lm": [("04", "pattern_persists[lm]")],
      "7b": ([("04", "pattern_persists[llama-7b]"), ("04", "pattern_persists[mistral-7b]")],
             "04 shows the released random-init scores beside the trained ones without a test of its own")}),
    ("MoEfication clusters correspond to task neurons",
     {"vit": [("05", "correspondence_above_control[vit]")], "lm": [("05", "correspondence_above_control[lm]")],
      "7b": f"{RELEASE_HAS_SCORES_ONLY}: a MoEfication split needs its weights"}),
    ("The correspondence is stronger in early and late layers than in the middle",
     {"vit": [("05", "ends_stronger_than_middle[vit]")], "lm": [("05", "ends_stronger_than_middle[lm]")],
      "7b": f"{RELEASE_HAS_SCORES_ONLY}: a MoEfication split needs its weights"}),
]


def load_claims(run_dir) -> dict[str, dict[str, dict]]:
    """{notebook key: {claim id: claim record}} of every notebook whose results JSON is in run_dir/statistics."""
    out = {}
    for key, name in NOTEBOOKS.items():
        path = Path(run_dir) / "statistics" / f"{name}.json"
        if path.is_file():
            out[key] = {c["id"]: c for c in json.loads(path.read_text(encoding="utf-8")).get("claims") or []}
    return out


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def cell_text(record: dict) -> str:
    """One claim in a cell: `id`: estimate [interval], adjusted p, verdict."""
    p = record.get("p_adjusted", record.get("p"))
    lo, hi = record.get("ci") or (None, None)
    return (f"`{record['id']}`: {_num(record.get('estimate'))} [{_num(lo)}, {_num(hi)}], "
            f"adjusted p {_num(p) if p is not None else '–'}, **{record.get('verdict', 'n/a')}**")


def _cell(spec, claims: dict) -> str:
    if isinstance(spec, str):
        return f"not testable here: {spec}"
    spec, absent = spec if isinstance(spec, tuple) else (spec, None)
    found = [claims[nb][cid] for nb, cid in spec if cid in claims.get(nb, {})]
    if found:
        return "; ".join(cell_text(r) for r in found)
    missing = sorted({nb for nb, _ in spec if nb not in claims})
    if missing:
        return f"not testable here: notebook {', '.join(missing)} did not run"
    ids = ", ".join(f"`{cid}`" for _, cid in spec)
    return f"not testable here: {absent or 'its data were absent or too few'} (no {ids} in this run)"


def scorecard_rows(claims: dict) -> list[dict]:
    """[{"finding", column: cell text}] for FINDINGS from load_claims' records."""
    return [{"finding": finding, **{col: _cell(spec[col], claims) for col in COLUMNS}} for finding, spec in FINDINGS]


def scorecard_markdown(run_dir) -> str:
    """The scorecard as a Markdown section ("" when no notebook of the run saved its claims)."""
    claims = load_claims(run_dir)
    if not claims:
        return ""
    lines = ["## Replication scorecard", "",
             "The paper's findings against this run's claims: each cell the claim id, estimate, 95% interval, "
             "p adjusted (Holm) within its notebook and the verdict; details in each notebook's findings below.", "",
             "| finding | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in scorecard_rows(claims):
        lines.append("| " + " | ".join(row[k].replace("|", "\\|") for k in ("finding", *COLUMNS)) + " |")
    return "\n".join(lines) + "\n"
