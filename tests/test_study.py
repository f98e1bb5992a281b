"""The glue a notebook uses: Study over one task seam per modality, every accepted parameter value working,
one hook API, one cache helper, and a package whose modules import each other without a cycle."""
from __future__ import annotations

import ast
import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_hf_vit
from modsep_nb import files
from modsep_nb.params import load_params
from modsep_nb.pruning import ablate, prune_scores, task_scores
from modsep_nb.selective import claims, pseudo_selectivity
from modsep_nb.statistics import NeuronStats, weighted_pool
from modsep_nb.study import Study
from modsep_nb.tasks import ImageTasks, TextTasks

PACKAGE = Path(__file__).resolve().parent.parent / "modsep_nb"


def _params(tmp_path, model_dir, **pruning):
    return load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                              "lm": {"model": str(model_dir), "tasks": ["docs", "law", "licenses"],
                                     "stats_tokens": 48, "eval_tokens": 24, "ctx": 16, "batch_size": 4},
                              "pruning": pruning})


# -- the hook API --------------------------------------------------------------------------------------------
def test_hooks_replace_and_read_the_neuron_vector_and_go_away(tiny_llama):
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        clean = tiny_llama.model(input_ids=ids).logits
        with tiny_llama.capture() as captured:
            tiny_llama.model(input_ids=ids)
        seen = []
        with tiny_llama.hooks({0: lambda x: torch.zeros_like(x), 1: lambda x: seen.append(x.clone())}):
            zeroed = tiny_llama.model(input_ids=ids).logits
        # what layer 1 saw with layer 0 zeroed is what a by-hand forward with the layer-0 MLP output removed gives
        assert not torch.equal(seen[0], captured[1][0])
        assert not torch.allclose(zeroed, clean)
        with pytest.raises(RuntimeError, match="boom"), tiny_llama.hooks({0: lambda x: x * 0}):
            raise RuntimeError("boom")
        assert all(not tiny_llama.neuron_module(i)._forward_pre_hooks for i in range(tiny_llama.n_layers))
        torch.testing.assert_close(tiny_llama.model(input_ids=ids).logits, clean, rtol=0, atol=0)
    assert [len(captured[i]) for i in range(tiny_llama.n_layers)] == [1, 1]
    assert captured[0][0].shape == (1, 5, tiny_llama.d_mlp)


def test_zeroing_every_neuron_by_hook_equals_ablate(tiny_llama):
    ids = torch.tensor([[2, 20, 21, 22]])
    mask = torch.ones(tiny_llama.n_layers, tiny_llama.d_mlp, dtype=torch.bool)
    with torch.no_grad():
        with ablate(tiny_llama, mask):
            a = tiny_llama.model(input_ids=ids).logits
        with tiny_llama.hooks({layer: (lambda x: x * 0) for layer in range(tiny_llama.n_layers)}):
            b = tiny_llama.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- one definition of the pooled retain set -------------------------------------------------------------------
def _stats(seed, n=50.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 2, 6, generator=gen, dtype=torch.float64) * (1 + seed) + seed * 0.3
    return NeuronStats(torch.full((2,), n, dtype=torch.float64), x.mean(0), x.abs().mean(0), (x * x).mean(0),
                       (x > 0).double().mean(0), x.abs().sqrt().mean(0))


@pytest.mark.parametrize("importance", ["rms", "std", "abs"])
def test_rest_is_the_pooled_statistics_for_every_importance(importance):
    """'rest' pools the other tasks' statistics with equal weight, then takes the importance of the pool
    (for rms and std that differs from averaging the tasks' importances)."""
    stats = {"a": _stats(0), "b": _stats(1), "c": _stats(2)}
    b, c = stats["b"], stats["c"]
    mean_sq = (b.mean_sq + c.mean_sq) / 2
    mean = (b.mean + c.mean) / 2
    n = b.count[0] + c.count[0]
    by_hand = {"rms": mean_sq.sqrt(), "std": ((mean_sq - mean ** 2) * n / (n - 1)).sqrt(),
               "abs": (b.mean_abs + c.mean_abs) / 2}[importance]
    forget = {"rms": stats["a"].rms, "std": stats["a"].std, "abs": stats["a"].mean_abs}[importance]
    expected = forget / (by_hand + 1e-3)
    torch.testing.assert_close(task_scores(stats, importance=importance)["a"], expected)
    torch.testing.assert_close(prune_scores(stats["a"], [b, c], importance=importance), expected)
    if importance != "abs":       # averaging importances would be a different method
        averaged = forget / ((getattr(b, importance) + getattr(c, importance)) / 2 + 1e-3)
        assert not torch.allclose(averaged, expected)


