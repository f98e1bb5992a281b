"""Evidence (docs/method.md §5.3): statistics per block of documents that merge back to collect_stats and resample without a
forward pass; per-document evaluation; the claims record and its one rule; Holm; bootstrap intervals, the
pseudo-task null and the tests of comparisons against values worked out by hand; and the ground truth: a model
with planted task-dedicated (and pair-shared) neurons supports `selectivity` and `overlap_above_null`, tasks
that are random parts of one corpus support neither."""
from __future__ import annotations

import itertools
import json
import math
import random
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import VOCAB, WORDS, make_tokenizer, one_hot_llama, random_texts
from modsep_nb import ablate, collect_stats, evaluate, load_model
from modsep_nb.claims import Claim, benjamini_hochberg, claims_table, claims_to_json, correct, holm
from modsep_nb.evaluation import selectivity
from modsep_nb.evidence import (child_seeds, combine_seeds, cross_task_bootstrap, excess_claim, layer_matched_chance,
                                overlap_evidence, paired_difference_ci, permutation_related_vs_unrelated,
                                pseudo_task_null, pseudo_tasks, ratio_of_sums, selectivity_claim,
                                selectivity_per_task)
from modsep_nb.overlaps import overlap_matrix
from modsep_nb.params import ParamsError, load_params
from modsep_nb.statistics import (MEANS, BlockStats, block_of_documents, bootstrap_stats, bootstrap_weights,
                                  collect_block_stats)


def assert_stats_close(a, b, rtol=1e-6, atol=1e-7):
    assert torch.equal(a.count, b.count)
    for m in MEANS:
        torch.testing.assert_close(getattr(a, m), getattr(b, m), rtol=rtol, atol=atol)


# -- block statistics --------------------------------------------------------------------------------------
def test_block_of_documents_by_hand():
    assert block_of_documents(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert block_of_documents(3, 32).tolist() == [0, 1, 2]          # never more blocks than documents
    with pytest.raises(ValueError, match="at least one block"):
        block_of_documents(5, 0)


@pytest.mark.parametrize("fused", [False, True])
def test_blocks_merge_to_collect_stats(tiny_llama, fused):
    texts = random_texts(40, seed=1, min_len=1, max_len=30)
    whole = collect_stats(tiny_llama, texts, ctx=16, batch_size=4, max_tokens=500, progress=False, fused=fused)
    blocks = collect_block_stats(tiny_llama, texts, 7, ctx=16, batch_size=4, max_tokens=500, progress=False,
                                 fused=fused)
    assert blocks.n_blocks == 7 and blocks.meta["tokens"] == 500
    assert_stats_close(blocks.merged(), whole)      # batches spanning blocks differ by float32 rounding only


def test_each_block_is_its_own_documents(tiny_llama):
    texts = random_texts(11, seed=2, min_len=2, max_len=40)
    blocks = collect_block_stats(tiny_llama, texts, 4, ctx=16, batch_size=3, progress=False, fused=False)
    block_of = block_of_documents(len(texts), 4).tolist()
    assert blocks.n_documents.tolist() == [block_of.count(b) for b in range(4)]
    for b in range(4):
        mine = [t for t, k in zip(texts, block_of) if k == b]
        alone = collect_stats(tiny_llama, mine, ctx=16, batch_size=3, progress=False, fused=False)
        assert_stats_close(blocks.subset([b]).merged(), alone)


def test_image_blocks(tiny_vit):
    images = torch.randn(23, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for cls_only in (False, True):
        blocks = collect_block_stats(tiny_vit, images, 5, batch_size=4, cls_only=cls_only, progress=False, fused=False)
        assert_stats_close(blocks.merged(), collect_stats(tiny_vit, images, batch_size=4, cls_only=cls_only,
                                                          progress=False, fused=False))
        block_of = block_of_documents(23, 5)
        alone = collect_stats(tiny_vit, images[block_of == 3], batch_size=4, cls_only=cls_only, progress=False,
                              fused=False)
        assert_stats_close(blocks.subset([3]).merged(), alone)
    budget = collect_block_stats(tiny_vit, images, 5, max_tokens=10, batch_size=4, progress=False, fused=False)
    assert budget.meta["documents"] == 10 and int(budget.n_documents.sum()) == 10


def test_bootstrap_stats_is_a_weighted_sum_of_blocks(tiny_llama):
    texts = random_texts(20, seed=3, min_len=2, max_len=20)
    blocks = collect_block_stats(tiny_llama, texts, 8, ctx=16, progress=False, fused=False)
    draw = np.random.default_rng(5).integers(0, 8, size=(1, 8))[0]
    w = torch.from_numpy(np.bincount(draw, minlength=8)).double()
    by_hand = (w[:, None, None] * blocks.sums[:, 1]).sum(0) / (w[:, None] * blocks.count).sum(0)[:, None]
    boot = bootstrap_stats(blocks, seed=5)
    torch.testing.assert_close(boot.mean_abs, by_hand)
    assert torch.equal(bootstrap_stats(blocks, seed=5).mean, boot.mean)
    assert not torch.equal(bootstrap_stats(blocks, seed=6).mean, boot.mean)
    many = list(blocks.resamples(bootstrap_weights(8, 20, 1), chunk=6))
    assert len(many) == 20 and torch.equal(many[0].mean, blocks.merged(bootstrap_weights(8, 20, 1)[0]).mean)


def test_block_stats_save_load(tiny_llama, tmp_path):
    blocks = collect_block_stats(tiny_llama, random_texts(9, seed=4), 3, ctx=16, progress=False, fused=False)
    blocks.save(tmp_path / "b.safetensors")
    back = BlockStats.load(tmp_path / "b.safetensors")
    assert torch.equal(back.sums, blocks.sums) and torch.equal(back.count, blocks.count)
    assert back.meta["documents"] == 9


def test_weights_are_checked(tiny_llama):
    blocks = collect_block_stats(tiny_llama, random_texts(6, seed=4), 3, ctx=16, progress=False, fused=False)
    with pytest.raises(ValueError, match="one per block"):
        blocks.merged([1, 1])
    with pytest.raises(ValueError, match="no tokens"):
        blocks.merged([0, 0, 0])


# -- per-document evaluation ---------------------------------------------------------------------------------
def test_per_document_evaluation_sums_to_the_totals(tiny_llama):
    texts = random_texts(9, seed=5, min_len=1, max_len=40)
    out = evaluate(tiny_llama, texts, ctx=16, batch_size=1, per_document=True)
    docs = out["documents"]
    assert int(docs["n"].sum()) == out["n"] and docs["top1"].sum() / docs["n"].sum() == pytest.approx(out["top1"])
    for k, text in enumerate(texts):
        if docs["n"][k]:
            alone = evaluate(tiny_llama, [text], ctx=16, batch_size=1)
            assert (docs["n"][k], docs["top1"][k]) == (alone["n"], round(alone["top1"] * alone["n"]))
    cut = evaluate(tiny_llama, texts, ctx=16, batch_size=1, max_tokens=40, per_document=True)["documents"]
    assert int(cut["n"].sum()) == evaluate(tiny_llama, texts, ctx=16, batch_size=1, max_tokens=40)["n"]


def test_per_image_evaluation(tiny_vit):
    images = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(30) % 10
    out = evaluate(tiny_vit, images, labels=labels, batch_size=7, per_document=True)
    docs = out["documents"]
    assert docs["top1"].mean() == pytest.approx(out["top1"]) and docs["labels"].tolist() == labels.tolist()
    assert docs["n"].tolist() == [1] * 30


# -- claims --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ci,null,p,direction,expected", [
    ((0.1, 0.3), 0.0, None, "greater", True),
    ((-0.1, 0.3), 0.0, None, "greater", False),
    ((-0.3, -0.1), 0.0, None, "greater", False),       # excludes the null, but on the wrong side
    ((-0.3, -0.1), 0.0, None, "less", True),
    ((-0.3, -0.1), 0.0, None, "two-sided", True),
    ((0.1, 0.3), 0.0, 0.01, "greater", True),
    ((0.1, 0.3), 0.0, 0.05, "greater", False),         # p must be below 0.05
    ((0.1, 0.3), 0.2, None, "greater", False),
    ((float("nan"), 0.3), 0.0, None, "greater", False),
])
def test_the_one_rule(ci, null, p, direction, expected):
    assert Claim("x", "s", 0.2, ci, null, p=p, direction=direction).supported is expected


