"""The replication scorecard (issue #26): the paper's findings x {ViT, LM, released 7B scores}, each cell the claims
that test the finding with estimate, interval, adjusted p and verdict, or "not testable here" and why; the first
table of summary.md and of index.html. On claim records written the way the notebooks write them, and on the
smoke run's folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

from modsep_nb.claims import Claim, claims_to_json, correct
from modsep_nb.index_page import write_index
from modsep_nb.params import load_params
from modsep_nb.runner import write_summary
from modsep_nb.scorecard import COLUMNS, FINDINGS, load_claims, scorecard_markdown


def _save(run: Path, name: str, claims) -> None:
    (run / "statistics").mkdir(parents=True, exist_ok=True)
    (run / "statistics" / f"{name}.json").write_text(json.dumps({"claims": claims_to_json(correct(claims))}))


def _row(markdown: str, finding: str) -> list[str]:
    line = next(l for l in markdown.splitlines() if l.startswith(f"| {finding} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def _run(tmp_path) -> Path:
    run = tmp_path / "run"
    # 01: three claims, Holm over 3: p 0.01 -> 0.03, 0.02 -> 0.04, 0.3 -> 0.3
    _save(run, "01_vit_pruning", [
        Claim("selectivity", "s", 0.1234, (0.05, 0.2), 0.0, p=0.01, p_floor=1 / 201),
        Claim("selectivity_per_task", "s", 0.015, (0.001, 0.03), 0.0, p=0.02, p_floor=1 / 201),
        Claim("related_share_more", "r", 0.02, (-0.01, 0.05), 0.0, p=0.3, p_floor=1 / 1001)])
    # 02 with the released Llama-7B's own test, no Mistral one; 04 and 05 did not run
    _save(run, "02_mistral_pruning", [
        Claim("selectivity", "s", 0.08, (0.04, 0.11), 0.0, p=0.004, p_floor=1 / 201),
        Claim("related_share_more[llama-7b]", "r", 0.12, (0.002, 0.24), 0.0, p=0.001, p_floor=1 / 1001)])
    return run


def test_cells_hold_each_claims_numbers_and_the_reasons_for_the_others(tmp_path):
    run = _run(tmp_path)
    markdown = scorecard_markdown(run)
    vit, lm, b7 = (COLUMNS[k] for k in ("vit", "lm", "7b"))
    assert f"| finding | {vit} | {lm} | {b7} |" in markdown
    finding = FINDINGS[0][0]
    _, cell_vit, cell_lm, cell_7b = _row(markdown, finding)
    assert cell_vit == ("`selectivity`: 0.123 [0.05, 0.2], adjusted p 0.03, **supported**; "
                        "`selectivity_per_task`: 0.015 [0.001, 0.03], adjusted p 0.04, **supported**")
    # 02's family: p 0.004 and 0.001 -> Holm 0.004 and 0.002
    assert cell_lm.startswith("`selectivity`: 0.08 [0.04, 0.11], adjusted p 0.004, **supported**")
    assert "selectivity_per_task" not in cell_lm
    assert cell_7b.startswith("not testable here: the release holds neuron scores only")
    _, cell_vit, cell_lm, cell_7b = _row(markdown, FINDINGS[1][0])
    assert cell_vit.startswith("`related_share_more`: 0.02 [-0.01, 0.05], adjusted p 0.3, **not supported")
    assert cell_lm.startswith("not testable here:") and "`related_share_more`" in cell_lm
    assert cell_7b == "`related_share_more[llama-7b]`: 0.12 [0.002, 0.24], adjusted p 0.002, **supported**"
    for finding, _ in FINDINGS[2:]:          # 04 and 05 did not run: said, never a verdict
        _, cell_vit, cell_lm, _ = _row(markdown, finding)
        assert re.fullmatch(r"not testable here: notebook 0[45] did not run", cell_vit) and cell_lm == \
            cell_vit
    assert len([l for l in markdown.splitlines() if l.startswith("| ")]) == 1 + len(FINDINGS)


def test_no_claims_no_scorecard(tmp_path):
    assert scorecard_markdown(tmp_path) == "" and load_claims(tmp_path) == {}


def test_scorecard_is_the_first_table_of_summary_and_index(tmp_path):
    run = _run(tmp_path)
    for name in ("01_vit_pruning", "02_mistral_pruning"):     # a finished notebook with its findings
        (run / f"{name}.ipynb").write_text("{}")
        (run / "findings").mkdir(exist_ok=True)
        (run / "findings" / f"{name}.md").write_text(f"## {name}\n\n| claim | x |\n|---|---|\n| a | 1 |\n")
    write_summary(run, {**load_params(None), "params_file": "p.yaml"}, {})
    summary = (run / "summary.md").read_text()
    first_table = next(l for l in summary.splitlines() if l.startswith("|"))
    assert first_table.startswith("| finding |")
    assert summary.index("## Replication scorecard") < summary.index("## 01_vit_pruning")
    (run / "01_vit_pruning.ipynb").unlink()
    (run / "02_mistral_pruning.ipynb").unlink()
    page = write_index(run).read_text()
    assert page.index("Replication scorecard") < page.index("<table>") < page.index("01_vit_pruning")
    assert "adjusted p 0.03, <strong>supported</strong>" in page
    (run / "summary.md").unlink()             # without summary.md the page still opens with it
    page = write_index(run).read_text()
    assert page.index("Replication scorecard") < page.index("<table>") < page.index("01_vit_pruning")


def test_smoke_run_scorecard_reads_its_claims(smoke_run):
    """Every claim of the smoke run that FINDINGS names is in summary.md's scorecard with its own numbers."""
    from modsep_nb.scorecard import cell_text
    summary = (smoke_run / "summary.md").read_text()
    card = summary[summary.index("## Replication scorecard"):summary.index("## 01")]
    claims = load_claims(smoke_run)
    named = [claims[nb][cid] for _, spec in FINDINGS for col in COLUMNS if not isinstance(spec[col], str)
             for nb, cid in (spec[col][0] if isinstance(spec[col], tuple) else spec[col]) if cid in claims.get(nb, {})]
    assert {r["id"] for r in named} >= {"selectivity", "related_share_more"}
    for record in named:
        assert cell_text(record) in card, record["id"]