# -- every accepted parameter value works ----------------------------------------------------------------------
def _spy(monkeypatch):
    """Record what Study.cross_task hands to cross_task_matrix (then run the real one)."""
    import modsep_nb.study as study_module
    seen = {}
    real = study_module.cross_task_matrix

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(study_module, "cross_task_matrix", spy)
    return seen


def test_retain_general_and_mean_ablation_run_end_to_end(tmp_path, llama_dir, monkeypatch):
    seen = _spy(monkeypatch)
    study = Study.from_params(_params(tmp_path, llama_dir, retain="general", ablation="mean"), "lm")
    stats = study.stats(progress=False)
    general = study.general_stats()     # the external corpus: none of the tasks' documents, not their pool
    used = {d for t in study.task_names for d in (*study.tasks[t].collect, *study.tasks[t].evaluate)}
    assert study.general_data(48) and not used & set(study.general_data(48))
    assert not torch.equal(general.mean_abs, weighted_pool(list(stats.values())).mean_abs)
    scores = study.scores()
    for t in study.task_names:
        torch.testing.assert_close(scores[t], prune_scores(stats[t], general, eps_relative=0.01))
    result = study.cross_task(frac=0.2, progress=False)
    assert result.settings["ablation"] == "mean" and result.pruned.shape == (3, 3)
    assert set(seen["means"]) == set(study.task_names)
    for t in study.task_names:
        torch.testing.assert_close(seen["means"][t], general.mean)


def test_rest_mean_ablation_uses_each_tasks_own_retain_mean(tmp_path, llama_dir, monkeypatch):
    seen = _spy(monkeypatch)
    study = Study.from_params(_params(tmp_path, llama_dir, ablation="mean"), "lm")
    stats = study.stats(progress=False)
    study.cross_task(frac=0.2, progress=False)
    for t in study.task_names:
        others = [s for n, s in stats.items() if n != t]
        torch.testing.assert_close(seen["means"][t], torch.stack([s.mean for s in others]).mean(0))
    study = Study.from_params(_params(tmp_path, llama_dir), "lm")
    study.cross_task(frac=0.2, progress=False)
    assert seen["means"] is None and seen["ablation"] == "zero"


def test_random_init_gets_the_same_data_and_budget_unless_told(tmp_path, llama_dir):
    params = _params(tmp_path, llama_dir)
    trained = Study.from_params(params, "lm")
    random = trained.with_random_init(3)
    assert random.handle.random_init and random.handle.seed == 3
    assert random.tasks is trained.tasks                  # the same documents
    assert random.stats_budget == trained.stats_budget == 48
    assert "48 tokens" in random.describe() and "random init, seed 3" in random.describe()
    # 48 tokens read: 3 windows of 16, whose first positions are not counted (lm.skip_positions)
    assert random.stats(progress=False)["docs"].count[0] == trained.stats(progress=False)["docs"].count[0] == 48 - 3
    params["random_init"]["stats_tokens"] = 32            # a different budget only on purpose
    assert "32 tokens" in Study.from_params(params, "lm", random_seed=3).describe()


# -- the image seam ------------------------------------------------------------------------------------------
def test_image_tasks_budget_and_accuracy_per_task(tmp_path):
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=28, patch_size=7)
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "vit": {"model": str(vit_dir), "tasks": "groups", "stats_images": 12,
                                        "eval_images": 150, "batch_size": 64}})
    study = Study.from_params(params, "vit")
    assert isinstance(study.tasks, ImageTasks) and study.stats_budget == 12
    tops = study.tasks.statistics_data("tops", 12)
    assert tops.shape == (12, 1, 28, 28)
    per_image = study.handle.image_logits(study.tasks.test.images).argmax(-1) == study.tasks.test.labels
    names = study.tasks.test.class_names
    for task, classes in study.tasks.tasks.items():
        ids = torch.tensor([names.index(c) for c in classes])
        keep = torch.isin(study.tasks.test.labels, ids)
        assert study.evaluate_tasks([task])[task] == pytest.approx(float(per_image[keep].float().mean()))
        # per-image hits from a pass over this task's own images, and from one pass over all of them
        assert study.tasks.document_hits(study.handle, [task])[task]["top1"].tolist() == per_image[keep].long().tolist()
        assert study.document_hits()[task]["top1"].tolist() == per_image[keep].long().tolist()
    assert study.stats(progress=False)["tops"].count[0] == 12 * 17      # 16 patches + CLS per image