def test_claim_checks_its_fields():
    with pytest.raises(ValueError, match="direction"):
        Claim("x", "s", 0.0, (0, 1), 0.0, direction="up")
    with pytest.raises(ValueError, match="lo > hi"):
        Claim("x", "s", 0.0, (1, 0), 0.0)
    with pytest.raises(ValueError, match="p must"):
        Claim("x", "s", 0.0, (0, 1), 0.0, p=1.5)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, 3*0.03, max(2*0.04, 0.09), max(0.5, 0.09)
    assert holm([0.01, 0.04, 0.03, 0.5]).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.6, 0.9]).tolist() == pytest.approx([1.0, 1.0])
    out = holm([0.02, float("nan"), 0.01])
    assert math.isnan(out[1]) and out[[0, 2]].tolist() == pytest.approx([0.02, 0.02])
    # Holm is never less conservative than BH
    p = np.random.default_rng(0).uniform(size=30) ** 3
    assert np.all(holm(p) >= benjamini_hochberg(p).numpy() - 1e-12)


def test_correct_adjusts_a_family():
    claims = [Claim("a", "s", 1, (0.5, 1.5), 0, p=0.02), Claim("b", "s", 1, (0.5, 1.5), 0),
              Claim("c", "s", 1, (0.5, 1.5), 0, p=0.03)]
    out = correct(claims, "holm", family="01_vit_pruning")
    assert [c.p_adjusted for c in out] == [pytest.approx(0.04), None, pytest.approx(0.04)]
    assert [c.p for c in out] == [0.02, None, 0.03]                 # the raw p is kept beside the adjusted one
    assert out[0].family == "01_vit_pruning" and out[0].family_size == 2 and out[1].family is None
    assert [c.supported for c in out] == [True, True, True]
    assert [c.supported for c in correct([Claim("a", "s", 1, (0.5, 1.5), 0, p=0.03)] * 2, "holm")] == [False, False]
    with pytest.raises(ValueError, match="holm"):
        correct(claims, "bonferroni")


def test_holm_within_a_family_by_hand_and_a_verdict_it_flips():
    # p 0.01, 0.04, 0.03: sorted 0.01 -> 3 x 0.01 = 0.03; 0.03 -> 2 x 0.03 = 0.06; 0.04 -> max(1 x 0.04, 0.06)
    claims = [Claim(k, "s", 1, (0.5, 1.5), 0, p=p) for k, p in (("a", 0.01), ("b", 0.04), ("c", 0.03))]
    assert all(c.supported for c in claims)                        # raw p < 0.05 each
    out = correct(claims, "holm", family="nb")
    assert [c.p_adjusted for c in out] == pytest.approx([0.03, 0.06, 0.06])
    assert [c.supported for c in out] == [True, False, False]      # raw p 0.04 and 0.03 < 0.05, adjusted 0.06
    # no null or bootstrap kept: SE from the interval's width, 1 / (2 × 1.95996); alpha 0.05 / 3, power 0.8
    detectable = (2.12805 + 0.841621) * 1 / (2 * 1.959964)
    assert [c.detectable for c in out[1:]] == pytest.approx([detectable] * 2, abs=1e-5)
    assert [c.verdict for c in out] == ["supported"] + [f"not supported; could have detected ≥ {detectable:.3g}"] * 2
    records = claims_to_json(out)
    assert [(r["p"], r["p_adjusted"], r["family"], r["family_size"]) for r in records] == \
        [(0.01, pytest.approx(0.03), "nb", 3), (0.04, pytest.approx(0.06), "nb", 3), (0.03, pytest.approx(0.06), "nb", 3)]
    table = claims_table(out).splitlines()
    assert table[0] == "| claim | estimate | 95% interval | null | p | adjusted p | verdict |"
    assert table[3] == ("| s (`b`) | 1 | [0.5, 1.5] | 0 | 0.04 | 0.06 (of 3) | "
                        "not supported; could have detected ≥ 0.758 |")


def test_a_claim_that_cannot_reach_significance_says_so():
    # 20 null values: p >= 1/21 = 0.048 alone, but Holm over 3 such claims can give no less than 3/21 = 0.14
    floor = dict(p_floor=1 / 21, floor_n="20 null values")
    claims = [Claim(k, "s", 1, (0.5, 1.5), 0, p=1 / 21, **floor) for k in "abc"]
    out = correct(claims, "holm", family="nb")
    assert all(c.p_reachable == pytest.approx(3 / 21) and not c.supported for c in out)
    assert out[0].verdict.startswith("cannot reach p < 0.05 with n = 20 null values in a family of 3 claims")
    alone = correct(claims[:1], "holm", family="nb")[0]
    assert alone.supported and alone.verdict == "supported"        # 1/21 < 0.05 when it is the only test
    # a test whose own floor is >= 0.05 (2 + 2 layers: 1/6) is no test: left out of the family, verdict says why
    layers = Claim("ends", "s", 1, (0.5, 1.5), 0, p=1 / 6, p_floor=1 / 6, floor_n="6 layers")
    out = correct([layers, Claim("x", "s", 1, (0.5, 1.5), 0, p=0.04, p_floor=0.001, floor_n="999 permutations")],
                  "holm", family="nb")
    assert out[0].verdict == "cannot be tested with 6 layers (smallest possible p 0.167)" and not out[0].supported
    assert out[1].family_size == 1 and out[1].p_adjusted == pytest.approx(0.04) and out[1].supported
    assert "cannot be tested with 6 layers" in claims_table(out)


