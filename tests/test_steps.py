"""The notebooks' steps modules (routing 03, random_init 04, layerwise 05) and the result types notebooks index
into: cells run in any order after the setup cell and give what the notebook's order gives, claims are recorded
once, and the claims figure has its one caption."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modsep_nb import overlaps
from modsep_nb.data import FASHION_MNIST_GROUPS
from modsep_nb.report import CLAIMS_CAPTION, Report, plain
from modsep_nb.tasks import ImageTasks


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """The tiny Llama with three layers: early, middle and late thirds for the ends-vs-middle findings."""
    import transformers
    from conftest import _hf_lm_configs, make_tokenizer, perturb_
    config = _hf_lm_configs()["LlamaForCausalLM"]()
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama3")
    perturb_(transformers.LlamaForCausalLM(config), 0).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def _report(tmp_path, llama_dir, notebook: str, **sections) -> Report:
    overrides = {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                 "lm": {"model": str(llama_dir), "tasks": ["docs", "law", "licenses"], "stats_tokens": 48,
                        "eval_tokens": 24, "ctx": 16, "batch_size": 4, **sections.pop("lm", {})},
                 "evidence": {"n_boot": 20, "n_blocks": 4, "n_perm": 20}, **sections}
    return Report(notebook, None, tmp_path / "run", overrides)


def test_layerwise_cells_in_any_order(tmp_path, llama3_dir):
    from modsep_nb.layerwise import Layerwise
    sections = {"moefication": {"lm_experts": 4}, "correspondence": {"fracs": [0.2, 0.5], "n_null": 10}}
    in_order = Layerwise(_report(tmp_path / "a", llama3_dir, "05_layerwise_correspondence", **sections), kinds=("lm",))
    in_order.models()
    in_order.per_layer()
    rows = in_order.ends_vs_middle()
    in_order.evidence()
    text = in_order.findings()
    # a fresh notebook whose reader runs the findings cell first: everything it needs is computed on demand
    report = _report(tmp_path / "b", llama3_dir, "05_layerwise_correspondence", **sections)
    first = Layerwise(report, kinds=("lm",))
    assert first.findings() == text
    assert first.rows == rows and len(rows) == 2 * 2          # (trained, random init) x two fractions
    ids = ["correspondence_above_control[lm]", "ends_stronger_than_middle[lm]"]
    assert [c.id for c in report.claims] == ids               # the findings refer to the claims: recorded
    first.evidence()                                          # run after the findings: no second record
    assert [c.id for c in report.claims] == ids
    assert json.dumps(plain(first.results())) == json.dumps(plain(in_order.results()))
    assert sorted(first.results()) == [f"lm|{w}|{f}" for w in ("random init", "trained") for f in (0.2, 0.5)]
    # the claims figure: saved under the notebook's name with the one caption
    assert (tmp_path / "b" / "run" / "figures" / "05_claims.png").is_file()
    assert report.captions["05_claims"] == CLAIMS_CAPTION


def test_random_init_results_keep_the_saved_layout(tmp_path, llama_dir):
    """RandomInit.results() writes the comparison (a dataclass) as the dict notebook 04 always saved."""
    from modsep_nb.random_init import RandomInit
    report = _report(tmp_path, llama_dir, "04_random_init_control",
                     random_init={"seeds": [1, 2], "fracs": [0.1, 0.2], "frac": 0.2, "n_perm": 20})
    ri = RandomInit(report, kinds=("lm",))
    saved = plain(ri.results())               # the results cell first: every step computes what it needs
    trained, randoms = ri.studies["lm"]["trained"], ri.studies["lm"]["randoms"]
    expected = overlaps.random_init_comparison(trained.masks(0.2), [r.masks(0.2) for r in randoms], n_perm=20)
    entry = saved["summary"]["lm@0.2"]
    assert list(entry) == ["trained", "random", "matrices", "persistence", "between_seeds", "layers_trained",
                           "layers_random"]
    assert entry["trained"] == plain(expected.trained) and entry["random"] == plain(expected.random)
    assert entry["persistence"] == plain(expected.persistence)
    assert [c.id for c in report.claims] == ["trained_overlap_differs_from_random[lm]", "pattern_persists[lm]"]
    modes = saved["selection_modes"]["lm|per_layer"]
    per_layer = [overlaps.summary(st.masks(0.2, mode="per_layer")) for st in [trained] + randoms]
    assert modes["trained"] == pytest.approx(per_layer[0].median, nan_ok=True)
    assert modes["random"] == pytest.approx(float(np.median(np.concatenate([s.pairs for s in per_layer[1:]]))),
                                            nan_ok=True)


def test_random_init_claims_use_the_fraction_fixed_in_advance(tmp_path, llama_dir):
    """Issue #26 item 10: the claims' fraction is random_init.frac, not the sweep's largest (picked after the fact);
    the sweep still covers it."""
    from modsep_nb.random_init import RandomInit
    report = _report(tmp_path, llama_dir, "04_random_init_control",
                     random_init={"seeds": [1], "fracs": [0.2, 0.3], "frac": 0.1, "n_perm": 20})
    ri = RandomInit(report, kinds=("lm",))
    assert ri.f_show == 0.1 and ri.fracs == [0.1, 0.2, 0.3]
    assert all("top 10.0%" in c.statement for c in ri.claims if c.id.startswith("trained_overlap"))


def test_claim_fractions_and_seeds_are_checked_params():
    """Issue #26 items 8-10: the claims' fixed fractions and the routing seeds are params, refused when unusable."""
    from modsep_nb.params import ParamsError, load_params
    with pytest.raises(ParamsError, match="'moefication.claim_frac'"):       # a fraction the curves never route
        load_params(overrides={"moefication": {"keep_fracs": [0.25, 1.0], "claim_frac": 0.5}})
    with pytest.raises(ParamsError, match="'moefication.claim_frac'"):       # every expert kept: nothing to compare
        load_params(overrides={"moefication": {"keep_fracs": [0.25, 1.0], "claim_frac": 1.0}})
    with pytest.raises(ParamsError, match="'moefication.reseed_param'"):
        load_params(overrides={"moefication": {"reseed_param": ["gpt"]}})
    with pytest.raises(ParamsError, match="'moefication.n_seeds'"):
        load_params(overrides={"moefication": {"n_seeds": 0}})
    with pytest.raises(ParamsError, match="'random_init.frac'"):
        load_params(overrides={"random_init": {"frac": 0}})
    p = load_params(overrides={"moefication": {"eval_tasks": None, "claim_frac": None}})
    assert p["moefication"]["eval_tasks"] is None and p["moefication"]["claim_frac"] is None