def test_text_tasks_give_the_collect_documents_their_budget_reads(tmp_path, llama_dir):
    from modsep_nb.data import document_windows
    from modsep_nb.statistics import collect_block_stats
    study = Study.from_params(_params(tmp_path, llama_dir), "lm")
    tasks, tok, collect = study.tasks, study.handle.tokenizer, study.tasks["law"].collect
    assert isinstance(tasks, TextTasks) and tasks.unit == "tokens"
    assert tasks.statistics_data("law", None) == collect
    assert not set(collect) & set(tasks["law"].evaluate)
    # the budget is honoured: the first documents, as far as the collector reads, and their windows are the same
    read = {b: tasks.statistics_data("law", b) for b in (20, 48)}
    assert 0 < len(read[20]) < len(read[48]) < len(collect)
    for budget, docs in read.items():
        assert docs == collect[:len(docs)]
        assert tasks.statistics_names("law", budget) == list(tasks["law"].collect_ids[:len(docs)])
        assert document_windows(tok, docs, ctx=16, max_tokens=budget) == document_windows(tok, collect, ctx=16,
                                                                                            max_tokens=budget)
        assert document_windows(tok, docs[:-1], ctx=16, max_tokens=budget) != document_windows(
            tok, collect, ctx=16, max_tokens=budget)                                 # and its last one is read
    with pytest.raises(ValueError, match="needs the model's tokenizer"):         # a budget in tokens needs one
        TextTasks(tasks.tasks, tasks.settings).statistics_data("law", 20)
    # the statistics (per block of documents) of the budget's documents are those of all of them, bit for bit
    options = {"max_tokens": 48, "batch_size": 4, **tasks.collect_options()}
    few, every = (collect_block_stats(study.handle, docs, 4, progress=False, **options) for docs in (read[48], collect))
    assert torch.equal(few.count, every.count) and torch.equal(few.sums, every.sums)


def test_text_and_image_tasks_implement_one_seam():
    """tasks.Tasks: every member of the Protocol on both modalities, methods with the same parameters, so a Study
    calls either the same way."""
    import inspect
    from modsep_nb.tasks import ImageTasks, Tasks
    methods = {n: v for n, v in vars(Tasks).items() if (callable(v) or isinstance(v, property))
               and (not n.startswith("_") or n == "__getitem__")}
    assert len(methods) + len(Tasks.__annotations__) >= 17 and "general_data" in methods
    for cls in (TextTasks, ImageTasks):
        for name in Tasks.__annotations__:
            assert isinstance(getattr(cls, name), str), (cls, name)
        for name, member in methods.items():
            got = getattr(cls, name)
            if isinstance(member, property):
                assert isinstance(got, property), (cls, name)
            else:
                assert list(inspect.signature(got).parameters) == list(inspect.signature(member).parameters), (cls, name)
    assert isinstance(TextTasks({}, {}), Tasks) and isinstance(ImageTasks({}, None, None, {}), Tasks)
    assert {TextTasks.section, ImageTasks.section} == {"lm", "vit"}
    assert (TextTasks.stats_key, ImageTasks.stats_key) == ("stats_tokens", "stats_images")      # keys, never built


# -- one cache helper ---------------------------------------------------------------------------------------
def test_cached_recomputes_what_cannot_be_loaded(tmp_path):
    path = tmp_path / "value.txt"
    calls = []

    def compute():
        calls.append(1)
        return "fresh"

    def load(p):
        text = p.read_text()
        if text == "stale":
            raise LookupError("made with other settings")
        return text

    def save(value, p):
        p.write_text(value)
    assert files.cached(path, compute, load=load, save=save) == "fresh" and len(calls) == 1
    assert files.cached(path, compute, load=load, save=save) == "fresh" and len(calls) == 1
    path.write_text("stale")
    with pytest.warns(UserWarning, match="made with other settings; recomputing"):
        assert files.cached(path, compute, load=load, save=save, what="thing") == "fresh"
    path.write_bytes(b"\xff\xfe")
    with pytest.warns(UserWarning, match="unreadable"):
        assert files.cached(path, compute, load=load, save=save) == "fresh"
    assert len(calls) == 3 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- layering ---------------------------------------------------------------------------------------------
def _internal_imports(tree, top_level_only):
    nodes = tree.body if top_level_only else [n for n in ast.walk(tree)]
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_modules_import_each_other_at_the_top_and_without_a_cycle():
    trees = {p.stem: ast.parse(p.read_text()) for p in PACKAGE.glob("*.py")}
    graph = {name: _internal_imports(tree, True) & set(trees) for name, tree in trees.items()}
    for name, tree in trees.items():
        inside = _internal_imports(tree, False) - _internal_imports(tree, True)
        assert not inside, f"{name}.py imports {sorted(inside)} inside a function: put internal imports at the top"
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])