def test_report_adjusts_its_notebooks_claims_in_one_place(tmp_path, capsys):
    from modsep_nb.report import Report
    report = Report("05_layerwise_correspondence", None, tmp_path, {"device": "cpu"})
    report.claim(Claim("a", "s", 1, (0.5, 1.5), 0, p=0.01), Claim("b", "s", 1, (0.5, 1.5), 0, p=0.04))
    report.claim(Claim("c", "s", 1, (0.5, 1.5), 0, p=0.03))         # recorded later, still in the family
    assert [c.p_adjusted for c in report.claims] == pytest.approx([0.03, 0.06, 0.06])
    assert [c.supported for c in report.adjusted(report.claims[1:2])] == [False]
    report.print_claims()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and "p 0.04 (adjusted 0.06 of 3)  not supported" in printed[1]
    saved = json.loads(report.save({}).read_text())
    assert [(c["p"], c["p_adjusted"], c["supported"]) for c in saved["claims"]] == \
        [(0.01, pytest.approx(0.03), True), (0.04, pytest.approx(0.06), False), (0.03, pytest.approx(0.06), False)]
    report.findings("05", "text")
    findings = (tmp_path / "findings" / "05_layerwise_correspondence.md").read_text()
    assert "| 0.04 | 0.06 (of 3) | not supported; could have detected ≥ 0.758 |" in findings


def test_claims_table_and_json():
    claims = [Claim("selectivity", "pruning hurts its own task most", 0.25, (0.1, 0.4), 0.0, p=0.004, n=64,
                    correction="holm"),
              Claim("overlap_above_null", "tasks share neurons", float("nan"), (float("nan"), 0.1), 0.0)]
    table = claims_table(claims).splitlines()
    assert table[0] == "| claim | estimate | 95% interval | null | p | adjusted p | verdict |"
    assert table[2] == ("| pruning hurts its own task most (`selectivity`) | 0.25 | [0.1, 0.4] | 0 | 0.004 (holm) "
                        "| – | supported |")
    assert table[3].endswith("| n/a | [n/a, 0.1] | 0 | – | – | not supported (undefined) |")
    records = json.loads(json.dumps(claims_to_json(claims)))
    assert set(records[0]) >= {"id", "statement", "estimate", "ci", "null", "p", "n", "supported"}
    assert records[0]["supported"] is True and records[1]["estimate"] is None and records[1]["p"] is None


# -- intervals and nulls ---------------------------------------------------------------------------------------
def test_ratio_of_sums_by_hand():
    num, den = np.array([3, 0, 5, 2, 1, 4, 2, 3]), np.array([4, 2, 5, 4, 2, 4, 3, 3])
    out = ratio_of_sums(num, den, 50, seed=7)
    w = bootstrap_weights(8, 50, 7).numpy()
    assert out["estimate"] == pytest.approx(20 / 27)
    np.testing.assert_allclose(out["samples"], (w @ num) / (w @ den))
    assert out["ci"] == pytest.approx(tuple(np.percentile(out["samples"], [2.5, 97.5])))


def test_too_few_documents_are_flagged():
    with pytest.warns(RuntimeWarning, match="rests on 2 documents"):
        ratio_of_sums([1, 2], [3, 3], 20, seed=0)
    base = {"a": np.ones(3), "b": np.ones(12)}
    with pytest.warns(RuntimeWarning, match="task 'a' rests on 3 evaluation documents"):
        cross_task_bootstrap(base, {"a": dict(base), "b": dict(base)}, 20, seed=0)


def test_cross_task_bootstrap_by_hand():
    rng = np.random.default_rng(0)
    tasks = ["a", "b", "c"]
    base = {t: rng.integers(0, 10, size=8 + k) for k, t in enumerate(tasks)}
    pruned = {a: {b: np.minimum(base[b], rng.integers(0, 10, size=len(base[b]))) for b in tasks} for a in tasks}
    out = cross_task_bootstrap(base, pruned, 40, seed=3)
    expected = np.array([[pruned[a][b].sum() / base[b].sum() for b in tasks] for a in tasks])
    np.testing.assert_allclose(out["matrix"], expected)
    assert out["selectivity"] == pytest.approx(np.mean([(expected[i].sum() - expected[i, i]) / 2 - expected[i, i]
                                                        for i in range(3)]))
    seeds = child_seeds(3, 3)
    w_b = bootstrap_weights(len(base["b"]), 40, seeds[1]).numpy()     # every row uses b's one draw
    np.testing.assert_allclose(out["samples"][:, 2, 1], (w_b @ pruned["c"]["b"]) / (w_b @ base["b"]))
    np.testing.assert_allclose(out["selectivity_samples"], selectivity(out["samples"]))
    same = cross_task_bootstrap(base, {a: dict(base) for a in tasks}, 40, seed=3)
    assert same["selectivity"] == 0 and same["selectivity_ci"] == (0.0, 0.0)


