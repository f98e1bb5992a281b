"""Layerwise correspondence (docs/method.md §8): concentration curve and AUC, hypergeometric enrichment with
Benjamini-Hochberg, random-split nulls. Checked against hand computations, scipy and plain loops."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from modsep_nb.correspondence import (against_null, benjamini_hochberg, concentration_auc, concentration_curve,
                                      enrichment, expert_counts, layer_correspondence, null_distribution,
                                      packed_auc, random_balanced_splits)
from modsep_nb.moefication import random_balanced_split


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny tensor ops: one torch thread avoids waiting on a busy second core. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blocks(d, n_experts):
    """Expert e = neurons [e*m, (e+1)*m)."""
    return torch.arange(d) // (d // n_experts)


def mask(d, idx):
    out = torch.zeros(d, dtype=torch.bool)
    out[list(idx)] = True
    return out


# ----------------------------------------------------------------------------- concentration

def test_concentration_curve_by_hand():
    labels = blocks(12, 4)                        # experts {0,1,2} {3,4,5} {6,7,8} {9,10,11}
    selected = mask(12, [0, 1, 2, 3, 9])          # counts 3, 1, 0, 1 -> sorted 3, 1, 1, 0
    curve = concentration_curve(selected, labels)
    assert curve.tolist() == pytest.approx([0, 3 / 5, 4 / 5, 1, 1])
    # trapezoid at x = 0, 1/4, ..., 1: (0+.6 + .6+.8 + .8+1 + 1+1)/8 = 0.725; packed: 3, 2 -> .6, 1, 1, 1
    packed = (0 + .6 + .6 + 1 + 1 + 1 + 1 + 1) / 8
    assert packed_auc(5, 12, 4) == pytest.approx(packed)
    assert concentration_auc(selected, labels) == pytest.approx((0.725 - 0.5) / (packed - 0.5))


def test_auc_is_one_when_packed_and_zero_when_uniform():
    labels = random_balanced_split(96, 8, seed=0)          # experts of 12
    two_experts = (labels == 3) | (labels == 5)
    assert concentration_auc(two_experts, labels) == pytest.approx(1.0)
    part = torch.cat([torch.nonzero(labels == 3).squeeze(1), torch.nonzero(labels == 5).squeeze(1)[:5]])
    assert concentration_auc(mask(96, part.tolist()), labels) == pytest.approx(1.0)   # one full + 5
    split_evenly = torch.cat([torch.nonzero(labels == e).squeeze(1)[:6] for e in (3, 5)])
    assert concentration_auc(mask(96, split_evenly.tolist()), labels) < 1.0        # 6 + 6, not 12
    one_each = torch.stack([torch.nonzero(labels == e).squeeze(1)[:2] for e in range(8)]).flatten()
    assert concentration_auc(mask(96, one_each.tolist()), labels) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(concentration_auc(torch.ones(96, dtype=torch.bool), labels))   # nothing to pack


def test_auc_vectorised_over_partitions_equals_the_loop():
    g = torch.Generator().manual_seed(0)
    selected = torch.rand(120, generator=g) < 0.1
    many = random_balanced_splits(120, 10, 7, seed=1)
    assert many.shape == (7, 120)
    assert all(torch.bincount(row).tolist() == [12] * 10 for row in many)
    together = concentration_auc(selected, many)
    assert together.shape == (7,)
    assert together.tolist() == pytest.approx([concentration_auc(selected, row) for row in many])
    assert concentration_curve(selected, many)[2].tolist() == pytest.approx(concentration_curve(selected, many[2]).tolist())


def test_random_splits_are_the_seeded_uniform_draws_sorted_and_a_fresh_copy_each_call():
    """The splits are the stable sort of torch.rand under the seed, cut into equal experts (computed here with
    torch's own sort), whatever the cache: a caller changing its copy changes no later draw."""
    g = torch.Generator().manual_seed(5)
    perm = torch.rand(40, 96, generator=g).argsort(dim=1, stable=True)
    expected = torch.empty(40, 96, dtype=torch.long).scatter_(1, perm, (torch.arange(96) // 12).expand(40, 96))
    first = random_balanced_splits(96, 8, 40, seed=5)
    assert torch.equal(first, expected)
    first[:] = 0
    assert torch.equal(random_balanced_splits(96, 8, 40, seed=5), expected)
    assert not torch.equal(random_balanced_splits(96, 8, 40, seed=6), expected)


def test_inputs_are_validated():
    labels = blocks(12, 4)
    with pytest.raises(ValueError, match="no neuron is selected"):
        concentration_auc(torch.zeros(12, dtype=torch.bool), labels)
    with pytest.raises(ValueError, match="bool tensor"):
        concentration_auc(torch.ones(12), labels)            # a float mask has no exact meaning
    assert concentration_auc(mask(12, [1, 5]).long(), labels) == concentration_auc(mask(12, [1, 5]), labels)
    with pytest.raises(ValueError, match="exactly"):
        concentration_auc(mask(12, [1]), torch.tensor([0] * 7 + [1] * 5))


# ----------------------------------------------------------------------------- enrichment

def test_hypergeometric_p_values_equal_scipy():
    g = torch.Generator().manual_seed(2)
    labels = random_balanced_split(192, 12, seed=4)
    selected = torch.rand(192, generator=g) < 0.15
    selected[labels == 7] = True                      # one strongly enriched expert
    out = enrichment(selected, labels)
    n_sel, counts = int(selected.sum()), out["counts"].tolist()
    for e in range(12):
        c = int(selected[labels == e].sum())
        assert counts[e] == c
        assert out["p"][e].item() == pytest.approx(stats.hypergeom.sf(c - 1, 192, n_sel, 16), rel=1e-12)
    assert out["q"].tolist() == pytest.approx(stats.false_discovery_control(out["p"].numpy()).tolist())
    assert out["significant"][7] and out["share_significant"] >= 1 / 12
    expected = 16 * n_sel / 192
    assert out["obs_over_exp"].tolist() == pytest.approx([c / expected for c in counts])
    assert out["mean_obs_over_exp"] == pytest.approx(sum(c / n_sel * c / expected for c in counts))


def test_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # ascending 0.005, 0.01, 0.03, 0.04, 0.5 times 5/rank -> .025 .025 .05 .05 .5, running min from the top
    assert benjamini_hochberg(p).tolist() == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    assert benjamini_hochberg([0.9, 0.8]).tolist() == pytest.approx([0.9, 0.9])
    rng = np.random.default_rng(0)
    many = rng.uniform(size=(4, 50)) ** 3
    ours = benjamini_hochberg(many).numpy()
    assert np.allclose(ours, [stats.false_discovery_control(row) for row in many])


def test_enrichment_of_one_packed_expert():
    labels = blocks(64, 8)
    out = enrichment(labels == 2, labels)
    assert out["significant"].tolist() == [e == 2 for e in range(8)]
    assert out["share_significant"] == pytest.approx(1 / 8)
    assert out["mean_obs_over_exp"] == pytest.approx(8.0)           # E when all sit in one expert
    assert out["mean_obs_over_exp_significant"] == pytest.approx(8.0)
    spread = enrichment(mask(64, range(0, 64, 8)), labels)         # one per expert
    assert spread["mean_obs_over_exp"] == pytest.approx(1.0)
    assert spread["share_significant"] == 0.0 and math.isnan(spread["mean_obs_over_exp_significant"])


# ----------------------------------------------------------------------------- nulls

def test_against_null_by_hand():
    null = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = against_null(3.0, null)
    assert out["z"] == pytest.approx((3.0 - 2.5) / np.std([1, 2, 3, 4], ddof=1))
    assert out["percentile"] == pytest.approx(100 * 2.5 / 4)
    assert against_null(2.0, torch.tensor([2.0, 2.0]))["z"] == 0.0
    assert against_null(3.0, torch.tensor([2.0, 2.0]))["z"] == math.inf


def test_random_selection_is_about_the_null_mean():
    g = torch.Generator().manual_seed(11)
    labels = random_balanced_split(1536, 48, seed=3)
    zs = []
    for rep in range(5):
        selected = torch.zeros(1536, dtype=torch.bool)
        selected[torch.randperm(1536, generator=g)[:77]] = True
        null = null_distribution(selected, 48, n_null=200, seed=rep)
        assert null.shape == (200,) and (null > 0).all() and (null < 1).all()
        zs.append(against_null(concentration_auc(selected, labels), null)["z"])
    assert all(abs(z) < 3 for z in zs)


def test_null_is_seeded_and_vectorised():
    selected = mask(96, range(0, 96, 5))
    a = null_distribution(selected, 8, n_null=50, seed=0)
    assert torch.equal(a, null_distribution(selected, 8, n_null=50, seed=0))
    assert not torch.equal(a, null_distribution(selected, 8, n_null=50, seed=1))
    splits = random_balanced_splits(96, 8, 50, seed=0)
    assert a.tolist() == pytest.approx([concentration_auc(selected, s) for s in splits])
    share = null_distribution(selected, 8, n_null=50, seed=0, statistic="share_significant")
    assert share.tolist() == pytest.approx([enrichment(selected, s)["share_significant"] for s in splits])
    with pytest.raises(ValueError, match="unknown statistic"):
        null_distribution(selected, 8, statistic="gini")


def test_layer_correspondence():
    n_layers, d, n_experts = 30, 1536, 48
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([random_balanced_split(d, n_experts, seed=i) for i in range(n_layers)])
    selected = torch.rand(n_layers, d, generator=g) < 0.05
    selected[0] = labels[0] < 2                       # layer 0: packed into two experts
    selected[1] = False                               # layer 1: nothing selected
    res = layer_correspondence(selected, labels, n_null=100, seed=0)
    assert res.auc.shape == (n_layers,) and res.n_selected[1] == 0
    assert res.auc[0] == pytest.approx(1.0) and res.z[0] > 5 and res.percentile[0] == 100.0
    assert res.share_significant[0] == pytest.approx(2 / 48) and res.mean_obs_over_exp[0] == pytest.approx(24.0)
    assert all(math.isnan(float(getattr(res, f)[1])) for f in ("auc", "z", "percentile", "share_significant"))
    rest = slice(2, None)
    assert (res.z[rest].abs() < 4).all()              # random selections: no correspondence
    assert (res.null_mean[rest] > 0).all() and (res.null_std[rest] > 0).all()
    # the per-layer numbers equal the single-layer functions with the same null
    one = null_distribution(selected[5], n_experts, n_null=100, seed=_layer_seed(0, 5, n_layers))
    assert res.null_mean[5] == pytest.approx(float(one.mean()))
    assert res.auc[5] == pytest.approx(concentration_auc(selected[5], labels[5]))
    assert res.share_significant[5] == pytest.approx(enrichment(selected[5], labels[5])["share_significant"])
    again = layer_correspondence(selected, labels, n_null=100, seed=0)
    assert torch.allclose(res.z, again.z, equal_nan=True, rtol=0, atol=0)      # seeded


def _layer_seed(seed, layer, n_layers):
    from modsep_nb.moefication import layer_seeds
    return layer_seeds(seed, n_layers)[layer]


def test_expert_counts_shape_check():
    with pytest.raises(ValueError, match="d_mlp"):
        expert_counts(mask(12, [0]), blocks(24, 4))


def test_correspondence_claims_use_their_units():
    from types import SimpleNamespace

    from modsep_nb.correspondence import correspondence_claims
    rng = np.random.default_rng(0)
    n_layers, tasks = 12, [f"t{i}" for i in range(6)]

    def z_curve(early, middle, late):
        z = np.full(n_layers, middle) + rng.normal(0, 0.01, n_layers)
        z[:4] += early - middle
        z[8:] += late - middle
        return SimpleNamespace(z=torch.tensor(z))
    by_frac = {f: {t: z_curve(4.0 + i, 1.0, 4.0 + i) for i, t in enumerate(tasks)} for f in (0.05, 0.1)}
    control = {f: SimpleNamespace(z=torch.full((n_layers,), 0.5, dtype=torch.float64)) for f in (0.05, 0.1)}
    above, ends = correspondence_claims("lm", by_frac, control, n_boot=200, seed=0)
    assert above.id == "correspondence_above_control[lm]" and ends.id == "ends_stronger_than_middle[lm]"
    task_z = [np.mean([by_frac[f][t].z.mean().item() for f in by_frac]) for t in tasks]
    assert above.estimate == pytest.approx(np.mean(task_z) - 0.5)
    assert above.n == 6 and above.p == pytest.approx(1 / 64) and above.p_floor == 1 / 64   # exact sign-flip, tasks
    # layers are the unit of `ends`: the 12 layers' z averaged over tasks, 4 early / 4 middle / 4 late
    assert ends.n == 12 and ends.estimate == pytest.approx(np.mean([3.0 + i for i in range(6)]), abs=0.02)
    assert ends.p == pytest.approx(1 / 70) and ends.p_floor == pytest.approx(1 / 70)       # C(8, 4) = 70
    assert above.supported and ends.supported
    flat = {f: {t: z_curve(1.0, 1.0, 1.0) for t in tasks} for f in (0.05, 0.1)}
    assert not correspondence_claims("lm", flat, control, n_boot=200, seed=0)[1].supported


def test_the_control_varies_with_the_data_it_is_measured_on():
    """Issue #26 (minor, 05): the activation-only control is measured on the same data as the tasks, so its own
    spread must enter the test. Tasks 0.5 above the control in every task: held fixed, the control gives the
    sign-flip floor and a point interval; resampled with a spread of 1 around it, the interval holds 0 and p is
    large."""
    from types import SimpleNamespace

    from modsep_nb.correspondence import correspondence_claims
    n_layers, tasks = 6, [f"t{i}" for i in range(6)]
    by_frac = {0.1: {t: SimpleNamespace(z=torch.full((n_layers,), 1.0, dtype=torch.float64)) for t in tasks}}
    control = {0.1: SimpleNamespace(z=torch.full((n_layers,), 0.5, dtype=torch.float64))}
    fixed, _ = correspondence_claims("vit", by_frac, control, n_boot=400, seed=0)
    assert fixed.estimate == pytest.approx(0.5) and fixed.p == pytest.approx(1 / 64) and fixed.ci == (0.5, 0.5)
    assert "held fixed" in fixed.statement
    spread = 0.5 + np.random.default_rng(0).normal(0, 1.0, 400)
    resampled = {"task_z": np.ones((400, len(tasks))), "control_z": spread}
    moving, _ = correspondence_claims("vit", by_frac, control, n_boot=400, seed=0, resampled=resampled)
    assert moving.estimate == pytest.approx(0.5) and moving.n == len(tasks)
    lo, hi = moving.ci
    assert lo < 0 < hi and lo == pytest.approx(np.percentile(1 - spread, 2.5))
    # the test: exact sign flips of task − the control's 99.5% bound (above every task here: p of flips 1), + 0.005
    assert np.quantile(spread, 0.995) > 1.0 and moving.p == 1.0 and not moving.supported
    assert "resampled with them" in moving.statement and not moving.insufficient
    # a control that hardly moves: 6 tasks clearly above it reach the sign-flip floor 1/64 plus the 0.005 spent
    steady = {"task_z": np.ones((400, len(tasks))) + np.random.default_rng(1).normal(0, 0.05, (400, len(tasks))),
              "control_z": 0.5 + np.random.default_rng(2).normal(0, 0.01, 400)}
    firm, _ = correspondence_claims("vit", by_frac, control, n_boot=400, seed=0, resampled=steady)
    assert firm.p == pytest.approx(1 / 64 + 0.005) and firm.p_floor == pytest.approx(1 / 64 + 0.005)
    assert firm.n == 6 and firm.supported and "Berger-Boos" in firm.test


def test_a_resampled_selection_is_read_against_its_reference_null():
    """mean_z_against a selection's own layer_correspondence gives back that correspondence's mean z."""
    from modsep_nb.correspondence import layer_correspondence, mean_z_against
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randperm(32, generator=g) // 8 for _ in range(3)])       # 4 experts of 8, 3 layers
    selected = torch.zeros(3, 32, dtype=torch.bool)
    for layer in range(3):
        selected[layer, torch.randperm(32, generator=g)[:6]] = True
    ref = layer_correspondence(selected, labels, n_null=50, seed=1)
    assert mean_z_against(selected, labels, ref) == pytest.approx(float(np.nanmean(ref.z.numpy())))
    with pytest.raises(ValueError, match="count per layer"):
        mean_z_against(selected & (torch.arange(32) < 16), labels, ref)


def test_ends_needs_both_ends_with_layers_as_units():
    """Issue #26 item 1: early > middle but late = middle, in every task (tasks as units this was supported:
    every task's ends-minus-middle is positive), is not `ends`; with 6 layers no test can reach 0.05."""
    from modsep_nb.claims import correct
    from modsep_nb.correspondence import ends_claim
    early_only = np.r_[[4.0] * 4, [1.0] * 4, [1.05, 0.95, 1.0, 1.0]]
    claim = ends_claim("vit", early_only, n_boot=200, n_perm=1000, seed=0)
    assert claim.estimate == pytest.approx(0.0) and not claim.supported
    assert "early − middle +3.00, p 0.014; late − middle +0.00" in claim.statement
    assert claim.p > 0.2                                 # the late test: (0, 0, 0.05, -0.05) vs four 1s ...
    vit = [4.05, 3.93, 2.13, 2.26, 1.76, 2.41]           # the default run's ViT per-layer z
    claim = correct([ends_claim("vit", vit, n_boot=200, n_perm=1000, seed=0)], family="05")[0]
    assert claim.p_floor == pytest.approx(1 / 6) and not claim.supported      # 2 vs 2 layers: C(4, 2) = 6
    assert claim.verdict == "cannot be tested with 6 layers (smallest possible p 0.167)"
    assert claim.estimate == pytest.approx(min(4.05 + 3.93, 1.76 + 2.41) / 2 - (2.13 + 2.26) / 2)


def test_layer_permutation_test_by_hand():
    from modsep_nb.correspondence import layer_permutation_test
    # {3, 4} vs {1, 2}: of the C(4, 2) = 6 splits only the observed one reaches a difference of 2
    out = layer_permutation_test([3, 4], [1, 2], n_perm=100, seed=0)
    assert out["estimate"] == 2.0 and out["p"] == pytest.approx(1 / 6) and out["p_floor"] == pytest.approx(1 / 6)
    # {1, 3} vs {2, 4}: difference -1; the splits give -2, -1, 0, 0, 1, 2, so 5 of 6 reach -1
    assert layer_permutation_test([1, 3], [2, 4], n_perm=100, seed=0)["p"] == pytest.approx(5 / 6)
    # too many relabellings to enumerate (C(40, 20)): random ones, p >= 1 / (1 + n_perm)
    big = layer_permutation_test(np.arange(20) + 100.0, np.arange(20.0), n_perm=500, seed=0)
    assert big["p"] == pytest.approx(1 / 501) and big["p_floor"] == pytest.approx(1 / 501)