# -- what each task is, on record -------------------------------------------------------------------------
def test_record_names_the_documents_statistics_and_evaluation_read(tmp_path, llama_dir):
    study = Study.from_params(_params(tmp_path, llama_dir), "lm")
    record = study.record()
    assert set(record) == set(study.task_names)
    for t, entry in record.items():
        task = study.tasks[t]
        assert entry["statistics"] and set(entry["statistics"]) <= set(task.collect_ids)
        assert entry["evaluation"] and set(entry["evaluation"]) <= set(task.evaluate_ids)
        assert not set(entry["statistics"]) & set(entry["evaluation"])
    from modsep_nb.report import Report
    report = Report("02_mistral_pruning", None, tmp_path / "run", {"device": "cpu"})
    path = report.save_tasks(study)
    import json
    # plain task names are their own file names (statistics/lm-docs.safetensors, neurons/lm-docs.html)
    assert json.loads(path.read_text()) == {"lm": {t: {**entry, "file_name": t} for t, entry in record.items()}}


def test_image_record_lists_the_images_used(tmp_path):
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=28, patch_size=7)
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "vit": {"model": str(vit_dir), "tasks": "groups", "stats_images": 5, "eval_images": 100}})
    study = Study.from_params(params, "vit")
    record = study.record()
    train, test = study.tasks.train, study.tasks.test
    for t, entry in record.items():
        ids = [int(i.split(":")[1]) for i in entry["statistics"]]
        assert len(ids) == 5 and all(train.class_names[int(train.labels[i])] in study.tasks[t] for i in ids)
        torch.testing.assert_close(train.images[ids], study.tasks.statistics_data(t, 5))
        test_ids = [int(i.split(":")[1]) for i in entry["evaluation"]]
        assert sorted(test_ids) == [i for i in range(len(test)) if test.class_names[int(test.labels[i])] in study.tasks[t]]


def test_stability_compares_part_of_the_documents_with_all(tmp_path, llama_dir):
    from modsep_nb.statistics import NeuronStats
    params = _params(tmp_path, llama_dir)
    params["evidence"]["n_blocks"] = 4
    study = Study.from_params(params, "lm")
    from modsep_nb.selective import stability
    got = stability(study, [0.25, 0.5, 1.0], 0.1)
    blocks = study.block_stats(progress=False)
    full = study.masks(0.1)
    for q in (0.25, 0.5):
        k = round(q * 4)           # by hand: the sums of the first k blocks (the first documents read)
        part = {t: NeuronStats.from_sums(b.count[:k].sum(0), list(b.sums[:k].sum(0)), {}) for t, b in blocks.items()}
        masks = study.masks(0.1, scores=study.scores(stats=part))
        for t in study.task_names:
            assert got[q][t] == pytest.approx(float((masks[t] & full[t]).sum()) / float(masks[t].sum()))
    assert all(v == 1.0 for v in got[1.0].values())


def test_claims_of_a_study_carry_interval_null_and_test(tmp_path, llama_dir):
    params = _params(tmp_path, llama_dir)
    params["evidence"].update({"n_boot": 40, "n_null": 20, "n_perm": 50, "n_blocks": 4})
    study = Study.from_params(params, "lm")
    groups = {"legal": ["law", "licenses"], "other": ["docs"]}
    result = claims(study, 0.1, groups)
    ids = [c.id for c in result["claims"]]
    assert ids == ["selectivity", "selectivity_per_task", "overlap_above_null", "related_share_more"]
    for c in result["claims"]:
        # an undefined estimate (a tiny model's task never right before pruning) has no p, never a small one
        assert c.null == 0.0 and len(c.ci) == 2 and (c.p is None or 0 < c.p <= 1 or (c.undefined and math.isnan(c.p)))
        if c.supported:
            assert c.ci[0] > 0 and (c.p is None or c.p < 0.05)
    sel = result["selectivity"]
    assert sel["selected"]["n_documents"] == sel["random"]["n_documents"]       # the same documents
    # the claim reuses a fixed cross-task result's hits: its estimate is that matrix's selectivity beyond random
    fixed = study.cross_task(frac=0.1, progress=False)
    by_hand = fixed.selectivity()
    assert result["claims"][0].estimate == pytest.approx(np.mean(by_hand["selectivity"]) -
                                                         np.mean(by_hand["random_selectivity"]), nan_ok=True)
    again = claims(study, 0.1, groups, fixed=fixed)
    assert again["claims"][0].estimate == pytest.approx(result["claims"][0].estimate, nan_ok=True)
    assert again["claims"][0].ci == pytest.approx(result["claims"][0].ci, nan_ok=True)
    related = result["related"]
    assert related["p"] == pytest.approx((1 + (related["null"] >= related["difference"] - 1e-12).sum()) / 51)
    overlap_claim = result["claims"][2]
    assert overlap_claim.estimate == pytest.approx(result["overlap"]["median"] - result["overlap"]["null_median"])