def test_selectivity_per_task_when_one_task_carries_the_mean():
    # issue #26 item 2: pruning task 0's neurons costs it 90% of its hits and spares the rest; every other task's
    # neurons (and every random set) cost nothing. The mean over tasks is selective; the typical task is not.
    rng = np.random.default_rng(1)
    tasks = [f"t{i}" for i in range(5)]
    base = {t: rng.integers(5, 11, size=30) for t in tasks}
    untouched = {a: dict(base) for a in tasks}
    carried = {a: dict(base) for a in tasks}
    carried["t0"]["t0"] = base["t0"] // 10
    selected, random = cross_task_bootstrap(base, carried, 200, 4), cross_task_bootstrap(base, untouched, 200, 4)
    mean = excess_claim("selectivity", "s", selected["selectivity"] - random["selectivity"],
                        selected["selectivity_samples"] - random["selectivity_samples"])
    claim = selectivity_per_task(selected, random)
    own = (base["t0"] // 10).sum() / base["t0"].sum()
    expected = {t: 0.0 for t in tasks} | {"t0": 1 - own}                  # others' (1) minus own, random: 0
    assert {t: r["estimate"] for t, r in claim.per_task.items()} == pytest.approx(expected)
    assert np.mean(list(expected.values())) == pytest.approx(mean.estimate)     # the mean claim's estimate
    assert mean.supported and not claim.supported and claim.estimate == 0.0
    # t0: no resample at or below 0, p = 1/201, Holm over 5 tasks 5/201; the others sit at 0 in every resample
    t0 = claim.per_task["t0"]
    assert t0["p"] == pytest.approx(1 / 201) and t0["p_holm"] == pytest.approx(5 / 201)
    assert [r["selective"] for r in claim.per_task.values()] == [True, False, False, False, False]
    assert all(claim.per_task[t]["p"] == 1.0 for t in tasks[1:])
    assert "1 of 5 tasks selective" in claim.statement and claim.n == 150 and claim.unit == "evaluation documents"
    json_record = claims_to_json([claim])[0]
    assert json_record["per_task"]["t0"]["selective"] is True          # in the claims record
    # every task hurt by its own neurons only: the median task is selective, and so is each one
    everywhere = {a: dict(base) | {a: base[a] // 10} for a in tasks}
    typical = selectivity_per_task(cross_task_bootstrap(base, everywhere, 200, 4), random)
    assert typical.supported and all(r["selective"] for r in typical.per_task.values())
    assert "5 of 5 tasks selective" in typical.statement


def test_cross_task_bootstrap_resample_without_unpruned_hits_is_undefined_not_infinite():
    # a model near chance (06's first checkpoints): a task whose documents rarely have a hit, so some resamples
    # hold none; its relative accuracy there is undefined (NaN, left out of the interval), never inf
    base = {"a": np.array([1] + [0] * 9), "b": np.arange(10) % 3}
    pruned = {"a": {"a": np.zeros(10, int), "b": np.ones(10, int)}, "b": {"a": base["a"].copy(), "b": np.zeros(10, int)}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no "invalid value" warning from inf - inf in the percentiles
        out = cross_task_bootstrap(base, pruned, 200, seed=0)
    w = bootstrap_weights(10, 200, child_seeds(0, 2)[0]).numpy()
    empty = (w @ base["a"]) == 0
    assert empty.any() and not empty.all()
    assert np.isnan(out["samples"][empty, :, 0]).all() and np.isfinite(out["samples"][~empty, :, 0]).all()
    assert not np.isinf(out["samples"]).any() and np.isfinite(out["ci"]).all()
    no_hits = cross_task_bootstrap({"a": np.zeros(10, int), "b": base["b"]}, pruned, 20, seed=0)
    assert np.isnan(no_hits["matrix"][:, 0]).all() and np.isfinite(no_hits["matrix"][:, 1]).all()


def test_pseudo_tasks_are_disjoint_random_parts():
    docs = [f"doc{k}" for k in range(20)]
    parts = pseudo_tasks(docs, [5, 5, 6], seed=1)
    assert [len(p) for p in parts] == [5, 5, 6]
    assert len(set(itertools.chain(*parts))) == 16
    assert parts == pseudo_tasks(docs, [5, 5, 6], seed=1) and parts != pseudo_tasks(docs, [5, 5, 6], seed=2)
    images = torch.arange(20.0)[:, None]
    assert [len(p) for p in pseudo_tasks(images, [3, 4], seed=0)] == [3, 4]
    with pytest.raises(ValueError, match="collect more"):
        pseudo_tasks(docs, [10, 11], seed=0)


def test_pseudo_tasks_of_blocks(tiny_llama):
    blocks = collect_block_stats(tiny_llama, random_texts(12, seed=6), 6, ctx=16, progress=False, fused=False)
    parts = pseudo_tasks(blocks, [2, 3], seed=0)
    assert [p.n_blocks for p in parts] == [2, 3]
    assert torch.equal(parts[0].count.sum(0) + parts[1].count.sum(0) <= blocks.count.sum(0),
                       torch.ones(blocks.count.shape[1], dtype=torch.bool))


def test_layer_matched_chance_by_hand():
    a = torch.zeros(2, 10, dtype=torch.bool)
    b = torch.zeros(2, 10, dtype=torch.bool)
    a[0, :4], a[1, :1] = True, True          # 4 + 1
    b[0, :1], b[1, :4] = True, True          # 1 + 4
    # E|A∩B| = (4*1 + 1*4) / 10 = 0.8; min(|A|, |B|) = 5
    assert layer_matched_chance({"a": a, "b": b}) == pytest.approx(0.16)
    rng = np.random.default_rng(0)          # against random sets with the same per-layer counts
    sims = [sum(len(set(rng.choice(10, 4, replace=False)) & set(rng.choice(10, 1, replace=False))) for _ in range(2))
            for _ in range(20000)]
    assert np.mean(sims) / 5 == pytest.approx(0.16, abs=0.005)


def test_excess_claim_by_hand():
    null = np.array([0.1, 0.2, 0.3, 0.5])
    claim = excess_claim("x", "s", 0.4, np.full(100, 0.4), null, n=6)
    assert claim.estimate == pytest.approx(0.4 - 0.275)
    assert claim.p == pytest.approx((1 + 1) / (1 + 4))       # one null value >= 0.4
    boot = np.linspace(-0.1, 0.9, 201)
    claim = excess_claim("x", "s", 0.4, boot, None)
    assert claim.null == 0 and claim.p == pytest.approx((1 + np.sum(boot <= 0)) / 202)
    assert claim.ci == pytest.approx((-0.075, 0.875))
    assert claim.p_floor == pytest.approx(1 / 202) and claim.floor_n == "201 bootstrap resamples"


def test_excess_claim_keeps_the_estimates_interval_and_the_null_band_apart():
    # issue #26 item 5: the statistic's own bootstrap interval and the null's band, each by hand
    boot = np.linspace(0.30, 0.50, 201)               # percentiles 2.5 / 97.5: 0.305, 0.495
    null = np.linspace(0.0, 0.2, 41)                  # 0.005, 0.195
    claim = excess_claim("overlap_above_null", "s", 0.4, boot, null, n=6)
    assert claim.observed == 0.4 and claim.observed_ci == pytest.approx((0.305, 0.495))
    assert claim.null_band == pytest.approx((0.005, 0.195))
    assert claim.p_floor == pytest.approx(1 / 42) and claim.floor_n == "41 null values"
    record = claims_to_json([claim])[0]
    assert record["observed_ci"] == pytest.approx([0.305, 0.495]) and record["null_band"] == pytest.approx([0.005, 0.195])
    assert "statistic 0.4 [0.305, 0.495], null 95% band [0.005, 0.195]" in claims_table([claim])


# -- tests of comparisons --------------------------------------------------------------------------------------------
def _grouped_matrix(groups):
    names = [t for g in groups.values() for t in g]
    n = len(names)
    m = np.full((n, n), 0.1)
    for g in groups.values():
        for x in g:
            for y in g:
                m[names.index(x), names.index(y)] = 0.5
    np.fill_diagonal(m, 1.0)
    return m, names


def test_permutation_p_matches_the_exact_share_of_relabellings():
    # 2 groups of 3 tasks: of the 6!/(3!3!) = 20 label arrangements, 2 give the observed grouping
    groups = {"g1": ["a", "b", "c"], "g2": ["d", "e", "f"]}
    matrix, names = _grouped_matrix(groups)
    out = permutation_related_vs_unrelated(matrix, names, groups, n_perm=4000, seed=0)
    assert out["difference"] == pytest.approx(0.4) and out["n_within"] == 6 and out["n_across"] == 9
    assert out["p"] == pytest.approx(2 / 20, abs=0.015)
    # 3 groups of 3: 9!/(3!)^3 = 1680 arrangements, 3! = 6 give the grouping
    groups = {"g1": list("abc"), "g2": list("def"), "g3": list("ghi")}
    matrix, names = _grouped_matrix(groups)
    out = permutation_related_vs_unrelated(matrix, names, groups, n_perm=4000, seed=0)
    assert out["p"] < 0.01
    again = permutation_related_vs_unrelated(matrix, names, groups, n_perm=4000, seed=0)
    assert again["p"] == out["p"] and np.array_equal(again["null"], out["null"])
    # the floor: 1/(1 + n_perm), or 1/(distinct groupings) where fewer: 1680 / 3! = 280 for three equal groups
    assert out["p_floor"] == pytest.approx(1 / 280) and out["floor_n"] == "9 grouped tasks (280 distinct groupings)"
    assert permutation_related_vs_unrelated(matrix, names, groups, n_perm=100, seed=0)["p_floor"] == pytest.approx(1 / 101)
    halves = {"g1": list("abcd"), "g2": list("efgh")}
    two = permutation_related_vs_unrelated(*_grouped_matrix(halves), halves, n_perm=1000, seed=0)
    assert two["p_floor"] == pytest.approx(1 / 35) and two["floor_n"] == "8 grouped tasks (35 distinct groupings)"


def test_related_claim_interval_is_the_differences_own_bootstrap():
    # issue #26 item 5: a bootstrap of the within - across difference (here 4 resampled matrices by hand),
    # shifted by the permutation null's mean, and the null's band reported apart
    from modsep_nb.evidence import related_claim
    groups = {"g1": list("abc"), "g2": list("def")}
    matrix, names = _grouped_matrix(groups)
    masks = {t: torch.zeros(1, 8, dtype=torch.bool) for t in names}
    for k, t in enumerate(names):                     # a neuron of its own, and one its group shares
        masks[t][0, [k, 6 + (k >= 3)]] = True
    observed = overlap_matrix(masks)[1]               # 0.5 within a group, 0 across
    scaled = [observed * a + (1 - a) * np.eye(6) for a in (0.5, 0.8, 1.0, 1.0)]
    evidence = {"names": names, "masks": masks, "boot": {"matrices": np.stack(scaled)}}
    related, claim = related_claim(evidence, groups, n_perm=500, seed=0)
    within = [(i, j) for i in range(6) for j in range(i + 1, 6) if (i < 3) == (j < 3)]
    diff = lambda m: np.mean([m[i, j] for i, j in within]) - m[:3, 3:].mean()      # noqa: E731
    boot = np.array([diff(m) for m in scaled])
    assert related["boot"] == pytest.approx(boot) and claim.observed == pytest.approx(diff(observed))
    assert claim.observed_ci == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    shift = related["null"].mean()
    assert claim.estimate == pytest.approx(diff(observed) - shift)
    assert claim.ci == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5]) - shift))
    assert claim.null_band == pytest.approx(tuple(np.percentile(related["null"], [2.5, 97.5])))
    assert claim.p == related["p"] and claim.p_floor == pytest.approx(1 / 10)        # 20 / 2 groupings


