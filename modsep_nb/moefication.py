"""MoEfication (SPEC §7): split each layer's MLP neurons into E equal-size experts.

Three splits, all returning expert ids of shape [d_mlp] (or [L, d_mlp] for a whole model):
- parameter split: balanced k-means on L2-normalised W_in rows (`balanced_kmeans`);
- co-activation split: METIS on a graph of how often two neurons fire together, rebalanced to
  exact sizes (`coactivation_split`);
- random split: a seeded random balanced partition (`random_balanced_split`), the baseline and null.

`expert_routing` measures how good a split is the way MoEfication does: per token keep only the
top-k experts by the sum of |activation| of their neurons, zero the rest.

Balanced k-means, how it works. Lloyd iterations alternate (a) an assignment of points to clusters
with every cluster holding exactly n/k points and (b) a centroid update. The assignment (a) is a
transportation problem. The reference (`k-means-constrained`) solves it exactly with min-cost flow on
CPU, which takes hours per layer at Mistral scale. We solve it with a vectorised Jacobi auction
(Bertsekas): clusters carry prices, every unassigned point bids for its best cluster, each cluster
keeps its n/k highest bids. With bid increment eps the result is within about n*eps of the optimal
assignment; eps-scaling keeps the number of rounds small and prices are warm-started between Lloyd
iterations. After Lloyd converges, pairwise swaps between clusters that lower the inertia *including
the centroid movement* (a Hartigan-style step, which exact-assignment Lloyd cannot make) are applied
until none is left. Everything is torch on the input's device, memory O(n*k + k*m*d).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

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


def _check_labels(labels: torch.Tensor, n_experts: int | None = None) -> int:
    """Check a balanced split [.., d_mlp] and return its number of experts."""
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor of expert ids, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    e = int(labels.max()) + 1 if n_experts is None else n_experts
    if int(labels.min()) < 0 or int(labels.max()) >= e:
        raise ValueError(f"labels must lie in [0, {e}), got range [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.nn.functional.one_hot(labels.long().reshape(-1, labels.shape[-1]), e).sum(-2)
    if not bool((counts == labels.shape[-1] // e).all()) or labels.shape[-1] % e:
        raise ValueError(f"labels must split {labels.shape[-1]} neurons into {e} experts of exactly "
                         f"{labels.shape[-1] / e:g} each; got sizes from {int(counts.min())} to {int(counts.max())}. "
                         "Use balanced_kmeans, coactivation_split or random_balanced_split to make one")
    return e


# ----------------------------------------------------------------------------- small helpers

def normalize_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero); the parameter split clusters directions."""
    if w.dim() != 2:
        raise ValueError(f"expected a matrix [n_rows, dim], got shape {tuple(w.shape)}")
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny if w.is_floating_point() else 1e-30)


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


# ----------------------------------------------------------------------------- balanced assignment (auction)

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

def balanced_kmeans(x: torch.Tensor, n_clusters: int, *, seed: int = 0, device=None, n_init: int = 4,
                    max_iter: int = 100, tol: float = 1e-4, refine: bool = True,
                    return_inertia: bool = False):
    """Balanced k-means: labels [n] (LongTensor on x's device) with exactly n/n_clusters rows each.

    k-means++ initialisation, Lloyd iterations with an exact balanced assignment, then (refine=True)
    pairwise swaps that lower the inertia counting the centroid movement; best of `n_init` restarts
    by inertia. Rows are used as given (for the parameter split pass `normalize_rows(W_in)`).
    Runs in float64 on `device` (default: x's device). Deterministic for a seed on a given device.
    tol: stop a restart when the centroids move less than tol * (mean per-feature variance of x),
    summed over centroids (as scikit-learn / k-means-constrained).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix [n_rows, dim], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n % n_clusters:
        check_n_experts(n, n_clusters)                 # raises with the list of valid counts
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
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
        centres = _kmeans_pp(x, k, g)
        labels = _lloyd(x, centres, max_iter, tol_abs)
        if refine:
            labels = _refine(x, labels, k, max_iter, tol_abs)
        value = inertia(x, labels)
        if value < best_inertia:
            best_labels, best_inertia = labels, value
    return (best_labels, best_inertia) if return_inertia else best_labels


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn): each new centre is the best of 2+log(k) D^2 samples.
    Random numbers come from the CPU generator, so the choice does not depend on the device."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
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
            max_rounds: int = 50) -> torch.Tensor:
    """Alternate passes of improving swaps and Lloyd until neither changes anything."""
    for _ in range(max_rounds):
        labels, n_swaps = _swap_pass(x, labels, k)
        if n_swaps == 0:
            break
        labels = _lloyd(x, _balanced_means(x, labels, k), max_iter, tol_abs)
    return labels


def _swap_pass(x: torch.Tensor, labels: torch.Tensor, k: int, n_cand: int = 4,
               chunk: int = 1024) -> tuple[torch.Tensor, int]:
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
    pairs = torch.stack([a_idx[good][order], b_idx[good][order], bi[good][order], bj[good][order]], 1).tolist()
    busy, swaps = set(), []
    for a, b, i, j in pairs:             # greedy: best gains first, each cluster in one swap per pass
        if a not in busy and b not in busy:
            busy.update((a, b))
            swaps.append((i, j, a, b))
    if not swaps:
        return labels, 0
    sw = torch.tensor(swaps, device=dev)
    labels = labels.clone()
    labels[sw[:, 0]] = sw[:, 3]
    labels[sw[:, 1]] = sw[:, 2]
    return labels, len(swaps)