def _predicting_unk(study):
    """Real text under the toy word vocabulary is mostly [UNK]: a bias on [UNK] in the tiny random model's head,
    set (by bisection) so that it is predicted about half the time, makes accuracies move with what is ablated."""
    head = study.handle.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight.data, biased.bias.data = head.weight.data.clone(), torch.zeros(head.out_features)
    study.handle.model.lm_head = biased
    unk, domain, lo, hi = study.handle.tokenizer.unk_token_id, study.null_domain(), -50.0, 50.0
    for _ in range(20):
        biased.bias.data[unk] = (lo + hi) / 2
        hits = study.tasks.document_hits(study.handle, [domain])[domain]
        lo, hi = ((lo + hi) / 2, hi) if hits["top1"].sum() < 0.5 * hits["n"].sum() else (lo, (lo + hi) / 2)
    return study


def test_selectivity_claim_against_pseudo_tasks(tmp_path, llama_dir):
    params = _params(tmp_path, llama_dir)
    params["evidence"].update({"n_boot": 40, "n_null": 6, "n_null_ablation": 5, "n_blocks": 4})
    params["lm"].update({"eval_tokens": 200, "selectivity_null": True})
    study = _predicting_unk(Study.from_params(params, "lm"))
    null = pseudo_selectivity(study, 0.1, 5, seed=3)
    assert null.shape == (5,) and np.isfinite(null).all()
    assert np.array_equal(null, pseudo_selectivity(study, 0.1, 5, seed=3))            # seeded
    result = claims(study, 0.1, {"legal": ["law", "licenses"], "other": ["docs"]}, seed=1)
    claim = result["claims"][0]
    fixed = study.cross_task(frac=0.1, progress=False).selectivity()
    observed = np.mean(fixed["selectivity"]) - np.mean(fixed["random_selectivity"])
    null = pseudo_selectivity(study, 0.1, 5, seed=3)            # what claims uses: seed + 2
    assert claim.estimate == pytest.approx(observed - null.mean())
    assert claim.p == pytest.approx((1 + int(np.sum(null >= observed))) / 6)
    np.testing.assert_array_equal(result["selectivity"]["null"], null)       # not the related test's null
    params["lm"]["selectivity_null"] = False           # off: the null is 0 (exchangeability), no pseudo-task pass
    plain_result = claims(Study(study.handle, params, "lm", study.tasks), 0.1, seed=1)
    plain = plain_result["claims"][0]
    assert plain_result["selectivity"]["null"] is None
    forced = claims(Study(study.handle, params, "lm", study.tasks), 0.1, seed=1, selectivity_null=True)
    np.testing.assert_array_equal(forced["selectivity"]["null"], null)            # the argument overrides params
    one_seed = study.cross_task(frac=0.1, random_seeds=[7], progress=False)
    assert one_seed.random_pruned.shape[0] == 1 and one_seed.settings["random_seeds"] == [7]
    assert plain.estimate == pytest.approx(observed) and "pseudo-tasks" not in plain.statement


def test_random_init_claims(tmp_path, llama_dir):
    from modsep_nb import overlaps
    from modsep_nb.random_init import random_init_claims
    params = _params(tmp_path, llama_dir)
    params["lm"]["tasks"] = ["docs", "law", "licenses", "science"]
    params["evidence"].update({"n_boot": 40, "n_blocks": 4})
    trained = Study.from_params(params, "lm")
    randoms = [trained.with_random_init(s) for s in (1, 2)]
    comparison = overlaps.random_init_comparison(trained.masks(0.1), [r.masks(0.1) for r in randoms], n_perm=50)
    differs, persists = random_init_claims("lm", trained, randoms, comparison.persistence, 0.1)
    assert differs.id == "trained_overlap_differs_from_random[lm]" and differs.direction == "two-sided"

    def excess(masks):      # issue #26 item 10: each pair's overlap minus its layer-matched chance, by hand
        out = []
        for a, b in itertools.combinations(list(masks.values()), 2):
            na, nb = a.sum(1).double(), b.sum(1).double()
            smaller = min(float(na.sum()), float(nb.sum()))
            out.append(float((a & b).sum()) / smaller - float((na * nb).sum()) / a.shape[1] / smaller)
        return out
    expected = np.median(excess(trained.masks(0.1))) - np.median(sum((excess(r.masks(0.1)) for r in randoms), []))
    assert differs.estimate == pytest.approx(expected, nan_ok=True) and "top 10.0%" in differs.statement
    # n: the units resampled, every task's blocks of documents (at most n_blocks 4 each), not 1 + seeds
    assert differs.n == sum(b.n_blocks for b in trained.block_stats().values()) and 4 < differs.n <= 16
    assert persists.id == "pattern_persists[lm]" and persists.n == 2 and persists.correction == "holm"
    rhos = sorted(p["rho"] for p in comparison.persistence)
    assert comparison.rhos == [p["rho"] for p in comparison.persistence]
    assert persists.estimate == pytest.approx(float(np.median(rhos)), nan_ok=True)
    if math.isnan(persists.estimate):       # no ranking in a tiny model's matrices: undefined, so no p either
        assert math.isnan(persists.p) and not persists.supported
    else:
        assert persists.p == pytest.approx(max(min(1.0, 2 * min(p["p_value"] for p in comparison.persistence)),
                                               max(p["p_value"] for p in comparison.persistence)), nan_ok=True)