def test_permutation_of_unstructured_tasks_is_not_significant():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(9, 9))
    matrix = (x + x.T) / 2
    groups = {"g1": list("abc"), "g2": list("def"), "g3": list("ghi")}
    out = permutation_related_vs_unrelated(matrix, list("abcdefghi"), groups, n_perm=1000, seed=0)
    assert out["p"] > 0.05


def test_paired_difference_exact_sign_flip():
    out = paired_difference_ci([2, 3, 4], [1, 1, 1], 200, seed=0)
    assert out["estimate"] == pytest.approx(2.0) and out["n"] == 3
    assert out["p"] == pytest.approx(1 / 8)               # only all-plus reaches the mean 2
    out = paired_difference_ci([1, -2, 3, float("nan")], [0, 0, 0, 0], 200, seed=0)
    assert out["n"] == 3
    # flipped means >= 2/3 of (1, -2, 3): sign patterns (+-+): 2/3... count by hand over the 8 patterns
    flips = [np.mean(np.array(s) * [1, -2, 3]) for s in itertools.product((1, -1), repeat=3)]
    assert out["p"] == pytest.approx(np.mean(np.array(flips) >= 2 / 3 - 1e-12))
    two = paired_difference_ci([2, 3, 4], [1, 1, 1], 200, seed=0, alternative="two-sided")
    assert two["p"] == pytest.approx(2 / 8)
    lo, hi = paired_difference_ci([2, 3, 4], [1, 1, 1], 500, seed=0)["ci"]
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_difference_ci([1], [0], 10, seed=0)


def test_combine_seeds_reports_every_seed():
    results = [{"rho": 0.5, "p_value": 0.01}, {"rho": 0.1, "p_value": 0.4}, {"rho": 0.3, "p_value": 0.02}]
    out = combine_seeds(results, 200, seed=0)
    assert out["rho"] == [0.5, 0.1, 0.3] and out["median_rho"] == 0.3
    assert out["p_holm"] == pytest.approx([0.03, 0.4, 0.04])
    assert out["p_combined"] == pytest.approx(0.4)          # not the best seed's 0.01
    assert 0.1 <= out["ci"][0] <= out["ci"][1] <= 0.5


def test_evidence_params():
    params = load_params(overrides={"evidence": {"n_boot": 300}})
    assert params["evidence"]["n_boot"] == 300 and params["evidence"]["n_blocks"] == 32
    with pytest.raises(ParamsError, match="evidence.n_null"):
        load_params(overrides={"evidence": {"n_null": 5}})
    with pytest.raises(ParamsError, match="n_null_ablation"):
        load_params(overrides={"evidence": {"n_null": 30, "n_null_ablation": 40}})


# -- ground truth ---------------------------------------------------------------------------------------------
N_TASKS, PER_TASK, K_SHARED, D_MLP, D_MODEL = 4, 8, 4, 256, 64
TASK_WORDS = [WORDS[t * PER_TASK:(t + 1) * PER_TASK] for t in range(N_TASKS)]
BIAS_DIM = 63                   # an embedding dimension no token id uses: a constant input every neuron sees
FRAC = 0.04                     # 20 of 512 neurons: a task's 8 dedicated + 3 × 4 pair-shared


