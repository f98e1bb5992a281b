"""Overlap between tasks' neuron sets (docs/method.md §5) and the random-init pattern test (§6).

Masks are bool tensors [L, d_mlp] (one entry per MLP neuron), as returned by `select_neurons`.
For selected sets A, B out of N neurons:

    overlap coefficient  |A∩B| / min(|A|, |B|)    (the reference's number when |A| = |B|)
    Jaccard              |A∩B| / |A∪B|
    chance               E|A∩B| = |A||B| / N       (A, B drawn independently and uniformly)
    layer-matched chance E|A∩B| = Σ_l a_l b_l / d  (random sets with the same counts a_l, b_l per layer)

Under global selection the selected neurons pile into a few layers; two such sets share more neurons by
chance than uniform sets do, so every overlap under global selection is read against its layer-matched
chance. With one layer (or equal counts in every layer) the two chance levels coincide.

Every value is computed in float64. Where either set is empty (globally, or in one layer with
per_layer=True) both metrics are nan: "no neurons selected" is not "no overlap", and a Jaccard of 0
there would read as "disjoint" and drag layer averages down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from .claims import resample_p
from .pruning import as_mask, select_neurons

METRICS = ("overlap", "jaccard")


# ----------------------------------------------------------------------------------------------
# input checks

def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")


def _as_mask(mask, name: str = "mask") -> torch.Tensor:
    mask = as_mask(mask, name)
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape [n_layers, d_mlp], got {tuple(mask.shape)}")
    return mask


def _stack_masks(masks: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """(task names, their checked masks) for a dict of masks that must all come from one model."""
    names = list(masks)
    if not names:
        raise ValueError("masks is empty: pass {task: bool mask [n_layers, d_mlp]} for at least one task")
    stacked = [_as_mask(masks[t], f"masks[{t!r}]") for t in names]
    shapes = {tuple(m.shape) for m in stacked}
    if len(shapes) > 1:
        raise ValueError(f"masks have different shapes {sorted(shapes)}: all must come from the same model")
    return names, stacked


def _check_pair(mask_a, mask_b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_mask(mask_a, "mask_a"), _as_mask(mask_b, "mask_b")
    if a.shape != b.shape:
        raise ValueError(f"mask_a has shape {tuple(a.shape)} but mask_b has {tuple(b.shape)}: "
                         "both must come from the same model ([n_layers, d_mlp])")
    return a, b.to(a.device)


def _as_scores(scores, name: str) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().to(torch.float64)
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape [n_layers, d_mlp], got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN: check the statistics it was computed from")
    return scores


def _metric_value(inter, size_a, size_b, metric: str) -> torch.Tensor:
    inter, size_a, size_b = (x.to(torch.float64) for x in (inter, size_a, size_b))
    smaller = torch.minimum(size_a, size_b)
    den = smaller if metric == "overlap" else size_a + size_b - inter
    value = inter / den
    # nan on purpose where a set is empty: its overlap is undefined, not 0.
    return torch.where(smaller > 0, value, torch.full_like(value, float("nan")))


# ----------------------------------------------------------------------------------------------
# overlap of two masks

def overlap(mask_a, mask_b, metric: str = "overlap", per_layer: bool = False):
    """Overlap of two neuron sets given as bool masks [L, d_mlp].

    metric="overlap": |A∩B| / min(|A|, |B|);  metric="jaccard": |A∩B| / |A∪B|.
    per_layer=False returns a float over all L*d_mlp neurons; per_layer=True returns a float64
    tensor [L] computed within each layer. Where either set is empty (globally, or in a layer)
    the value is nan for both metrics, since the overlap of an empty set is undefined.
    """
    _check_metric(metric)
    a, b = _check_pair(mask_a, mask_b)
    dims = (1,) if per_layer else (0, 1)
    value = _metric_value((a & b).sum(dims), a.sum(dims), b.sum(dims), metric)
    return value if per_layer else float(value)


def chance_intersection(n_a, n_b, n):
    """E|A∩B| when A (n_a of n) and B (n_b of n) are drawn independently and uniformly: n_a*n_b/n."""
    n_a, n_b, n = _check_counts(n_a, n_b, n)
    return _scalar_or_array(n_a * n_b / n)


def chance_overlap(n_a, n_b, n, metric: str = "overlap"):
    """Chance level of `metric` for random independent sets of sizes n_a and n_b out of n.

    overlap: E|A∩B| / min(n_a, n_b) = max(n_a, n_b) / n (exact expectation, sizes are fixed).
    jaccard: E|A∩B| / (n_a + n_b - E|A∩B|), the ratio of expectations. This is an approximation
    of E[Jaccard] (the expectation of a ratio is not the ratio of expectations), accurate when
    the sets hold many neurons. Accepts numbers or arrays (e.g. per-layer counts); an empty set
    gives nan, as in `overlap`.
    """
    _check_metric(metric)
    n_a, n_b, n = _check_counts(n_a, n_b, n)
    inter = n_a * n_b / n
    smaller = np.minimum(n_a, n_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = inter / smaller if metric == "overlap" else inter / (n_a + n_b - inter)
    return _scalar_or_array(np.where(smaller > 0, value, np.nan))   # empty set -> nan, as overlap()


def layer_matched_chance(mask_a, mask_b, metric: str = "overlap") -> float:
    """Chance level of `metric` for random sets with the same per-layer counts as mask_a and mask_b.

    Within each layer l (d neurons) independent random sets of a_l and b_l neurons share on average
    a_l*b_l/d, so E|A∩B| = Σ_l a_l*b_l/d. overlap: E|A∩B| / min(|A|, |B|) (exact, sizes are fixed).
    jaccard: E|A∩B| / (|A| + |B| - E|A∩B|), the ratio of expectations, as in `chance_overlap`
    (an approximation of E[Jaccard], accurate when the sets hold many neurons). nan for an empty set.
    """
    _check_metric(metric)
    a, b = _check_pair(mask_a, mask_b)
    count_a, count_b = a.sum(1).to(torch.float64), b.sum(1).to(torch.float64)
    inter = (count_a * count_b).sum() / a.shape[1]
    return float(_metric_value(inter, count_a.sum(), count_b.sum(), metric))


def layer_matched_chance_matrix(masks: Mapping[str, torch.Tensor], metric: str = "overlap"):
    """Task x task layer-matched chance (see layer_matched_chance): returns (names, matrix [T, T]).

    Beside `overlap_matrix(masks)`: the overlap two tasks' sets would have by chance given only how
    many neurons each puts in each layer. The diagonal is the chance level of two independent random
    sets with that task's counts (not 1).
    """
    _check_metric(metric)
    names, stacked = _stack_masks(masks)
    counts = torch.stack([m.sum(1).cpu() for m in stacked]).to(torch.float64)     # [T, L]
    inter = counts @ counts.T / stacked[0].shape[1]
    size = counts.sum(1)
    return names, _metric_value(inter, size[:, None], size[None, :], metric).numpy()


def _check_counts(n_a, n_b, n):
    n_a, n_b, n = (np.asarray(x, dtype=np.float64) for x in (n_a, n_b, n))
    if np.any(n <= 0):
        raise ValueError(f"n (the number of neurons to choose from) must be > 0, got {n}")
    if np.any(n_a < 0) or np.any(n_b < 0) or np.any(n_a > n) or np.any(n_b > n):
        raise ValueError(f"set sizes must lie in [0, n]: got n_a={n_a}, n_b={n_b}, n={n}")
    return n_a, n_b, n


def _scalar_or_array(x):
    return float(x) if np.ndim(x) == 0 else x


# ----------------------------------------------------------------------------------------------
# rank correlation of two score tensors

def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.cpu().numpy(), y.cpu().numpy()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")                     # constant input: no ranking at all (scipy would warn)
    return float(stats.spearmanr(x, y).statistic)


def score_spearman(scores_a, scores_b, per_layer: bool = False):
    """Spearman rank correlation of two score tensors [L, d_mlp] (ties get average ranks).

    per_layer=False correlates all L*d_mlp neurons at once and returns a float; per_layer=True
    returns a float64 tensor [L]. A constant input (no ranking at all) gives nan.
    """
    a, b = _as_scores(scores_a, "scores_a"), _as_scores(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a has shape {tuple(a.shape)} but scores_b has {tuple(b.shape)}: "
                         "both must come from the same model ([n_layers, d_mlp])")
    if not per_layer:
        return _spearman(a.flatten(), b.flatten())
    return torch.tensor([_spearman(ra, rb) for ra, rb in zip(a, b)], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# many tasks

def overlap_matrix(masks: Mapping[str, torch.Tensor], metric: str = "overlap", per_layer: bool = False):
    """Task x task overlap of selected sets: returns (names, matrix).

    masks: {task: bool [L, d_mlp]}, all the same shape. matrix is a float64 numpy array [T, T]
    (or [T, T, L] with per_layer=True), in the order of `names` (the dict's order). The diagonal is
    1 for non-empty sets; entries involving an empty set are nan.
    """
    _check_metric(metric)
    names, stacked = _stack_masks(masks)
    m = torch.stack([x.to(stacked[0].device) for x in stacked]).to(torch.float64)   # [T, L, D]
    if per_layer:
        inter = torch.einsum("tld,sld->tsl", m, m)                   # [T, T, L]
        size = m.sum(2)                                              # [T, L]
        size_a, size_b = size[:, None, :], size[None, :, :]
    else:
        flat = m.flatten(1)
        inter = flat @ flat.T                                        # [T, T]
        size = flat.sum(1)
        size_a, size_b = size[:, None], size[None, :]
    return names, _metric_value(inter, size_a, size_b, metric).cpu().numpy()


@dataclass
class OverlapSummary:
    """What a notebook reports about one set of selections (summary)."""
    names: list[str]
    overlap: np.ndarray             # [T, T] overlap coefficients
    jaccard: np.ndarray             # [T, T] Jaccard indices
    n_selected: list[int]           # each task's selection size
    n_all: int                      # neurons in all
    chance: dict                    # {metric: uniform chance, mean over pairs} ({} under two tasks)
    layer_chance: dict              # {metric: layer-matched chance, mean over pairs}
    pairs: np.ndarray               # pairwise overlap coefficients (upper triangle, in names order)
    median: float                   # their median

    def __getitem__(self, key: str):
        """summary["median"] as summary.median: the item access callers used when this was a dict."""
        return getattr(self, key)


def summary(masks: Mapping[str, torch.Tensor]) -> OverlapSummary:
    """Everything a notebook reports about one set of selections: task names, the overlap-coefficient and
    Jaccard matrices, selection sizes, uniform and layer-matched chance for both metrics (means over pairs),
    the pairwise overlaps (upper triangle, in names order) and their median."""
    names, overlap_m = overlap_matrix(masks, metric="overlap")
    _, jaccard_m = overlap_matrix(masks, metric="jaccard")
    sizes = [int(_as_mask(masks[t]).sum()) for t in names]
    n_all = _as_mask(masks[names[0]]).numel()
    i, j = _upper_pairs(len(names))
    pairs = overlap_m[i, j]
    return OverlapSummary(
        names=names, overlap=overlap_m, jaccard=jaccard_m, n_selected=sizes, n_all=n_all,
        chance={m: float(np.mean(chance_overlap(np.array(sizes)[i], np.array(sizes)[j], n_all, metric=m)))
                for m in METRICS} if len(names) > 1 else {},
        layer_chance={m: float(np.mean(layer_matched_chance_matrix(masks, metric=m)[1][i, j])) for m in METRICS}
        if len(names) > 1 else {},
        pairs=pairs, median=float(np.median(pairs)) if len(pairs) else float("nan"))


def _upper_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def overlap_sweep(scores: Mapping[str, torch.Tensor], fracs: Iterable[float], mode: str = "global",
                  metric: str = "overlap") -> dict:
    """Pairwise overlap of the tasks' selected sets as the selected fraction grows.

    For each frac, every task's top-frac neurons are selected with `select_neurons(scores, frac,
    mode)`, and min / median / max of `metric` are taken over all task pairs. `chance` is the
    chance level for sets of those sizes (mean over pairs; the sizes are equal in practice), and
    `layer_chance` the layer-matched chance (mean over pairs of layer_matched_chance): above `chance`
    where the selections pile into the same layers. Returns {"fracs", "min", "median", "max", "chance",
    "layer_chance"} as float64 numpy arrays, plus "n_pairs".
    """
    _check_metric(metric)
    names = list(scores)
    if len(names) < 2:
        raise ValueError(f"overlap_sweep needs scores for at least 2 tasks, got {len(names)}")
    fracs = np.asarray(list(fracs), dtype=np.float64)
    if fracs.ndim != 1 or fracs.size == 0:
        raise ValueError("fracs must be a non-empty list of fractions, e.g. [0.01, 0.02, 0.05, 0.1]")
    i, j = _upper_pairs(len(names))
    out = {key: np.empty(len(fracs)) for key in ("min", "median", "max", "chance", "layer_chance")}
    for f, frac in enumerate(fracs):
        masks = {t: select_neurons(scores[t], float(frac), mode) for t in names}
        _, matrix = overlap_matrix(masks, metric=metric)
        values = matrix[i, j]
        out["min"][f], out["median"][f], out["max"][f] = values.min(), np.median(values), values.max()
        sizes = np.array([float(masks[t].sum()) for t in names])
        n = masks[names[0]].numel()
        out["chance"][f] = np.mean(chance_overlap(sizes[i], sizes[j], n, metric=metric))
        out["layer_chance"][f] = np.mean(layer_matched_chance_matrix(masks, metric=metric)[1][i, j])
    return {"fracs": fracs, **out, "n_pairs": len(i)}


def layer_distribution(mask) -> np.ndarray:
    """Share of the selected neurons that sit in each layer: float64 array [L] summing to 1."""
    mask = _as_mask(mask)
    total = int(mask.sum())
    if total == 0:
        raise ValueError("mask selects no neurons, so it has no layer distribution: check frac / the scores")
    return (mask.sum(1).to(torch.float64) / total).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# comparing whole task x task matrices

def _check_square(matrix, name: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square task x task matrix, got shape {matrix.shape}")
    return matrix


def pattern_persistence(matrix_a, matrix_b, *, n_perm: int = 1000, seed: int = 0, keep_null: bool = False) -> dict:
    """Does the task x task pattern of matrix_a persist in matrix_b (docs/method.md §6: trained vs random-init)?

    rho: Spearman correlation between the off-diagonal entries of the two matrices (the upper
    triangle for symmetric matrices such as overlap matrices; all off-diagonal entries otherwise —
    for symmetric matrices the two give the same rho). Both matrices must list the same tasks in
    the same order.
    p_value: one-sided permutation test of rho > 0 (the pattern persists): the task labels of
    matrix_b are permuted (rows and columns together) n_perm times with a seeded generator, and
    p = (1 + #{rho_perm >= rho}) / (1 + n_perm), so it is never 0 and its floor is 1/(1+n_perm).
    Returns {"rho", "p_value", "n_perm", "n_pairs"}, and with keep_null the permuted rhos ("null" [n_perm]).
    """
    a, b = _check_square(matrix_a, "matrix_a"), _check_square(matrix_b, "matrix_b")
    if a.shape != b.shape:
        raise ValueError(f"matrix_a is {a.shape} but matrix_b is {b.shape}: both must cover the same tasks")
    n_tasks = a.shape[0]
    if n_tasks < 3:
        raise ValueError(f"pattern_persistence needs at least 3 tasks (3 pairs), got {n_tasks}")
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    symmetric = np.allclose(a, a.T, equal_nan=True) and np.allclose(b, b.T, equal_nan=True)
    if symmetric:
        i, j = _upper_pairs(n_tasks)
    else:
        i, j = np.nonzero(~np.eye(n_tasks, dtype=bool))
    if np.isnan(a[i, j]).any() or np.isnan(b[i, j]).any():
        raise ValueError("the matrices contain nan off the diagonal (a task with no selected neurons?): "
                         "drop that task from both matrices first")
    rank_a = stats.rankdata(a[i, j])
    # Permuting labels only reorders the off-diagonal entries, so rank b once and gather.
    rank_b = np.zeros_like(b)
    rank_b[i, j] = stats.rankdata(b[i, j])
    if symmetric:
        rank_b[j, i] = rank_b[i, j]
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.tile(np.arange(n_tasks), (n_perm, 1)), axis=1)   # [n_perm, T]
    permuted = rank_b[perms[:, i], perms[:, j]]                              # [n_perm, n_pairs]
    rho = _corr_rows(rank_a[None, :], rank_b[i, j][None, :])[0]
    rho_perm = _corr_rows(rank_a[None, :], permuted)
    # a constant matrix has no ranking: rho NaN gives p NaN, a NaN permuted rho counts against persistence
    p_value = resample_p(rho_perm, rho_perm >= rho - 1e-12, rho)
    out = {"rho": float(rho), "p_value": float(p_value), "n_perm": int(n_perm), "n_pairs": int(len(i))}
    if keep_null:
        out["null"] = rho_perm
    return out


@dataclass
class RandomInitComparison:
    """Trained vs random-init selections of the same tasks (random_init_comparison); dataclasses.asdict for JSON."""
    trained: np.ndarray             # pairwise overlaps of the trained model's sets (upper triangle, task order)
    random: np.ndarray              # the same for every random seed, pooled
    matrices: dict                  # {"trained": [T, T], "random": [[T, T] per seed]}
    persistence: list               # pattern_persistence of trained vs each seed (None under 3 tasks)
    between_seeds: list             # pattern_persistence between every two seeds
    layers_trained: np.ndarray      # mean share of the selected neurons per layer
    layers_random: np.ndarray

    @property
    def rhos(self) -> list[float]:
        """Each seed's pattern-persistence rho (where defined)."""
        return [p["rho"] for p in self.persistence if p]

    @property
    def between_rhos(self) -> list[float]:
        return [p["rho"] for p in self.between_seeds if p]


def random_init_comparison(trained: Mapping[str, torch.Tensor], randoms: Sequence[Mapping[str, torch.Tensor]], *,
                           n_perm: int = 1000, seed: int = 0) -> RandomInitComparison:
    """Trained vs random-init selections of the same tasks (docs/method.md §6). trained: {task: mask}; randoms: one
    such dict per random seed. Returns the pairwise overlaps (`trained`; `random`: all seeds pooled), the
    pattern persistence of the trained task × task matrix in each seed's (`persistence`, one per seed),
    the persistence between every two seeds' matrices (`between_seeds`: can a random model's pattern be
    told from another seed's?), and the mean layer distribution of each side."""
    _, m_trained = overlap_matrix(trained, metric="overlap")
    m_randoms = [overlap_matrix(r, metric="overlap")[1] for r in randoms]
    i, j = _upper_pairs(len(m_trained))

    def persistence(a, b):
        return pattern_persistence(a, b, n_perm=n_perm, seed=seed) if len(a) >= 3 else None
    return RandomInitComparison(
        trained=m_trained[i, j], random=np.concatenate([m[i, j] for m in m_randoms]),
        matrices={"trained": m_trained, "random": m_randoms},
        persistence=[persistence(m_trained, m) for m in m_randoms],
        between_seeds=[persistence(m_randoms[a], m_randoms[b])
                       for a in range(len(m_randoms)) for b in range(a + 1, len(m_randoms))],
        layers_trained=np.mean([layer_distribution(m) for m in trained.values()], 0),
        layers_random=np.mean([layer_distribution(m) for r in randoms for m in r.values()], 0))


def _corr_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of x [1, n] with each row of y [m, n]."""
    x = x - x.mean(1, keepdims=True)
    y = y - y.mean(1, keepdims=True)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(1) / den


def related_vs_unrelated(matrix, names: Sequence[str], groups: Mapping[str, Sequence[str]]) -> dict:
    """Mean overlap of task pairs in the same group vs pairs in different groups.

    groups: {group: [task, ...]}, e.g. `paper_scores.task_families()`. Tasks of `groups` that are
    not in `names` are ignored (not every score set has every task); tasks of `names` in no group
    are left out of both means and listed under "ungrouped". Returns {"within", "across",
    "n_within", "n_across", "per_group" ({group: mean within}), "ungrouped"}; nan where no pair exists.
    """
    matrix = _check_square(matrix, "matrix")
    names = list(names)
    if len(names) != matrix.shape[0]:
        raise ValueError(f"names lists {len(names)} tasks but the matrix is {matrix.shape}: pass the names "
                         "returned by overlap_matrix")
    group_of: dict[str, str] = {}
    for group, tasks in groups.items():
        for task in tasks:
            if task in group_of:
                raise ValueError(f"task {task!r} is in two groups ({group_of[task]!r} and {group!r}): "
                                 "each task must belong to one group")
            group_of[task] = group
    grouped = [k for k, t in enumerate(names) if t in group_of]
    within, across, per_group = [], [], {}
    for x in grouped:
        for y in grouped:
            if x >= y:
                continue
            # average both triangles so an asymmetric matrix is read symmetrically
            value = 0.5 * (matrix[x, y] + matrix[y, x])
            if group_of[names[x]] == group_of[names[y]]:
                within.append(value)
                per_group.setdefault(group_of[names[x]], []).append(value)
            else:
                across.append(value)
    mean = lambda v: float(np.mean(v)) if v else float("nan")
    return {
        "within": mean(within), "across": mean(across),
        "n_within": len(within), "n_across": len(across),
        "per_group": {g: mean(v) for g, v in per_group.items()},
        "ungrouped": [t for t in names if t not in group_of],
    }