def test_overlap_summary_fields():
    masks = {"a": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
             "b": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool),
             "c": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)}
    s = overlaps.summary(masks)
    assert isinstance(s, overlaps.OverlapSummary)
    assert s.names == ["a", "b", "c"] and s.n_selected == [2, 2, 3] and s.n_all == 8
    # |a∩b| = 1 of min(2, 2); c shares nothing with either
    np.testing.assert_allclose(s.pairs, [0.5, 0.0, 0.0])
    assert s.median == 0.0 and s.overlap[0, 1] == 0.5 and s.jaccard[0, 1] == pytest.approx(1 / 3)
    # uniform chance of the overlap coefficient: E|A∩B| / min = (|A||B| / N) / min(|A|, |B|), mean over pairs
    assert s.chance["overlap"] == pytest.approx(np.mean([2 * 2 / 8 / 2, 2 * 3 / 8 / 2, 2 * 3 / 8 / 2]))
    assert s["median"] == s.median and s["layer_chance"] is s.layer_chance      # 01/02's item access


def test_image_tasks_groups():
    """tasks.groups: the dataset's own groups when each task is one class (the related_share_more claim's)."""
    train = SimpleNamespace(groups=dict(FASHION_MNIST_GROUPS))
    assert ImageTasks({}, train, None, {"tasks": "classes"}).groups == FASHION_MNIST_GROUPS
    assert ImageTasks({}, train, None, {"tasks": "groups"}).groups is None          # the groups are the tasks
    assert ImageTasks({}, SimpleNamespace(groups=None), None, {"tasks": "classes"}).groups is None