@pytest.fixture(scope="module")
def planted_tasks(tmp_path_factory):
    """A 2-layer Llama in which every task (8 words, each followed by the next in a cycle) has dedicated
    neurons and every pair of tasks shares K_SHARED neurons.

    Embeddings are one-hot (plus a constant BIAS_DIM component), attention is off, lm_head is the identity.
    Layer 0 holds one key-value neuron per task word: it fires on that word only and writes the next word's
    logit, so ablating a task's dedicated neurons breaks that task's predictions and no other's. Pair-shared
    neurons fire on the words of two tasks and write nothing. Every other neuron reads mostly the constant
    input (so is active everywhere, with little task preference) and writes nothing."""
    model = one_hot_llama(D_MODEL, D_MLP, BIAS_DIM, identity_head=True)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        rows = iter(range(D_MLP))
        for words in TASK_WORDS:
            for k, word in enumerate(words):
                n = next(rows)
                for proj in (mlp.gate_proj, mlp.up_proj):
                    proj.weight[n] = 0.0
                    proj.weight[n, VOCAB[word]] = 0.5
                mlp.down_proj.weight[VOCAB[words[(k + 1) % PER_TASK]], n] = 1.0
        for a, b in itertools.combinations(range(N_TASKS), 2):
            for _ in range(K_SHARED):
                n = next(rows)
                for proj in (mlp.gate_proj, mlp.up_proj):
                    proj.weight[n] = 0.0
                    proj.weight[n, [VOCAB[w] for w in TASK_WORDS[a] + TASK_WORDS[b]]] = 0.5
    directory = tmp_path_factory.mktemp("planted_tasks")
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return load_model(directory)


def _cycles(words, n, rng):
    """n documents of `words` in cycle order from a random start, 5-25 words long."""
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words)), rng.randint(5, 25)
        out.append(" ".join(words[(start + i) % len(words)] for i in range(length)))
    return out


def _mixture(n, rng):
    return [_cycles(TASK_WORDS[rng.randrange(N_TASKS)], 1, rng)[0] for _ in range(n)]


def _claims(handle, planted: bool, seed: int, *, n_docs=64, n_eval=16, n_blocks=32, n_boot=200, n_null=200):
    """The pipeline of notebooks 01/02 at the default evidence settings: block statistics, selections, the
    overlap against pseudo-tasks of one domain, the cross-task ablation and its bootstrap over documents."""
    rng = random.Random(seed)
    if planted:   # real tasks; the null domain is task 0's documents
        stats = {f"t{t}": _cycles(TASK_WORDS[t], n_docs, rng) for t in range(N_TASKS)}
        evals = {f"t{t}": _cycles(TASK_WORDS[t], n_eval, rng) for t in range(N_TASKS)}
        null_docs = _cycles(TASK_WORDS[0], N_TASKS * n_docs, rng)
    else:         # "tasks" that are random parts of one corpus; the null domain is more of that corpus
        stats = {f"t{t}": _mixture(n_docs, rng) for t in range(N_TASKS)}
        evals = {f"t{t}": _mixture(n_eval, rng) for t in range(N_TASKS)}
        null_docs = _mixture(N_TASKS * n_docs, rng)
    kw = dict(ctx=32, batch_size=64, progress=False, fused=False)
    blocks = {t: collect_block_stats(handle, docs, n_blocks, **kw) for t, docs in stats.items()}
    domain = collect_block_stats(handle, null_docs, N_TASKS * n_blocks, **kw)
    overlap = overlap_evidence(blocks, domain, frac=FRAC, n_boot=n_boot, n_null=n_null, seed=seed)

    def hits(task):
        return evaluate(handle, evals[task], ctx=32, batch_size=64, per_document=True)["documents"]["top1"]
    base = {t: hits(t) for t in evals}
    pruned = {}
    for a in evals:
        with ablate(handle, overlap["masks"][a]):
            pruned[a] = {b: hits(b) for b in evals}
    cross = cross_task_bootstrap(base, pruned, n_boot, seed)
    return overlap["claim"], selectivity_claim(cross, seed=seed), overlap


def test_planted_model_works_as_designed(planted_tasks):
    overlap_claim, selectivity, overlap = _claims(planted_tasks, True, seed=0)
    for k, mask in enumerate(overlap["masks"].values()):          # each task selects its 8 dedicated neurons
        assert mask[0, k * PER_TASK:(k + 1) * PER_TASK].all()
    assert selectivity.estimate == pytest.approx(1.0)             # own accuracy 0, others untouched
    assert overlap["median"] > overlap["null_band"][1] > 0 and overlap["uniform_chance"] == pytest.approx(20 / 512)


@pytest.mark.parametrize("planted", [True, False], ids=["planted", "random-parts"])
def test_ground_truth_over_20_seeds(planted_tasks, planted):
    """Planted dedicated and shared neurons: both claims supported in at least 18 of 20 seeds; random parts of
    one corpus: neither supported in at least 18 of 20 (the claims' false-positive rate)."""
    results = [_claims(planted_tasks, planted, seed) for seed in range(20)]
    for which in (0, 1):
        supported = sum(r[which].supported for r in results)
        assert (supported >= 18) if planted else (supported <= 2), (which, supported)


def test_pseudo_cross_task_null(planted_tasks):
    """The selectivity of pseudo-tasks of one domain: 0 exactly when nothing is ablated, by hand for one
    replicate, and near 0 on average (their evaluation documents are exchangeable)."""
    from modsep_nb.evidence import _partition, pseudo_cross_task
    rng = random.Random(0)
    domain = collect_block_stats(planted_tasks, _cycles(TASK_WORDS[0], 128, rng), 64, ctx=32, progress=False,
                                 fused=False)
    evals = _cycles(TASK_WORDS[0], 64, rng)

    def hits():
        return evaluate(planted_tasks, evals, ctx=32, batch_size=64, per_document=True)["documents"]["top1"]
    null = pseudo_task_null(domain, [16] * 4, 20, seed=1, keep_masks=True, frac=FRAC)
    values = pseudo_cross_task(planted_tasks, null["masks"], hits, 64, seed=2)
    assert values.shape == (20,) and abs(values.mean()) < 0.1
    masks, child = null["masks"][3], child_seeds(2, 20)[3]
    parts, base = _partition(64, [16] * 4, child), hits()
    matrix = np.empty((4, 4))
    for i, mask in enumerate(masks.values()):
        with ablate(planted_tasks, mask):
            h = hits()
        matrix[i] = [h[p].sum() / base[p].sum() for p in parts]
    assert values[3] == pytest.approx(selectivity(matrix))
    nothing = [{t: torch.zeros_like(m) for t, m in masks.items()}]
    assert pseudo_cross_task(planted_tasks, nothing, hits, 64, seed=0).tolist() == [0.0]


def test_activation_control_mask(tiny_llama):
    from modsep_nb.evidence import activation_control_mask
    from modsep_nb import select_neurons
    a = collect_stats(tiny_llama, random_texts(5, seed=1), ctx=16, progress=False, fused=False)
    b = collect_stats(tiny_llama, random_texts(5, seed=2), ctx=16, progress=False, fused=False)
    mask = activation_control_mask([a, b], 0.25)
    assert torch.equal(mask, select_neurons((a.mean_abs + b.mean_abs) / 2, 0.25, "per_layer"))
    assert mask.sum(1).tolist() == [6] * tiny_llama.n_layers