def test_routing_evidence_matches_the_routing_curve(tmp_path, llama_dir):
    from modsep_nb.moefication import random_balanced_split
    from modsep_nb.routing import routing_curve, routing_evidence
    params = _params(tmp_path, llama_dir)
    params["moefication"]["lm_experts"] = 4
    params["evidence"]["n_boot"] = 40
    study = Study.from_params(params, "lm")
    d = study.handle.d_mlp
    splits = {"param": torch.stack([random_balanced_split(d, 4, seed=10 + i) for i in range(study.handle.n_layers)]),
              "random": torch.stack([random_balanced_split(d, 4, seed=20 + i) for i in range(study.handle.n_layers)])}
    result = routing_evidence(study, splits, [0.25, 0.5, 1.0], ["docs", "law"])
    for method, labels in splits.items():
        expected = routing_curve(study, labels, [0.25, 0.5, 1.0], ["docs", "law"])
        for frac in (0.25, 0.5, 1.0):
            assert result["curve"][method][frac] == pytest.approx(expected[frac], nan_ok=True)
    (claim,) = result["claims"]
    assert claim.id == "param_routing_beats_random[lm]" and claim.null == 0.0
    means = {m: np.nanmean([result["curve"][m][f][t] for f in (0.25, 0.5) for t in ("docs", "law")]) for m in splits}
    assert claim.estimate == pytest.approx(means["param"] - means["random"], nan_ok=True)
    with pytest.raises(ValueError, match="random"):
        routing_evidence(study, {"param": splits["param"]}, [0.5])
    # each curve point's band: a 95% interval that holds it, (1, 1) where every expert is kept
    study = _predicting_unk(study)
    result = routing_evidence(study, splits, [0.25, 0.5, 1.0], ["docs", "law"])
    for method in splits:
        assert result["bands"][method][1.0] == (1.0, 1.0)
        for frac in (0.25, 0.5):
            point = np.mean(list(result["curve"][method][frac].values()))
            lo, hi = result["bands"][method][frac]
            assert np.isfinite(point) and lo <= point + 1e-9 and point <= hi + 1e-9


def test_routing_claims_average_over_split_seeds(tmp_path, llama_dir):
    """Issue #26 item 8: the routing claim is the mean over split seeds of (param - random) at the claim's fraction,
    each seed's splits routed on their own (a method a seed leaves out keeps the first seed's split)."""
    from modsep_nb.moefication import random_balanced_split
    from modsep_nb.routing import routing_curve, routing_evidence
    params = _params(tmp_path, llama_dir)
    params["moefication"]["lm_experts"] = 4
    params["evidence"]["n_boot"] = 40
    study = _predicting_unk(Study.from_params(params, "lm"))        # accuracies that move with the routing
    d, n_layers, tasks = study.handle.d_mlp, study.handle.n_layers, ["docs", "law"]
    split = lambda s: torch.stack([random_balanced_split(d, 4, seed=s + i) for i in range(n_layers)])  # noqa: E731
    first = {"param": split(10), "random": split(20)}
    reseeded = [{"random": split(30)}, {"random": split(40), "param": split(50)}]
    result = routing_evidence(study, first, [0.25, 0.5, 1.0], tasks, reseeded=reseeded, claim_frac=0.5)
    (claim,) = result["claims"]
    expected = []
    for param, random in ((first["param"], first["random"]), (first["param"], split(30)), (split(50), split(40))):
        curves = [routing_curve(study, labels, [0.5], tasks)[0.5] for labels in (param, random)]
        expected.append(np.mean([curves[0][t] for t in tasks]) - np.mean([curves[1][t] for t in tasks]))
    assert np.isfinite(expected).all() and len(set(np.round(expected, 9))) > 1     # seeds that differ
    assert result["seeds"]["param"] == pytest.approx(expected)
    assert claim.estimate == pytest.approx(np.mean(expected))
    assert "3 split seeds" in claim.statement
    # one seed (no reseeded): the claim at claim_frac is that seed's difference, as before
    (single,) = routing_evidence(study, first, [0.25, 0.5, 1.0], tasks, claim_frac=0.5)["claims"]
    assert single.estimate == pytest.approx(expected[0])
    with pytest.raises(ValueError, match="claim_frac"):
        routing_evidence(study, first, [0.25, 1.0], tasks, claim_frac=0.5)