def test_text_tasks_groups():
    """tasks.groups for text: the embedded domains' groups among the study's tasks; a task of one's own (a path in
    lm.tasks) is in no group whatever its name; None for text that is not the embedded source."""
    from modsep_nb.data import EMBEDDED_TEXT_GROUPS
    from modsep_nb.tasks import TextTasks
    groups = TextTasks({}, {"source": "embedded", "tasks": ["code", "docs", "law", "science"]}).groups
    assert groups == {g: [t for t in ts if t in ("code", "docs", "law", "science")]
                      for g, ts in EMBEDDED_TEXT_GROUPS.items()}
    assert "docs" in groups["code"] and "law" not in groups["code"]
    own = TextTasks({}, {"source": "embedded", "tasks": {"code": "mine/*.py", "docs": None}}).groups
    assert all("code" not in ts for ts in own.values()) and any("docs" in ts for ts in own.values())
    assert TextTasks({}, {"source": "hub", "tasks": ["code"]}).groups is None


def test_selective_pruning_cells_in_any_order(tmp_path, llama_dir):
    """Notebook 01/02's steps compute what they need on demand: the bisection cell run before the fixed-fraction
    cell (JupyterLab) gives the notebook order's matrices, and the fixed matrix is then shown, not recomputed."""
    from test_study import _predicting_unk          # accuracies that move with what is ablated
    from modsep_nb.selective import SelectivePruning
    from modsep_nb.study import Study
    sections = {"pruning": {"frac": 0.1, "target": 0.8, "random_seeds": [0], "max_steps": 3}, "lm": {"bisection": True}}

    def steps(folder):
        report = _report(tmp_path / folder, llama_dir, "02_mistral_pruning", **sections)
        return SelectivePruning(_predicting_unk(Study.from_params(report.params, "lm")), report, "02")
    in_order = steps("a")
    fixed, target = in_order.cross_task_fixed(), in_order.cross_task_target()
    assert np.isfinite(target.matrix).all() and all(0 < a < 1 for a in fixed.base.values())
    first = steps("b")
    got = first.cross_task_target()
    assert got.fracs == target.fracs and np.array_equal(got.matrix, target.matrix)
    again = first.cross_task_fixed()
    assert again is first.fixed and again.base == fixed.base
    np.testing.assert_array_equal(again.matrix, fixed.matrix)
    np.testing.assert_array_equal(again.random_matrix, fixed.random_matrix)
    assert first.findings() == in_order.findings()             # the overlap sets too, computed where first needed


def test_bisection_off_is_said_and_never_measured(tmp_path, llama_dir, capsys):
    """lm.bisection: false (the embedded default): the bisection cell says it was skipped and how to turn it on,
    no cross-task matrix by bisection is measured (only the fixed fraction's), the findings say the fractions were
    not searched, and the results carry None for the bisection's fields; the fixed matrix and its claims are as
    with the bisection on."""
    from test_study import _predicting_unk
    from modsep_nb.params import load_params
    from modsep_nb.selective import SelectivePruning
    from modsep_nb.study import Study
    pruning = {"pruning": {"frac": 0.1, "target": 0.8, "random_seeds": [0], "max_steps": 3}}

    def steps(folder, bisection):
        report = _report(tmp_path / folder, llama_dir, "02_mistral_pruning", **pruning, lm={"bisection": bisection})
        study = _predicting_unk(Study.from_params(report.params, "lm"))
        calls = []
        measure = study.cross_task
        study.cross_task = lambda **kw: calls.append(sorted(kw)) or measure(**kw)
        return SelectivePruning(study, report, "02"), calls
    assert load_params()["lm"]["bisection"] is False and load_params()["vit"]["bisection"] is True
    off, calls = steps("off", False)
    fixed = off.cross_task_fixed()
    assert off.cross_task_target() is None
    said = capsys.readouterr().out
    assert "bisection skipped" in said and "lm.bisection" in said and "at most 21 evaluations" in said    # 3 x (1 + 3) + 3 x 3
    assert calls == [["frac"]]                                  # the fixed matrix only
    assert "were not searched in this run (lm.bisection: false)" in off.findings()
    results = off.results()
    assert all(results[k] is None for k in ("cross_task_target", "target_fracs", "target_converged", "target_reached"))
    on, on_calls = steps("on", True)
    on.cross_task_fixed(), on.cross_task_target()
    assert [c for c in on_calls if "target" in c] and np.array_equal(on.fixed.matrix, fixed.matrix)
    assert "Bringing a domain to 80%" in on.findings() or "came down to 80%" in on.findings()