# -- the study seam ----------------------------------------------------------------------------------------------
def test_study_block_stats_null_domain_and_document_hits(tmp_path, llama_dir):
    from modsep_nb.study import Study
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law", "licenses"],
                                       "stats_tokens": 200, "eval_tokens": 60, "ctx": 16, "batch_size": 4},
                                "evidence": {"n_blocks": 4}})
    study = Study.from_params(params, "lm")
    blocks = study.block_stats(progress=False)
    stats = study.stats(progress=False)
    for t in study.task_names:
        assert_stats_close(blocks[t].merged(), stats[t], rtol=1e-5, atol=1e-6)
        assert blocks[t].n_blocks == min(4, blocks[t].meta["documents"])
    again = Study.from_params(params, "lm").block_stats(progress=False)       # from the cache
    assert torch.equal(again["law"].sums, blocks["law"].sums)
    null = study.null_block_stats(progress=False)
    largest = max(study.task_names, key=lambda t: len(study.tasks[t].collect))     # the most documents
    assert null.meta["task"] == largest and null.meta["max_tokens"] == 3 * 200      # all tasks' budget
    hits = study.document_hits()
    accuracy = study.evaluate_tasks()
    for t in study.task_names:
        assert hits[t]["top1"].sum() / hits[t]["n"].sum() == pytest.approx(accuracy[t])


def test_image_study_document_hits(tmp_path):
    from conftest import save_hf_vit
    from modsep_nb.study import Study
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=28, patch_size=7)
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "vit": {"model": str(vit_dir), "tasks": "groups", "stats_images": 12,
                                        "eval_images": 150, "batch_size": 64}, "evidence": {"n_blocks": 5}})
    study = Study.from_params(params, "vit")
    hits, accuracy = study.document_hits(), study.evaluate_tasks()
    for t in study.task_names:
        assert hits[t]["top1"].mean() == pytest.approx(accuracy[t])
    assert sum(len(h["n"]) for h in hits.values()) <= 150
    blocks = study.block_stats(progress=False)
    assert_stats_close(blocks["tops"].merged(), study.stats(progress=False)["tops"], rtol=1e-5, atol=1e-6)


def test_null_sizes_fit_the_null_domain():
    from modsep_nb.evidence import null_sizes
    assert null_sizes([3, 4], 10) == [3, 4]
    with pytest.warns(RuntimeWarning, match="scaled"):
        scaled = null_sizes([17, 17, 10, 32, 32, 32, 27, 32], 118)
    assert sum(scaled) <= 118 and all(s >= 1 for s in scaled) and scaled[2] < scaled[0] < scaled[3]
    with pytest.raises(ValueError, match="larger domain"):
        null_sizes([1, 1, 1], 2)


def test_default_budgets_let_every_claim_reach_significance_after_holm():
    """Issue #26 item 4: each test's p floor times its notebook's family size is below 0.05 at the defaults."""
    from modsep_nb.params import DEFAULTS
    ev, ri = DEFAULTS["evidence"], DEFAULTS["random_init"]
    floors = {  # notebook: [(family size, floor of its coarsest test)]
        # 01: selectivity, selectivity_per_task, overlap_above_null, related_share_more
        "01": [(4, 1 / (1 + ev["n_null_ablation"])), (4, 1 / (1 + ev["n_boot"])), (4, 1 / (1 + ev["n_perm"]))],
        # 02: the same four, and related_share_more on each of the two released 7B score sets
        "02": [(6, 1 / (1 + ev["n_boot"])), (6, 1 / (1 + ev["n_null"])), (6, 1 / (1 + ev["n_perm"]))],
        "03": [(4, 1 / (1 + ev["n_boot"]))],                                       # 2 methods x 2 models
        "04": [(4, 2 / (1 + ev["n_boot"])), (4, len(ri["seeds"]) / (1 + ri["n_perm"]))],   # two-sided; Holm of seeds
    }
    for notebook, tests in floors.items():
        for m, floor in tests:
            assert m * floor < 0.05, (notebook, m, floor)


# -- issue #26 item 7 and power: insufficient data, and what a "not supported" could have detected ------------------
def test_detectable_from_a_null_and_from_a_bootstrap_by_hand():
    from modsep_nb.claims import claim_line
    null = np.arange(200) / 100                       # 0.00 .. 1.99, mean 0.995
    boot = np.full(200, 0.5)
    c = excess_claim("a", "s", 0.3, boot, null, n=40, unit="documents")
    # family of one: the 0.95 quantile, numpy's linear rule: position 199 × 0.95 = 189.05 -> 1.89 + 0.05 × 0.01
    assert c.detectable == pytest.approx(1.8905 - 0.995)
    assert c.detectable_method == "null's 0.95 quantile minus its mean" and c.test == "rank among null values"
    family = correct([c, replace(c, id="b"), replace(c, id="c"), replace(c, id="d")])   # alpha 0.05 / 4: q 0.9875
    assert family[0].detectable == pytest.approx(1.965125 - 0.995)     # 199 × 0.9875 = 196.5125 -> 1.965125
    assert family[0].verdict == f"not supported; could have detected ≥ {1.965125 - 0.995:.3g}"
    boot = np.array([-1.0, 1.0] * 100)                # SE = sqrt(200 / 199) (ddof 1)
    c = excess_claim("b", "s", 0.0, boot, None, n=40)
    assert c.boot_se == pytest.approx(math.sqrt(200 / 199))
    assert c.detectable == pytest.approx((1.6448536 + 0.8416212) * math.sqrt(200 / 199))
    record = c.as_dict()
    assert record["detectable"] == pytest.approx(c.detectable) and "bootstrap SE" in record["detectable_method"]
    assert record["test"] == "one-sided bootstrap p" and "(one-sided bootstrap p)" in claim_line(c)
    assert c.verdict.startswith("not supported; could have detected ≥ 2.4")


@pytest.mark.parametrize("with_null", [False, True])
def test_planted_effect_of_twice_detectable_is_supported_a_quarter_is_not(with_null):
    from statistics import NormalDist
    grid = np.array([NormalDist().inv_cdf((k + 0.5) / 2000) for k in range(2000)])     # exact normal quantiles
    se = 0.01
    null = grid * se if with_null else None

    def claim(effect):
        return excess_claim("e", "s", effect, effect + se / 4 * grid if with_null else effect + se * grid, null,
                            n=100, unit="documents", seed=1)
    d = claim(0.0).detectable
    expected = (NormalDist().inv_cdf(0.95) - (0 if with_null else -NormalDist().inv_cdf(0.8))) * se
    assert d == pytest.approx(expected, rel=0.01)
    assert claim(2 * d).supported and not claim(0.25 * d).supported
    assert claim(0.25 * d).verdict.startswith("not supported; could have detected")


