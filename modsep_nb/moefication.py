"""MoEfication (docs/method.md §7): split each layer's MLP neurons into E equal-size experts.

Three splits, all returning expert ids of shape [d_mlp] (or [L, d_mlp] for a whole model):
- parameter split: balanced k-means on L2-normalised W_in rows (`balanced_kmeans`);
- co-activation split: METIS on a graph of how often two neurons fire together, rebalanced to
  exact sizes (`coactivation_split`);
- random split: a seeded random balanced partition (`random_balanced_split`), the baseline and null.

`expert_routing` measures how good a split is the way MoEfication does: per token keep only the
top-k experts by the sum of |activation| of their neurons, zero the rest. That routing is an oracle (it
reads the true dense activations, so it computes the whole layer): an upper bound on any router.
`fit_router` / `predicted_routing` are the practical counterpart: experts predicted from the layer's input.

Balanced k-means, how it works. Lloyd iterations alternate (a) an assignment of points to clusters
with every cluster holding exactly n/k points and (b) a centroid update. The assignment (a) is a
transportation problem. The reference (`k-means-constrained`) solves it exactly with min-cost flow over
all n x k point-cluster edges on CPU, which takes hours per layer at Mistral scale. We solve it exactly
with a primal-dual method that works on the k cluster nodes only: clusters carry prices, every point
sits in its cheapest cluster (cost + price), and shortest paths between clusters (Bellman-Ford on a
dense k x k matrix) tell which prices to change and which points to move, until the sizes are right.
Prices are warm-started between Lloyd iterations, so later assignments take a few steps. After the
best restart converges, pairwise swaps that lower the inertia *counting the centroid movement* (a
Hartigan-style step, which Lloyd with exact assignments cannot make) are applied until none is left;
this typically ends 1-2% below k-means-constrained. Everything is torch on the input's device, memory
O(n*k).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .batches import run_batches

SPLIT_METHODS = ("param", "coactivation", "random")


# ----------------------------------------------------------------------------- validation

def valid_expert_counts(d_mlp: int) -> list[int]:
    """Every E that splits d_mlp neurons into equal experts (the divisors of d_mlp), ascending."""
    if not isinstance(d_mlp, int) or d_mlp < 1:
        raise ValueError(f"d_mlp must be a positive int, got {d_mlp!r}")
    small = [e for e in range(1, math.isqrt(d_mlp) + 1) if d_mlp % e == 0]
    return sorted(set(small + [d_mlp // e for e in small]))


def check_n_experts(d_mlp: int, n_experts: int) -> int:
    """Return n_experts if it divides d_mlp, else raise a ValueError listing the valid choices."""
    valid = valid_expert_counts(d_mlp)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts not in valid:
        what = "does not divide" if isinstance(n_experts, int) and n_experts >= 1 else "is not a valid expert count for"
        raise ValueError(f"E={n_experts!r} {what} d_mlp={d_mlp}; experts must have equal sizes, "
                         f"valid: {', '.join(map(str, valid))}")
    return n_experts


def check_labels(labels: torch.Tensor, n_experts: int | None = None) -> int:
    """Check a balanced split [.., d_mlp] and return its number of experts."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor of expert ids, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    e = int(labels.max()) + 1 if n_experts is None else n_experts
    if int(labels.min()) < 0 or int(labels.max()) >= e:
        raise ValueError(f"labels must lie in [0, {e}), got range [{int(labels.min())}, {int(labels.max())}]")
    flat = labels.long().reshape(-1, labels.shape[-1])
    counts = torch.zeros(flat.shape[0], e, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    if labels.shape[-1] % e or not bool((counts == labels.shape[-1] // e).all()):
        raise ValueError(f"labels must split {labels.shape[-1]} neurons into {e} experts of exactly "
                         f"{labels.shape[-1] / e:g} each; got sizes from {int(counts.min())} to {int(counts.max())}. "
                         "Use balanced_kmeans, coactivation_split or random_balanced_split to make one")
    return e


# ----------------------------------------------------------------------------- small helpers

def normalize_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero); the parameter split clusters directions."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a float matrix [n_rows, dim], got {w.dtype} of shape {tuple(w.shape)}")
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def random_balanced_split(d_mlp: int, n_experts: int, *, seed: int = 0) -> torch.Tensor:
    """Seeded random balanced partition: labels [d_mlp], every expert exactly d_mlp/n_experts neurons."""
    check_n_experts(d_mlp, n_experts)
    g = torch.Generator().manual_seed(seed)
    labels = torch.empty(d_mlp, dtype=torch.long)
    labels[torch.randperm(d_mlp, generator=g)] = torch.arange(d_mlp) // (d_mlp // n_experts)
    return labels


def inertia(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances of the rows of x to the mean of their cluster (float64)."""
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"need x [n, dim] and labels [n]; got {tuple(x.shape)} and {tuple(labels.shape)}")
    x = x.detach().to(torch.float64)
    labels = labels.to(x.device).long()
    k = int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, k).to(torch.float64)    # matmul: deterministic, unlike index_add
    means = (onehot.T @ x) / onehot.sum(0).clamp_min(1)[:, None]
    return float(((x - means[labels]) ** 2).sum())


def _sq_dist_shifted(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """||c||^2 - 2 x.c  [n, k]: the squared distance minus the per-row constant ||x||^2,
    which changes no assignment and saves a pass."""
    return (centres * centres).sum(1)[None, :] - 2.0 * (x @ centres.T)


def _balanced_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means for a balanced labelling: sort by label and average blocks of m rows.
    (Deterministic on GPU, unlike index_add's atomics.)"""
    order = torch.sort(labels, stable=True).indices
    return x[order].view(k, x.shape[0] // k, x.shape[1]).mean(1)


# ----------------------------------------------------------------------------- balanced assignment

def balanced_assignment(cost: torch.Tensor, size: int, *, prices: torch.Tensor | None = None,
                        max_iter: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign n points to k clusters, exactly `size` each, minimising sum cost[i, label[i]] (exactly).

    Primal-dual successive shortest paths on the k-node graph of clusters (see `_ssp_step`).
    Returns (labels [n], prices [k]); pass the prices back as a warm start when the costs change a
    little, as between Lloyd iterations: then only a few points have to move.
    """
    n, k = cost.shape
    if n != k * size:
        raise ValueError(f"cost has {n} rows but {k} clusters x size {size} = {k * size}")
    cost = cost.detach()
    dev = cost.device
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(1, dtype=cost.dtype, device=dev)
    prices = torch.zeros(k, dtype=cost.dtype, device=dev) if prices is None else prices.to(cost).clone()
    # Invariant: every point sits in a cluster minimising cost + price ("happy"). Then the
    # assignment is optimal for its own cluster sizes, and moving happy points along shortest paths
    # from over-full to under-full clusters keeps it so until the sizes are right.
    labels = torch.argmin(cost + prices[None, :], dim=1)
    for _ in range(max_iter):
        excess = torch.bincount(labels, minlength=k) - size
        if not bool(excess.any()):
            return labels, prices
        labels, prices = _ssp_step(cost, labels, prices, excess)
    raise RuntimeError(f"balanced assignment did not converge in {max_iter} steps (costs contain NaN or inf?)")


def _ssp_step(cost, labels, prices, excess):
    """One primal-dual step: shortest paths from over-full to under-full clusters, then move one
    point along every edge of a set of edge-disjoint tree paths.

    Edge a->b costs the cheapest extra (cost + price) of moving a point of a to b (>= 0 for happy
    points). Lowering prices by the distances d makes every tree edge free (reduced cost 0) while
    keeping every other edge >= 0, so moving the tree edges' points keeps everyone happy."""
    n, k = cost.shape
    dev = cost.device
    r = cost + prices[None, :]
    extra = (r - r.gather(1, labels[:, None])).clamp_min(0)               # [n, k]
    w = torch.full((k, k), float("inf"), dtype=cost.dtype, device=dev)
    w = w.scatter_reduce(0, labels[:, None].expand(n, k), extra, "amin")  # [k, k] edge costs
    # multi-source Bellman-Ford from the over-full clusters (edge costs >= 0, short paths)
    inf = float("inf")
    d = torch.where(excess > 0, torch.zeros_like(prices), torch.full_like(prices, inf))
    pred = torch.full((k,), -1, dtype=torch.long, device=dev)
    for _ in range(k):
        cand, via = (d[:, None] + w).min(0)
        better = cand < d
        if not bool(better.any()):
            break
        d = torch.where(better, cand, d)
        pred = torch.where(better, via, pred)
    cap = d[torch.isfinite(d)].max()
    prices = prices - torch.minimum(d, cap)
    # route one unit to each under-full cluster along its tree path; skip paths that reuse an edge
    # (its free point is taken), a source with no excess left, or a point another path moves
    pred_c, excess_c, d_c = pred.tolist(), excess.tolist(), d.tolist()
    left = {a: e for a, e in enumerate(excess_c) if e > 0}
    used, paths = set(), []
    for t in sorted((t for t in range(k) if excess_c[t] < 0), key=lambda t: (d_c[t], t)):
        path, b = [], t
        while pred_c[b] >= 0:
            path.append((pred_c[b], b))
            b = pred_c[b]
        if left[b] <= 0 or any(e in used for e in path):
            continue
        left[b] -= 1
        used.update(path)
        paths.append(path)
    edges = [e for path in paths for e in path]
    src = torch.tensor([a for a, _ in edges], device=dev)
    dst = torch.tensor([b for _, b in edges], device=dev)
    # the free point of edge a->b: the first point of a whose extra cost to b is the minimum
    free = (labels[:, None] == src[None, :]) & (extra[:, dst] == w[src, dst][None, :])
    movers = free.to(torch.int8).argmax(0).tolist()
    taken, move_pts, move_dst = set(), [], []
    i = 0
    for path in paths:
        pts = movers[i:i + len(path)]
        if not taken.intersection(pts):      # points on one path differ (its clusters differ)
            taken.update(pts)
            move_pts += pts
            move_dst += [b for _, b in path]
        i += len(path)
    labels = labels.clone()
    labels[torch.tensor(move_pts, device=dev)] = torch.tensor(move_dst, device=dev)
    return labels, prices


# ----------------------------------------------------------------------------- balanced k-means

# Above this many multiply-adds per distance matrix (n · dim · k) a layer is "large" (Mistral: 7.5e9,
# SmolLM2: 4e7): there restarts and refinement change the inertia by well under 1% but cost minutes on a CPU.
LARGE_PROBLEM = 1e9


def balanced_kmeans(x: torch.Tensor, n_clusters: int, *, seed: int = 0, device=None, n_init: int | str = "auto",
                    max_iter: int = 100, tol: float = 1e-4, refine: bool | str = "auto",
                    return_inertia: bool = False):
    """Balanced k-means: labels [n] (LongTensor on `device`) with exactly n/n_clusters rows each.

    `n_init` restarts of k-means++ initialisation and Lloyd iterations with an exact balanced
    assignment; the restart with the lowest inertia is then (refine=True) improved by pairwise swaps
    that lower the inertia counting the centroid movement. Without refine the result matches
    k-means-constrained's inertia; refine typically takes it 0.5-2% lower and costs several times
    the Lloyd time. Rows are used as given (for the parameter split pass `normalize_rows(W_in)`).
    Runs in float64 on `device` (default: x's device; e.g. "cuda"). Deterministic for a seed on a
    given device. tol: a restart stops when its centroids move less than tol * (mean per-feature
    variance of x), summed over centroids (as scikit-learn / k-means-constrained).
    return_inertia=True returns (labels, inertia).
    n_init="auto" is 4, and refine="auto" is True, except for a large layer (n · dim · k > LARGE_PROBLEM, e.g.
    Mistral-7B's 14336 × 4096 with 128 experts): there 1 restart of plain k-means++ without refinement is
    the default, since restarts and refinement change the inertia by well under 1% at minutes of cost.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix [n_rows, dim], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n % n_clusters:
        raise ValueError(f"n_clusters={n_clusters} does not divide the {n} rows, so clusters cannot have "
                         f"equal sizes; valid: {', '.join(map(str, valid_expert_counts(n)))}")
    large = n * x.shape[1] * n_clusters > LARGE_PROBLEM
    if n_init == "auto":        # 4 restarts, or 1 for a large layer
        n_init = 1 if large else 4
    if refine == "auto":        # swap refinement, except for a large layer
        refine = not large
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            extra = " or 'auto'" if name == "n_init" else ""
            raise ValueError(f"{name} must be a whole number >= 1{extra}, got {value!r}")
    if not isinstance(refine, bool):
        raise ValueError(f"refine must be True, False or 'auto', got {refine!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    dev = torch.device(device) if device is not None else x.device
    x = x.detach().to(dev, torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; clean the weights (or drop those rows) first")
    k = n_clusters
    if k == 1 or k == n:
        labels = torch.zeros(n, dtype=torch.long, device=dev) if k == 1 else torch.arange(n, device=dev)
        return (labels, inertia(x, labels)) if return_inertia else labels
    tol_abs = tol * float(x.var(0).mean())
    g = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, float("inf")
    for _ in range(n_init):
        labels = _lloyd(x, _kmeans_pp(x, k, g, trials=1 if large else None), max_iter, tol_abs)
        value = _inertia_balanced(x, labels, k)
        if value < best_inertia:
            best_labels, best_inertia = labels, value
    if refine:      # only the best restart: refining every one costs n_init times more for ~0.05%
        best_labels = _refine(x, best_labels, k, max_iter, tol_abs)
        best_inertia = _inertia_balanced(x, best_labels, k)
    return (best_labels, best_inertia) if return_inertia else best_labels


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator, trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): each new centre is the best of 2+log(k) D^2 samples
    (`trials`; 1 is plain k-means++). Random numbers come from the CPU generator, so the choice does
    not depend on the device."""
    n = x.shape[0]
    trials = trials or 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=g))
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[0] = first
    closest = (x_sq + x_sq[first] - 2.0 * (x @ x[first])).clamp_min(0)
    u = torch.rand(k, trials, generator=g, dtype=torch.float64).to(x.device)
    for c in range(1, k):
        cum = torch.cumsum(closest, 0)
        cand = torch.searchsorted(cum, u[c] * cum[-1]).clamp_max(n - 1)
        dist = (x_sq[cand][:, None] + x_sq[None, :] - 2.0 * (x[cand] @ x.T)).clamp_min(0)
        dist = torch.minimum(dist, closest[None, :])
        best = torch.argmin(dist.sum(1))
        idx[c] = cand[best]
        closest = dist[best]
    return x[idx].clone()


def _lloyd(x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol_abs: float) -> torch.Tensor:
    """Lloyd iterations with exact balanced assignments (prices warm-started between them)."""
    k = centres.shape[0]
    m = x.shape[0] // k
    labels, prices = None, None
    for _ in range(max_iter):
        new_labels, prices = balanced_assignment(_sq_dist_shifted(x, centres), m, prices=prices)
        new_centres = _balanced_means(x, new_labels, k)
        shift = float(((new_centres - centres) ** 2).sum())
        done = labels is not None and bool(torch.equal(new_labels, labels))
        labels, centres = new_labels, new_centres
        if done or shift <= tol_abs:
            break
    return labels


def _refine(x: torch.Tensor, labels: torch.Tensor, k: int, max_iter: int, tol_abs: float,
            max_passes: int = 2000) -> torch.Tensor:
    """Improving swaps until none is left, then Lloyd; again until Lloyd changes nothing."""
    passes = 0
    while passes < max_passes:
        swapped = 0
        while passes < max_passes:
            labels, n_swaps = _swap_pass(x, labels, k)
            passes += 1
            swapped += n_swaps
            if n_swaps == 0:
                break
        if swapped == 0:
            break
        new = _lloyd(x, _balanced_means(x, labels, k), max_iter, tol_abs)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _swap_pass(x: torch.Tensor, labels: torch.Tensor, k: int, n_cand: int = 4,
               chunk: int = 1024, multi_ok: bool = True) -> tuple[torch.Tensor, int]:
    """Apply the best improving swap for as many disjoint cluster pairs as possible.

    Swapping i (in a) and j (in b) between clusters of m points changes the inertia by
        g_i(a->b) + g_j(b->a) - 2 |x_i - x_j|^2 / m,
    with g_i(a->b) = |x_i - c_b|^2 - |x_i - c_a|^2 (fixed centroids); the last term is the centroids
    following their points, which is why swaps help after Lloyd (with exact assignments) has stopped.
    Candidates: per cluster pair, the n_cand points of each side with the smallest g."""
    n = x.shape[0]
    m = n // k
    dev = x.device
    centres = _balanced_means(x, labels, k)
    cost = _sq_dist_shifted(x, centres)
    grp = torch.sort(labels, stable=True).indices.view(k, m)                # points of each cluster
    g = cost[grp] - cost[grp, torch.arange(k, device=dev)[:, None]][..., None]   # [k, m, k]
    t = min(n_cand, m)
    gv, gi = g.topk(t, dim=1, largest=False)                               # [k, t, k]
    x_sq = (x * x).sum(1)
    bound = 8.0 * float(x_sq.max()) / m                 # |x_i - x_j|^2 <= 4 max|x|^2
    a_idx, b_idx = torch.triu_indices(k, k, 1, device=dev)
    maybe = (gv[a_idx, 0, b_idx] + gv[b_idx, 0, a_idx]) < bound
    a_idx, b_idx = a_idx[maybe], b_idx[maybe]
    best_gain, best_i, best_j = [], [], []
    for s in range(0, len(a_idx), chunk):                # bounded memory: chunk * t * dim
        a, b = a_idx[s:s + chunk], b_idx[s:s + chunk]
        pi = grp[a[:, None], gi[a, :, b]]                                  # [P, t] candidates in a
        pj = grp[b[:, None], gi[b, :, a]]                                  # [P, t] candidates in b
        d2 = x_sq[pi][:, :, None] + x_sq[pj][:, None, :] - 2.0 * torch.bmm(x[pi], x[pj].transpose(1, 2))
        delta = gv[a, :, b][:, :, None] + gv[b, :, a][:, None, :] - 2.0 * d2.clamp_min(0) / m
        val, flat = delta.flatten(1).min(1)
        best_gain.append(val)
        best_i.append(pi.gather(1, (flat // t)[:, None]).squeeze(1))
        best_j.append(pj.gather(1, (flat % t)[:, None]).squeeze(1))
    if not best_gain:
        return labels, 0
    gain, bi, bj = torch.cat(best_gain), torch.cat(best_i), torch.cat(best_j)
    # ignore float noise: an improvement must beat 1e-12 of the typical squared distance
    good = gain < -1e-12 * max(float(x_sq.mean()), 1e-300)
    order = torch.argsort(gain[good], stable=True)
    rows = torch.stack([a_idx[good][order], b_idx[good][order], bi[good][order], bj[good][order]], 1).tolist()
    gains = gain[good][order].tolist()
    # Two greedy selections, best gains first. `single`: each cluster in at most one swap, so the
    # gains add up exactly. `multi`: each point at most once; swaps sharing a cluster interact
    # through its centroid, so its inertia is measured and it is kept only if it beats `single`.
    busy, moved, single, multi, single_gain = set(), set(), [], [], 0.0
    for (a, b, i, j), gn in zip(rows, gains):
        if a not in busy and b not in busy:
            busy.update((a, b))
            single.append((i, j, a, b))
            single_gain += gn
        if i not in moved and j not in moved:
            moved.update((i, j))
            multi.append((i, j, a, b))
    if not single:
        return labels, 0
    current = _inertia_balanced(x, labels, k) if multi_ok else 0.0
    best = _apply_swaps(labels, single, dev)
    if multi_ok and len(multi) > len(single):
        candidate = _apply_swaps(labels, multi, dev)
        if _inertia_balanced(x, candidate, k) < current + single_gain:
            return candidate, len(multi)
    return best, len(single)


def _apply_swaps(labels, swaps, dev):
    sw = torch.tensor(swaps, device=dev)
    labels = labels.clone()
    labels[sw[:, 0]] = sw[:, 3]
    labels[sw[:, 1]] = sw[:, 2]
    return labels


def _inertia_balanced(x, labels, k):
    """Inertia of a balanced labelling, on x's device (float64)."""
    return float(((x - _balanced_means(x, labels, k)[labels]) ** 2).sum())


# ----------------------------------------------------------------------------- co-activation split

def active_matrix(acts: torch.Tensor, *, threshold: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """Bool [n_tokens, d_mlp]: which neurons count as active on each token.

    threshold given: |x| > threshold. Otherwise the top_k neurons by |x| on each token
    (default top_k = d_mlp // 10), so every token contributes the same number of co-activations."""
    if acts.dim() != 2:
        raise ValueError(f"acts must be [n_tokens, d_mlp] for one layer, got shape {tuple(acts.shape)}")
    a = acts.detach().abs()
    if threshold is not None:
        if top_k is not None:
            raise ValueError("give either threshold or top_k, not both")
        return a > threshold
    d = a.shape[1]
    k = max(1, d // 10) if top_k is None else top_k
    if not 1 <= k <= d:
        raise ValueError(f"top_k must be between 1 and d_mlp={d}, got {k}")
    active = torch.zeros_like(a, dtype=torch.bool)
    return active.scatter_(1, a.float().topk(k, dim=1).indices, True)


def coactivation_graph(acts: torch.Tensor, *, threshold: float | None = None,
                       top_k: int | None = None) -> torch.Tensor:
    """Co-activation counts [d_mlp, d_mlp] (int64): entry (i, j) = number of tokens on which neurons
    i and j are both active (see `active_matrix`); zero diagonal. Pass a bounded sample of tokens."""
    a = active_matrix(acts, threshold=threshold, top_k=top_k)
    # float32 sums of 0/1 products are exact below 2^24 tokens; beyond that use float64
    dtype = torch.float32 if a.shape[0] < 2 ** 24 else torch.float64
    af = a.to(dtype)
    graph = (af.T @ af).round().long()
    graph.fill_diagonal_(0)
    return graph


def coactivation_split(acts: torch.Tensor, n_experts: int, *, seed: int = 0, threshold: float | None = None,
                       top_k: int | None = None, max_degree: int | None = None) -> torch.Tensor:
    """Co-activation split of one layer: labels [d_mlp] (CPU LongTensor), exactly d_mlp/n_experts each.

    METIS (pymetis) partitions the co-activation graph (edge weight = tokens on which both neurons are
    active) into n_experts parts, seeded; `rebalance_partition` then moves neurons deterministically
    until every part has exactly d_mlp/n_experts neurons (METIS allows a few % imbalance and can
    leave parts empty).
    max_degree: keep only each neuron's max_degree heaviest edges (an edge stays if either end keeps
    it) before METIS; needed at Mistral scale, where the full graph has ~10^8 edges. The rebalance
    always uses the full graph."""
    import pymetis

    graph = coactivation_graph(acts, threshold=threshold, top_k=top_k).cpu()
    d = graph.shape[0]
    check_n_experts(d, n_experts)
    if n_experts == 1:
        return torch.zeros(d, dtype=torch.long)
    sparse = graph if max_degree is None else _keep_heaviest(graph, max_degree)
    rows, cols = torch.nonzero(sparse, as_tuple=True)        # row-major: CSR order
    if rows.numel() > _MAX_METIS_EDGES:
        raise ValueError(f"the co-activation graph has {rows.numel():,} directed edges, too many for METIS "
                         f"via Python; pass max_degree (e.g. 128) to keep each neuron's heaviest edges")
    if rows.numel() == 0:                                      # no co-activation at all: nothing to cut
        parts = torch.zeros(d, dtype=torch.long)
    else:
        weights = sparse[rows, cols]
        # METIS sums weights in 32-bit integers: scale big counts down, keeping every edge >= 1
        total = int(weights.sum())
        if total > 2 ** 28:
            weights = (weights.double() * (2 ** 28 / total)).round().clamp_min(1).long()
        xadj = torch.zeros(d + 1, dtype=torch.long)
        xadj[1:] = torch.cumsum(torch.bincount(rows, minlength=d), 0)
        opts = pymetis.Options()
        opts.seed = int(seed) % (2 ** 31)
        starts, adjacent = xadj.int().numpy(), cols.int().numpy()
        if hasattr(pymetis, "CSRAdjacency"):          # pymetis >= 2025.2; xadj/adjncy is deprecated
            graph_arg = dict(adjacency=pymetis.CSRAdjacency(starts, adjacent))
        else:
            graph_arg = dict(xadj=starts, adjncy=adjacent)
        _, membership = pymetis.part_graph(n_experts, **graph_arg, eweights=weights.int().numpy(), options=opts)
        parts = torch.tensor(membership, dtype=torch.long)
    return rebalance_partition(graph, parts, n_experts)


_MAX_METIS_EDGES = 50_000_000


def _keep_heaviest(graph: torch.Tensor, max_degree: int) -> torch.Tensor:
    """Zero all edges except each node's max_degree heaviest (ties: lower index), kept symmetric."""
    if max_degree < 1:
        raise ValueError(f"max_degree must be >= 1, got {max_degree}")
    order = torch.sort(graph, dim=1, descending=True, stable=True).indices[:, :max_degree]
    keep = torch.zeros_like(graph, dtype=torch.bool).scatter_(1, order, True)
    keep |= keep.T.clone()
    return torch.where(keep, graph, torch.zeros_like(graph))


def rebalance_partition(graph: torch.Tensor, parts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Move neurons from over-full to under-full parts until each has exactly d/n_experts.

    One neuron per step: among neurons of over-full parts and all under-full parts (empty ones
    included), the move with the largest (weight to the receiving part) - (weight to its own part),
    i.e. the neuron most weakly tied to where it is and most strongly to where it goes; ties go to
    the lowest neuron index, then the lowest part. Deterministic."""
    d = graph.shape[0]
    check_n_experts(d, n_experts)
    if graph.shape != (d, d):
        raise ValueError(f"graph must be square [d_mlp, d_mlp], got {tuple(graph.shape)}")
    if parts.shape != (d,) or int(parts.min()) < 0 or int(parts.max()) >= n_experts:
        raise ValueError(f"parts must be [d_mlp={d}] with ids in [0, {n_experts}), got shape "
                         f"{tuple(parts.shape)} and range [{int(parts.min())}, {int(parts.max())}]")
    m = d // n_experts
    g = graph.to(torch.float64)
    parts = parts.long().clone().to(g.device)
    conn = g @ torch.nn.functional.one_hot(parts, n_experts).to(torch.float64)      # [d, E] tie strength
    size = torch.bincount(parts, minlength=n_experts)
    rows = torch.arange(d, device=g.device)
    while bool((size > m).any()):
        gain = conn - conn[rows, parts][:, None]
        ok = (size[parts] > m)[:, None] & (size < m)[None, :]
        gain = torch.where(ok, gain, torch.full_like(gain, -float("inf")))
        flat = int(torch.argmax(gain.flatten()))       # argmax returns the first maximum: lowest index
        i, dst = divmod(flat, n_experts)
        src = int(parts[i])
        conn[:, src] -= g[:, i]
        conn[:, dst] += g[:, i]
        size[src] -= 1
        size[dst] += 1
        parts[i] = dst
    return parts.cpu()


# ----------------------------------------------------------------------------- routing quality

@contextlib.contextmanager
def expert_routing(handle, labels_per_layer: torch.Tensor, k: int) -> Iterator[None]:
    """Inside the context, every layer keeps only its top-k experts per token (MoEfication's
    ground-truth routing): an expert's score is the sum of |activation| over its neurons; the
    neurons of the other experts are zeroed. labels_per_layer: [n_layers, d_mlp] expert ids, equal
    sizes. Forward-pre-hooks on each layer's neuron module, removed on exit. An oracle: it reads the true
    dense activations, so it bounds any router from above (see predicted_routing for a practical one)."""
    n_experts = _check_routing_labels(handle, labels_per_layer)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_experts:
        raise ValueError(f"k must be an int number of experts to keep, between 1 and {n_experts}; got {k!r}")
    with handle.hooks({layer: _routing_fn(labels_per_layer[layer].long(), n_experts, k)
                       for layer in range(handle.n_layers)}):
        yield


def _routing_fn(labels: torch.Tensor, n_experts: int, k: int):
    group = torch.sort(labels, stable=True).indices      # neuron order that groups each expert
    cache: dict = {}

    def routed(x):
        if x.device not in cache:
            cache[x.device] = (group.to(x.device), labels.to(x.device))
        grp, lab = cache[x.device]
        keep = _top_k_experts(_expert_scores(x, grp, n_experts), k)
        return x * keep.index_select(-1, lab).to(x.dtype)

    return routed


def _expert_scores(x: torch.Tensor, group: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each expert's score, the sum of |activation| over its neurons: [..., d_mlp] -> [..., E] (float32).
    group: the neuron order that lists each expert's neurons together (a stable sort of the labels)."""
    return x.index_select(-1, group).abs().unflatten(-1, (n_experts, -1)).float().sum(-1)


def _top_k_experts(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [..., E]: the k highest-scoring experts of each token."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


# ----------------------------------------------------------------------------- a learned router
# The routing above is an oracle: it picks experts from the layer's true dense activations, so it computes
# the full layer and bounds any router from above. The practical counterpart (MoEfication's) predicts the
# experts from the layer's input alone: here a linear (ridge) predictor of each expert's score per layer,
# fitted on one set of tokens and scored on held-out ones.

@dataclass
class Router:
    """Per layer, a linear predictor of each expert's score (sum of |activation| of its neurons) from the
    MLP's input hidden state. weights [n_layers, d_model + 1, E] (float64; the last row is the intercept);
    labels [n_layers, d_mlp] the expert split it was fitted for."""
    weights: torch.Tensor
    labels: torch.Tensor

    @property
    def n_experts(self) -> int:
        return self.weights.shape[-1]

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted expert scores [..., E] (float32) of MLP inputs x [..., d_model]."""
        w = self.weights[layer].to(x.device, torch.float32)
        return x.float() @ w[:-1] + w[-1]


class _LayerPairs:
    """Hooks that hand `on_pair(layer, inputs [n, d_model], neurons [n, d_mlp])` the MLP input and the neuron
    vector of every counted token, as run_batches sets `positions` (bool [batch, seq], or None for all)."""

    def __init__(self, handle, on_pair):
        self.handle, self.on_pair, self.positions, self._inputs = handle, on_pair, None, {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return flat if self.positions is None else flat[self.positions.to(x.device).reshape(-1)]

    @contextlib.contextmanager
    def hooked(self):
        layers = range(self.handle.n_layers)
        keep = {layer: (lambda x, layer=layer: self._inputs.__setitem__(layer, self._rows(x))) for layer in layers}
        pair = {layer: (lambda x, layer=layer: self.on_pair(layer, self._inputs.pop(layer), self._rows(x)))
                for layer in layers}
        with self.handle.hooks(keep, at="mlp_input"), self.handle.hooks(pair):
            yield self


def fit_router(handle, data, labels_per_layer: torch.Tensor, *, ridge: float = 1e-3, max_tokens=None,
               batch_size=None, ctx=256, progress=False) -> Router:
    """Fit a Router on `data` (documents or images, run as by collect_stats): per layer a ridge regression
    of the expert scores on [MLP input, 1], from X'X and X'Y accumulated in float64 over the counted tokens
    (memory (d_model + 1)^2 per layer, whatever the number of tokens). The penalty is ridge × the mean
    squared input coordinate × n_tokens (scale-free; the intercept is not penalised)."""
    n_experts = _check_routing_labels(handle, labels_per_layer)
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (a small relative penalty such as 1e-3), got {ridge}")
    groups = [torch.sort(row.long(), stable=True).indices for row in labels_per_layer]
    gram, cross = {}, {}

    def add(layer, inputs, neurons):
        x = torch.cat([inputs.double(), inputs.new_ones(len(inputs), 1, dtype=torch.float64)], 1)
        y = _expert_scores(neurons, groups[layer].to(neurons.device), n_experts).double()
        gram[layer] = gram.get(layer, 0) + x.T @ x
        cross[layer] = cross.get(layer, 0) + x.T @ y
    with _LayerPairs(handle, add).hooked() as pairs:
        run_batches(handle, data, pairs, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx, progress=progress,
                    desc="router")
    if not gram:
        raise ValueError("no tokens were counted: the data is empty")
    weights = torch.stack([_ridge_solve(gram[layer].cpu(), cross[layer].cpu(), ridge)
                           for layer in range(handle.n_layers)])
    return Router(weights, labels_per_layer.long().cpu())


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W |XW - Y|^2 + lam |W[:-1]|^2 from gram = X'X and cross = X'Y, X's last column all ones."""
    d = gram.shape[0] - 1
    lam = ridge * float(gram.diagonal()[:d].mean())
    penalty = torch.ones(d + 1, dtype=gram.dtype)
    penalty[-1] = 0.0
    return torch.linalg.solve(gram + torch.diag(lam * penalty), cross)


def _check_routing_labels(handle, labels_per_layer: torch.Tensor) -> int:
    expected = (handle.n_layers, handle.d_mlp)
    if tuple(labels_per_layer.shape) != expected:
        raise ValueError(f"labels_per_layer has shape {tuple(labels_per_layer.shape)} but the model has "
                         f"[n_layers, d_mlp] = {list(expected)}; make it with split_layers(handle, ...)")
    return check_labels(labels_per_layer)


def _check_router(handle, router: Router, k: int) -> None:
    _check_routing_labels(handle, router.labels)
    d_model = handle.w_in(0).shape[1]
    if router.weights.shape[:2] != (handle.n_layers, d_model + 1):
        raise ValueError(f"the router's weights {tuple(router.weights.shape)} do not fit this model "
                         f"([n_layers, d_model + 1] = {[handle.n_layers, d_model + 1]}): fit it on this model")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= router.n_experts:
        raise ValueError(f"k must be an int number of experts to keep, between 1 and {router.n_experts}; got {k!r}")


@contextlib.contextmanager
def predicted_routing(handle, router: Router, k: int) -> Iterator[None]:
    """Like expert_routing, but each token's top-k experts are the router's prediction from the MLP's
    input (known before the layer is computed) instead of the true activations. Hooks removed on exit."""
    _check_router(handle, router, k)
    chosen: dict = {}
    labels = {}

    def choose(layer):
        def fn(x):
            chosen[layer] = _top_k_experts(router.predict(layer, x), k)
        return fn

    def apply(layer):
        def fn(x):
            if x.device not in labels:
                labels[x.device] = router.labels.to(x.device)
            return x * chosen.pop(layer).index_select(-1, labels[x.device][layer]).to(x.dtype)
        return fn
    layers = range(handle.n_layers)
    with handle.hooks({layer: choose(layer) for layer in layers}, at="mlp_input"), \
            handle.hooks({layer: apply(layer) for layer in layers}):
        yield


@torch.no_grad()
def router_agreement(handle, router: Router, data, k: int, *, max_tokens=None, batch_size=None, ctx=256,
                     progress=False) -> torch.Tensor:
    """Per layer [n_layers] (float64), the mean over counted tokens of the fraction of the oracle's top-k
    experts (from the true activations) that the router also picks; both read from the dense forward,
    so layer l's number does not depend on routing elsewhere. 1 = the router matches the oracle."""
    _check_router(handle, router, k)
    groups = [torch.sort(row, stable=True).indices for row in router.labels]
    hits = torch.zeros(handle.n_layers, dtype=torch.float64)
    counts = torch.zeros(handle.n_layers, dtype=torch.float64)

    def add(layer, inputs, neurons):
        true = _top_k_experts(_expert_scores(neurons, groups[layer].to(neurons.device), router.n_experts), k)
        pred = _top_k_experts(router.predict(layer, inputs), k)
        hits[layer] += float((true & pred).sum()) / k
        counts[layer] += len(inputs)
    with _LayerPairs(handle, add).hooked() as pairs:
        run_batches(handle, data, pairs, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx, progress=progress,
                    desc="router agreement")
    return hits / counts


# ----------------------------------------------------------------------------- whole model

def layer_inertias(handle, labels: torch.Tensor) -> np.ndarray:
    """Per layer, the inertia of the L2-normalised W_in rows under `labels` [n_layers, d_mlp], per neuron."""
    return np.array([inertia(normalize_rows(handle.w_in(layer).double()), labels[layer]) / handle.d_mlp
                     for layer in range(handle.n_layers)])


def layer_seeds(seed: int, n_layers: int) -> list[int]:
    """Independent per-layer seeds derived from one seed (layers must not share a random stream)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** 31 - 1, (n_layers,), generator=g).tolist()


def split_layers(handle, method: str, n_experts: int, *, seed: int = 0, acts: Sequence[torch.Tensor] | None = None,
                 device=None, progress: bool = True, **kwargs) -> torch.Tensor:
    """Expert labels [n_layers, d_mlp] (CPU LongTensor) for every layer of a model.

    method: "param" (balanced_kmeans on normalize_rows(handle.w_in(layer)); kwargs go to
    balanced_kmeans, device defaults to the weights' device), "coactivation" (needs `acts`, one
    [n_tokens, d_mlp] sample per layer; kwargs threshold / top_k) or "random"."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method {method!r}: choose one of {', '.join(SPLIT_METHODS)}")
    d, n_layers = handle.d_mlp, handle.n_layers
    check_n_experts(d, n_experts)
    if method == "coactivation":
        if acts is None or len(acts) != n_layers:
            raise ValueError(f"method='coactivation' needs acts: a list of {n_layers} tensors [n_tokens, {d}], "
                             "one activation sample per layer")


    seeds = layer_seeds(seed, n_layers)
    out = torch.empty(n_layers, d, dtype=torch.long)
    for layer in tqdm(range(n_layers), desc=f"{method} split", disable=not progress):
        if method == "param":
            w = handle.w_in(layer)
            out[layer] = balanced_kmeans(normalize_rows(w.detach().to(torch.float64)), n_experts,
                                         seed=seeds[layer], device=device or w.device, **kwargs).cpu()
        elif method == "coactivation":
            out[layer] = coactivation_split(acts[layer], n_experts, seed=seeds[layer], **kwargs)
        else:
            out[layer] = random_balanced_split(d, n_experts, seed=seeds[layer])
    return out


def split_agreement(labels_a, labels_b) -> "np.ndarray":
    """Per-layer adjusted Rand index between two splits [n_layers, d_mlp] (e.g. parameter vs
    co-activation, or one method under two seeds): float64 array [n_layers]. 1 means the same
    partition up to renaming the experts; about 0 is what two independent random splits give."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    a, b = (torch.as_tensor(x) for x in (labels_a, labels_b))
    for name, x in (("labels_a", a), ("labels_b", b)):
        if x.dim() != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be integer expert ids of shape [n_layers, d_mlp] (as split_layers "
                             f"returns), got dtype {x.dtype} and shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"labels_a has shape {tuple(a.shape)} but labels_b has {tuple(b.shape)}: "
                         "both splits must cover the same layers and neurons")
    a, b = a.cpu().numpy(), b.cpu().numpy()
    return np.array([adjusted_rand_score(x, y) for x, y in zip(a, b)], dtype=np.float64)
