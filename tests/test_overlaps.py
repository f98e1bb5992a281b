"""Overlap metrics (docs/method.md §5.1) and the pattern test (§6), checked against hand counts,
set arithmetic in plain Python, and scipy."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from modsep_nb.overlaps import (chance_intersection, chance_overlap, layer_distribution, layer_matched_chance,
                               layer_matched_chance_matrix, overlap, overlap_matrix, overlap_sweep,
                               pattern_persistence, related_vs_unrelated, score_spearman)
from modsep_nb.pruning import select_neurons


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# A = {(0,0),(0,1),(0,2),(1,0)}  |A| = 4
# B = {(0,1),(0,2),(0,3)}        |B| = 3, nothing in layer 1
# A∩B = {(0,1),(0,2)} = 2,  A∪B = 5
A = _mask([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
B = _mask([[0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])


def test_overlap_hand_counted():
    assert overlap(A, B) == pytest.approx(2 / 3)
    assert overlap(A, B, metric="jaccard") == pytest.approx(2 / 5)
    assert overlap(A, A) == 1.0 and overlap(A, A, metric="jaccard") == 1.0
    assert overlap(A, B) == overlap(B, A)


def test_overlap_per_layer_and_empty_layers():
    ov = overlap(A, B, per_layer=True)
    jac = overlap(A, B, metric="jaccard", per_layer=True)
    assert ov.shape == (2,) and ov.dtype == torch.float64
    assert ov[0].item() == pytest.approx(2 / 3)      # layer 0: 2 shared, both hold 3
    assert jac[0].item() == pytest.approx(2 / 4)     # union {0,1,2,3}
    assert math.isnan(ov[1].item()) and math.isnan(jac[1].item())   # B empty in layer 1
    empty = torch.zeros_like(A)
    assert math.isnan(overlap(A, empty))


def test_overlap_errors():
    with pytest.raises(ValueError, match="overlap, jaccard"):
        overlap(A, B, metric="dice")
    with pytest.raises(ValueError, match="same model"):
        overlap(A, B[:, :4])
    assert overlap(A.int(), B) == overlap(A, B)          # 0/1 integers are converted exactly
    with pytest.raises(ValueError, match="bool"):
        overlap(A.float(), B)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        overlap(A.int() * 2, B)


def test_overlap_random_masks_against_python_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 50, generator=g) < 0.2
    b = torch.rand(4, 50, generator=g) < 0.3
    sa = {tuple(x) for x in a.nonzero().tolist()}
    sb = {tuple(x) for x in b.nonzero().tolist()}
    assert overlap(a, b) == pytest.approx(len(sa & sb) / min(len(sa), len(sb)))
    assert overlap(a, b, metric="jaccard") == pytest.approx(len(sa & sb) / len(sa | sb))


def test_chance_levels():
    assert chance_intersection(10, 20, 100) == pytest.approx(2.0)
    assert chance_overlap(10, 20, 100) == pytest.approx(2.0 / 10)
    assert chance_overlap(10, 20, 100, metric="jaccard") == pytest.approx(2.0 / 28)
    assert math.isnan(chance_overlap(0, 5, 100))
    per_layer = chance_overlap(np.array([5, 10]), np.array([5, 10]), 100)
    np.testing.assert_allclose(per_layer, [0.05, 0.10])
    with pytest.raises(ValueError, match=r"\[0, n\]"):
        chance_overlap(200, 5, 100)


def test_chance_matches_simulation():
    # random independent sets of 30 and 50 out of 400: mean overlap ≈ 50/400
    rng = np.random.default_rng(0)
    n, na, nb = 400, 30, 50
    values, jac = [], []
    for _ in range(2000):
        a = np.zeros(n, bool); a[rng.choice(n, na, replace=False)] = True
        b = np.zeros(n, bool); b[rng.choice(n, nb, replace=False)] = True
        values.append((a & b).sum() / na)
        jac.append((a & b).sum() / (a | b).sum())
    assert np.mean(values) == pytest.approx(chance_overlap(na, nb, n), abs=0.005)
    assert np.mean(jac) == pytest.approx(chance_overlap(na, nb, n, metric="jaccard"), abs=0.005)


def _counts_mask(counts, d):
    mask = torch.zeros(len(counts), d, dtype=torch.bool)
    for layer, k in enumerate(counts):
        mask[layer, :k] = True
    return mask


def test_layer_matched_chance_by_hand():
    # both sets hold 10 neurons, all in layer 0 of 2 layers x 20: E|A∩B| = 10*10/20 = 5
    a, b = _counts_mask([10, 0], 20), _counts_mask([0, 0], 20)
    b[0, 10:] = True                                          # other neurons, same layer: the counts matter only
    assert layer_matched_chance(a, b) == pytest.approx(5 / 10)
    assert layer_matched_chance(a, b, metric="jaccard") == pytest.approx(5 / (20 - 5))
    assert chance_overlap(10, 10, 40) == pytest.approx(10 / 40)        # uniform chance is half of it
    # one layer: the layer-matched chance is the uniform chance
    g = torch.Generator().manual_seed(5)
    one_a, one_b = torch.rand(1, 80, generator=g) < 0.2, torch.rand(1, 80, generator=g) < 0.4
    for metric in ("overlap", "jaccard"):
        expected = chance_overlap(int(one_a.sum()), int(one_b.sum()), 80, metric=metric)
        assert layer_matched_chance(one_a, one_b, metric) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(layer_matched_chance(a, torch.zeros_like(a)))
    with pytest.raises(ValueError, match="same model"):
        layer_matched_chance(a, b[:, :10])


def test_layer_matched_chance_matches_simulation():
    rng = np.random.default_rng(1)
    d, counts_a, counts_b = 60, [30, 5, 0], [20, 10, 4]
    a, b = _counts_mask(counts_a, d), _counts_mask(counts_b, d)
    ov, jac = [], []
    for _ in range(3000):
        ra = np.zeros((3, d), bool)
        rb = np.zeros((3, d), bool)
        for layer in range(3):
            ra[layer, rng.choice(d, counts_a[layer], replace=False)] = True
            rb[layer, rng.choice(d, counts_b[layer], replace=False)] = True
        inter = (ra & rb).sum()
        ov.append(inter / min(ra.sum(), rb.sum()))
        jac.append(inter / (ra | rb).sum())
    expected = layer_matched_chance(a, b)
    assert expected == pytest.approx((30 * 20 + 5 * 10) / 60 / 34)
    assert np.mean(ov) == pytest.approx(expected, abs=0.006)          # ~5 standard errors
    assert expected > 1.5 * chance_overlap(35, 34, 180)               # piling up raises chance
    assert np.mean(jac) == pytest.approx(layer_matched_chance(a, b, metric="jaccard"), abs=0.006)


def test_layer_matched_chance_matrix_matches_pairwise():
    g = torch.Generator().manual_seed(6)
    masks = {f"t{i}": torch.rand(3, 30, generator=g) < torch.tensor([[0.5], [0.1], [0.2 * i]]) for i in range(4)}
    for metric in ("overlap", "jaccard"):
        names, m = layer_matched_chance_matrix(masks, metric=metric)
        assert names == list(masks) and m.shape == (4, 4)
        for i, x in enumerate(names):
            for j, y in enumerate(names):
                assert m[i, j] == pytest.approx(layer_matched_chance(masks[x], masks[y], metric), rel=1e-12)
    _, m = layer_matched_chance_matrix(masks)
    counts = masks["t1"].sum(1).double()                  # the diagonal: two random sets with t1's counts
    assert m[1, 1] == pytest.approx(float((counts ** 2).sum() / 30 / counts.sum()))


def spearman_by_hand(x, y) -> float:
    """Pearson correlation of average ranks, ranks counted in plain Python (independent of scipy)."""
    def ranks(v):
        v = [float(t) for t in v]
        order = sorted(v)
        first = {}
        for pos, t in enumerate(order):
            first.setdefault(t, pos)
        return np.array([first[t] + 1 + (order.count(t) - 1) / 2 for t in v])
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_score_spearman_matches_hand_ranks_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 7, (3, 40), generator=g).to(torch.float16)   # many ties, as in the release
    b = (a.float() + torch.randint(0, 5, (3, 40), generator=g)).to(torch.float16)
    expected = spearman_by_hand(a.flatten().tolist(), b.flatten().tolist())
    assert score_spearman(a, b) == pytest.approx(expected, abs=1e-12)
    per_layer = score_spearman(a, b, per_layer=True)
    for layer in range(3):
        ref = spearman_by_hand(a[layer].tolist(), b[layer].tolist())
        assert per_layer[layer].item() == pytest.approx(ref, abs=1e-12)
    assert math.isnan(score_spearman(torch.ones(2, 5), b[:2, :5]))


def test_overlap_matrix_matches_pairwise():
    g = torch.Generator().manual_seed(2)
    masks = {f"t{i}": torch.rand(3, 20, generator=g) < 0.3 for i in range(4)}
    for metric in ("overlap", "jaccard"):
        names, m = overlap_matrix(masks, metric=metric)
        _, m_layer = overlap_matrix(masks, metric=metric, per_layer=True)
        assert names == list(masks) and m.shape == (4, 4) and m_layer.shape == (4, 4, 3)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                assert m[i, j] == pytest.approx(overlap(masks[a], masks[b], metric))
                np.testing.assert_allclose(m_layer[i, j], overlap(masks[a], masks[b], metric, per_layer=True).numpy())


def test_overlap_sweep_consistent_with_direct_computation():
    g = torch.Generator().manual_seed(3)
    base = torch.rand(4, 100, generator=g)
    scores = {f"t{i}": base + 0.5 * torch.rand(4, 100, generator=g) for i in range(5)}
    fracs = [0.01, 0.05, 0.2]
    for mode in ("global", "per_layer"):
        sweep = overlap_sweep(scores, fracs, mode=mode)
        assert sweep["n_pairs"] == 10
        for f, frac in enumerate(fracs):
            masks = {t: select_neurons(s, frac, mode) for t, s in scores.items()}
            values = [overlap(masks[a], masks[b]) for i, a in enumerate(masks) for b in list(masks)[i + 1:]]
            assert sweep["min"][f] == pytest.approx(min(values))
            assert sweep["median"][f] == pytest.approx(np.median(values))
            assert sweep["max"][f] == pytest.approx(max(values))
            k = int(masks["t0"].sum())
            assert sweep["chance"][f] == pytest.approx(k / 400)   # max(|A|,|B|)/N with equal sizes
            layer_chance = [layer_matched_chance(masks[a], masks[b]) for i, a in enumerate(masks)
                            for b in list(masks)[i + 1:]]
            assert sweep["layer_chance"][f] == pytest.approx(np.mean(layer_chance))
            if mode == "per_layer":                                # equal counts per layer: no pile-up
                assert sweep["layer_chance"][f] == pytest.approx(sweep["chance"][f])


def test_layer_distribution():
    dist = layer_distribution(A)
    np.testing.assert_allclose(dist, [3 / 4, 1 / 4])
    with pytest.raises(ValueError, match="no neurons"):
        layer_distribution(torch.zeros_like(A))


def _random_symmetric(rng, n):
    m = rng.random((n, n))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def test_pattern_persistence_identical_and_rho():
    rng = np.random.default_rng(0)
    m = _random_symmetric(rng, 10)
    out = pattern_persistence(m, m, n_perm=500, seed=0)
    assert out["rho"] == pytest.approx(1.0)
    assert out["p_value"] < 0.01 and out["n_pairs"] == 45
    # rho is the Spearman of the upper triangles
    other = _random_symmetric(rng, 10)
    iu = np.triu_indices(10, 1)
    out = pattern_persistence(m, other, n_perm=10, seed=0)
    assert out["rho"] == pytest.approx(spearman_by_hand(m[iu], other[iu]))
    # same seed -> same p-value
    assert pattern_persistence(m, other, seed=4)["p_value"] == pattern_persistence(m, other, seed=4)["p_value"]


def test_pattern_persistence_p_value_uniform_under_null():
    rng = np.random.default_rng(1)
    p = np.array([pattern_persistence(_random_symmetric(rng, 8), _random_symmetric(rng, 8),
                                      n_perm=200, seed=s)["p_value"] for s in range(300)])
    assert stats.kstest(p, "uniform").pvalue > 0.01
    assert 0.02 < np.mean(p < 0.1) < 0.2


def test_pattern_persistence_errors():
    m = np.eye(4)
    with pytest.raises(ValueError, match="same tasks"):
        pattern_persistence(m, np.eye(5))
    with pytest.raises(ValueError, match="square"):
        pattern_persistence(np.ones((3, 4)), np.ones((3, 4)))


def test_related_vs_unrelated():
    names = ["a1", "a2", "b1", "b2", "x"]
    m = np.full((5, 5), 0.1)
    m[0, 1] = m[1, 0] = 0.9
    m[2, 3] = m[3, 2] = 0.7
    np.fill_diagonal(m, 1.0)
    out = related_vs_unrelated(m, names, {"a": ["a1", "a2"], "b": ["b1", "b2", "missing"]})
    assert out["within"] == pytest.approx(0.8) and out["n_within"] == 2
    assert out["across"] == pytest.approx(0.1) and out["n_across"] == 4
    assert out["per_group"] == pytest.approx({"a": 0.9, "b": 0.7})
    assert out["ungrouped"] == ["x"]
    with pytest.raises(ValueError, match="two groups"):
        related_vs_unrelated(m, names, {"a": ["a1"], "b": ["a1"]})