def test_a_null_without_spread_bounds_nothing_the_interval_decides_what_was_detectable():
    boot = np.array([-1.0, 1.0] * 100)
    c = excess_claim("flat", "s", 0.0, boot, np.zeros(80), n=40, unit="documents")
    # the null's quantile minus its mean is 0: no effect is "detectable from >= 0"; the interval (SE) bounds it
    assert c.detectable_method.endswith("SE from the 95% interval's width")
    lo, hi = c.ci
    assert c.detectable == pytest.approx((1.6448536 + 0.8416212) * (hi - lo) / (2 * 1.959964), rel=1e-6)
    assert c.detectable > 0 and "≥ 0 " not in c.verdict + " "
    still = excess_claim("flat", "s", 0.0, np.zeros(50), np.zeros(80), n=40, unit="documents")
    assert still.detectable is None and still.verdict == "not supported"


def test_fewer_than_20_units_is_insufficient_data_not_a_verdict():
    strong = dict(estimate=1.0, ci=(0.5, 1.5), null=0.0, p=0.001)
    few = Claim("few", "s", **strong, n=12, unit="documents", test="one-sided bootstrap p", bootstrap=True)
    assert not few.supported and few.verdict == "insufficient data (n = 12 documents < 20)"
    assert Claim("enough", "s", **strong, n=20, unit="documents", bootstrap=True).supported
    # the record's field decides, not the words of its test's name
    assert Claim("named", "s", **strong, n=12, unit="documents", test="bootstrap-free sign flips").supported
    assert excess_claim("e", "s", 1.0, np.full(50, 1.0), None, n=12, unit="documents").insufficient
    # an exact test over few units is valid (its p-floor says what it can reach): only bootstraps need 20 units
    assert Claim("exact", "s", **strong, n=8, unit="grouped tasks", test="permutation of group labels").supported
    assert Claim("unaudited", "s", **strong, n=12).supported          # no unit: its builder's n is not judged
    out = correct([few, Claim("b", "s", **strong, n=30), Claim("c", "s", **{**strong, "p": 0.02}, n=30)])
    assert out[0].family_size == 1 and [c.family_size for c in out[1:]] == [2, 2]     # left out of the family
    assert out[2].p_adjusted == pytest.approx(0.02) and out[0].as_dict()["unit"] == "documents"
    assert out[0].as_dict()["detectable"] is not None        # beside "insufficient data", what it could see


def test_findings_name_the_ablations_that_drop_every_other_task():
    from types import SimpleNamespace
    from modsep_nb.selective import _every_other_below
    matrix = np.array([[0.5, 0.9, 0.95], [0.3, 0.6, 0.45], [0.9, 0.2, 0.1]])   # b's row: every other below 0.5
    text = _every_other_below(SimpleNamespace(matrix=matrix, tasks=["a", "b", "c"]), "domain", "top-1")
    assert text == ("  Pruning the neurons of b leaves every other domain below 0.50 of its unpruned top-1 "
                    "(0.30–0.45).\n")
    assert _every_other_below(SimpleNamespace(matrix=np.eye(3) * 0.1 + 0.6, tasks=["a", "b", "c"]), "d", "m") == ""


# -- issue #26 item 6: pseudo-tasks matched in tokens and documents, the null pooled over several domains -----------
def _toy_blocks(tokens, documents, seed: int, spread: float = 1.0, layers: int = 2, d: int = 16) -> BlockStats:
    """Blocks with the given tokens and documents each, activations drawn at random (`spread` their size)."""
    count = torch.tensor(tokens, dtype=torch.float64)[:, None].repeat(1, layers)
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(len(tokens), layers, d)) * spread)
    sums = torch.stack([x, x.abs(), x ** 2, (x > 0).double(), x.abs().sqrt()], 1) * count[:, None, :, None]
    return BlockStats(count, sums, torch.tensor(documents, dtype=torch.long))


def test_pseudo_tasks_match_the_tasks_tokens_and_documents():
    from modsep_nb.evidence import _matched_partition, matched_sizes
    # task a: 3 documents of 100 tokens; task b: 30 documents of 10 tokens; the same 300 tokens each
    tasks = {"a": _toy_blocks([100] * 3, [1] * 3, 0), "b": _toy_blocks([100] * 3, [10] * 3, 1)}
    domain = _toy_blocks([100] * 24, [1, 10] * 12, 2)      # blocks of long documents and of short ones, mixed
    assert matched_sizes(tasks, domain) == [(300.0, 3), (300.0, 30)]
    counts = domain.count[:, 0].numpy()
    for seed in range(5):
        parts = _matched_partition(domain, matched_sizes(tasks, domain), seed)
        assert [(counts[p].sum(), int(domain.n_documents[p].sum())) for p in parts] == [(300.0, 3), (300.0, 30)]
        assert not set(parts[0]) & set(parts[1])
    # blocks alone (the old rule: 3 blocks each) would give b's pseudo-task 3 to 30 documents, never matched
    with pytest.warns(RuntimeWarning, match="pseudo-tasks scaled to 0.67"):      # 400 tokens, 22 documents left
        assert matched_sizes(tasks, domain.subset(list(range(4)))) == [(pytest.approx(200.0), 2),
                                                                       (pytest.approx(200.0), 20)]


def test_null_pooled_over_two_domains_of_different_spread():
    from modsep_nb.evidence import matched_sizes
    tasks = {t: _toy_blocks([100] * 4, [2] * 4, k) for k, t in enumerate("abc")}
    calm, wild = _toy_blocks([100] * 24, [2] * 24, 5, spread=0.1), _toy_blocks([50] * 48, [1] * 48, 6, spread=3.0)
    sizes = [matched_sizes(tasks, d) for d in (calm, wild)]
    pooled = pseudo_task_null([calm, wild], sizes, 9, seed=3, frac=0.1)
    first, second = child_seeds(3, 2)
    alone = [pseudo_task_null(calm, sizes[0], 4, first, frac=0.1),
             pseudo_task_null(wild, sizes[1], 5, second, frac=0.1)]
    assert pooled["median"].tolist() == alone[0]["median"].tolist() + alone[1]["median"].tolist()
    assert pooled["domain"].tolist() == [0] * 4 + [1] * 5
    ev = overlap_evidence(tasks, [calm, wild], frac=0.1, n_boot=20, n_null=10, seed=0)
    halves = [pseudo_task_null(d, z, 5, s, frac=0.1)["median"] for d, z, s in zip((calm, wild), sizes, child_seeds(1, 2))]
    assert ev["null_median"] == pytest.approx((halves[0].mean() + halves[1].mean()) / 2)     # the two domains' average