def test_seeds_and_documents_resamples_seeds_as_well():
    """With no document noise (every resample of a seed equals its value) the old one-seed interval would be a
    point; resampling seeds gives the bootstrap of the seeds' mean: inside their range, around their mean. With
    identical seeds it is the documents' resamples unchanged."""
    from modsep_nb.routing import seeds_and_documents
    observed = np.array([0.054, 0.017, 0.037, 0.034])        # the four LM split seeds
    estimate, samples = seeds_and_documents(observed, np.repeat(observed[:, None], 2000, 1), seed=0)
    assert estimate == pytest.approx(observed.mean())
    assert observed.min() <= samples.min() and samples.max() <= observed.max()
    assert samples.std() == pytest.approx(observed.std() / 2, rel=0.1)      # sd of a mean of 4 draws: sd / sqrt(4)
    docs = np.random.default_rng(1).normal(size=300)
    estimate, samples = seeds_and_documents([0.2, 0.2, 0.2], np.tile(docs, (3, 1)), seed=0)
    assert estimate == pytest.approx(0.2) and samples == pytest.approx(docs)


def test_splits_under_another_seed(tmp_path, llama_dir):
    """splits(method, seed=s) is split_layers with seed s (default: the params' seed), cached apart per seed."""
    from modsep_nb.moefication import split_layers
    params = _params(tmp_path, llama_dir)
    params["moefication"]["lm_experts"] = 4
    study = Study.from_params(params, "lm")
    for method in ("param", "random"):
        default, other = study.splits(method, progress=False), study.splits(method, seed=7, progress=False)
        torch.testing.assert_close(default, split_layers(study.handle, method, 4, seed=params["seed"], progress=False))
        torch.testing.assert_close(other, split_layers(study.handle, method, 4, seed=7, progress=False))
        assert not torch.equal(default, other)
        torch.testing.assert_close(study.splits(method, seed=params["seed"], progress=False), default)


def test_dtype_per_section_and_auto(tmp_path, llama_dir, monkeypatch):
    from modsep_nb import params as P
    params = _params(tmp_path, llama_dir)
    assert P.dtype_of(params, "lm") == "float32"              # lm.dtype null: the top-level dtype
    params["lm"]["dtype"] = "bfloat16"
    assert P.dtype_of(params, "lm") == "bfloat16" and P.dtype_of(params, "vit") == "float32"
    study = Study.from_params(params, "lm")
    assert study.handle.dtype == torch.bfloat16 and study.dtype == "bfloat16" and "(bfloat16)" in study.describe()
    stats = study.stats(progress=False)                      # sums stay float64 whatever the model's dtype
    assert stats["docs"].mean.dtype == torch.float64 and torch.isfinite(stats["docs"].mean).all()
    params["lm"]["dtype"] = "float32"                          # another dtype is another cache entry
    again = Study.from_params(params, "lm").stats(progress=False)
    assert not torch.equal(again["docs"].mean, stats["docs"].mean)
    params["lm"]["dtype"] = "auto"                             # auto: bfloat16 only where computed natively
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        assert P.dtype_of({**params, "device": "cpu"}, "lm") == expected


# -- a first-position (attention-sink) neuron and tasks of different document lengths (issue #26 item 2) ----------
PLANTED = (0, 5)        # layer, neuron


def _first_position_gpt2(directory, strength: float = 40.0, gain: float = 20.0):
    """A tiny GPT-2 whose neuron PLANTED fires hugely at the first position of every window, whatever the token,
    and is 0 everywhere else: residual dimensions 0 and 1 are equal at every position but the first (token
    embeddings, later position embeddings and the attention's output alike there), the first position's
    embedding sets them apart by 2 x strength, and the neuron reads only their difference."""
    import transformers
    from conftest import _hf_lm_configs, make_tokenizer, perturb_
    torch.manual_seed(0)
    model = perturb_(transformers.GPT2LMHeadModel(_hf_lm_configs()["GPT2LMHeadModel"]()), 0)
    t, (layer, neuron) = model.transformer, PLANTED
    block = t.h[layer]
    with torch.no_grad():
        t.wte.weight[:, 1] = t.wte.weight[:, 0]
        t.wpe.weight[:, 1] = t.wpe.weight[:, 0]
        t.wpe.weight[0, 0] += strength
        t.wpe.weight[0, 1] -= strength
        block.attn.c_proj.weight[:, 1] = block.attn.c_proj.weight[:, 0]      # Conv1D: [in, out]
        block.attn.c_proj.bias[1] = block.attn.c_proj.bias[0]
        block.ln_2.weight[:2] = 1.0
        block.ln_2.bias[1] = block.ln_2.bias[0]
        fc = block.mlp.c_fc
        fc.weight[:, neuron] = 0.0
        fc.weight[0, neuron], fc.weight[1, neuron], fc.bias[neuron] = gain, -gain, 0.0
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def _length_tasks(folder) -> dict:
    """Three tasks of the same words (every other one unknown to the tokenizer: [UNK]) that differ only in how
    long their documents are: mostly 3-5, 12-20 and 40-60 words; every 8th document has 40-60 in each, so that
    every task has windows reaching every position (no position is missing from a task's statistics)."""
    import random as rnd
    from conftest import WORDS
    rng, tasks = rnd.Random(3), {}
    for name, (lo, hi, n_docs) in {"short": (3, 5, 110), "middle": (12, 20, 50), "long": (40, 60, 30)}.items():
        (folder / name).mkdir(parents=True)
        for i in range(n_docs):
            n_words = rng.randint(lo, hi) if i % 8 else rng.randint(40, 60)
            words = [rng.choice(WORDS) if k % 2 else f"x{name}{i}k{k}" for k in range(n_words)]
            (folder / name / f"{i:03d}.txt").write_text(" ".join(words))
        tasks[name] = {"files": [str(folder / name / "*.txt")]}
    return tasks


def _planted_study(tmp_path, **lm):
    params = load_params(None, {
        "cache_dir": str(tmp_path / "cache"), "device": "cpu",
        "lm": {"model": str(tmp_path / "gpt2"), "tasks": _length_tasks(tmp_path / "texts") if not
               (tmp_path / "texts").exists() else {t: {"files": [str(tmp_path / "texts" / t / "*.txt")]}
                                                   for t in ("short", "middle", "long")},
               "stats_tokens": 320, "eval_tokens": 120, "ctx": 16, "batch_size": 8, **lm},
        "pruning": {"frac": 0.05, "random_seeds": [0, 1]}, "overlap": {"frac": 0.05},
        "evidence": {"n_boot": 200, "n_null": 20, "n_null_ablation": 5, "n_blocks": 8}})
    return Study.from_params(params, "lm")


def test_a_first_position_neuron_is_not_selected_for_short_documents(tmp_path):
    _first_position_gpt2(tmp_path / "gpt2")
    layer, neuron = PLANTED
    # every token counted alike (the old statistics): the planted neuron's mean is its first-position value over
    # the window length, so the domain of short documents looks specific to it, and the verdict follows
    off = _predicting_unk(_planted_study(tmp_path, skip_positions=[], equal_positions=False))
    counted = {t: float(s.mean_abs[layer, neuron]) for t, s in off.stats(progress=False).items()}
    assert counted["short"] > 2 * counted["long"] and counted["short"] > counted["middle"] > counted["long"] > 0
    assert bool(off.masks(0.05)["short"][layer, neuron])          # selected: the test below has teeth
    assert {c.id: c for c in claims(off, 0.05)["claims"]}["selectivity"].supported

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)             # every task reaches every position: no warning
        study = _predicting_unk(_planted_study(tmp_path))          # the defaults: position 0 out, positions alike
        stats = study.stats(progress=False)
    assert study.settings["skip_positions"] == [0] and study.settings["equal_positions"] is True
    assert all(float(s.mean_abs[layer, neuron]) < 1e-4 for s in stats.values())      # it never fires after position 0
    assert not any(bool(m[layer, neuron]) for m in study.masks(0.05).values())
    result = {c.id: c for c in claims(study, 0.05)["claims"]}
    for claim_id in ("selectivity", "selectivity_per_task"):
        assert math.isfinite(result[claim_id].estimate) and not result[claim_id].supported, result[claim_id]
    per_task = result["selectivity_per_task"].per_task
    assert set(per_task) == {"short", "middle", "long"} and not any(r["selective"] for r in per_task.values())


@pytest.mark.parametrize("skip", [[0, 0], [16], [-1], [True], list(range(16)), "0"])
def test_skip_positions_must_be_distinct_positions_of_a_window(skip):
    from modsep_nb.params import ParamsError
    with pytest.raises(ParamsError, match="'lm.skip_positions' must be a list") as err:
        load_params(None, {"lm": {"ctx": 16, "skip_positions": skip}})
    assert "\n" not in str(err.value)
    assert load_params(None, {"lm": {"ctx": 16, "skip_positions": [0, 15]}})["lm"]["skip_positions"] == [0, 15]
