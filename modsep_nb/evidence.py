"""Intervals, nulls and tests for the claims the notebooks make (docs/method.md §5.3), from sums already collected.

- Bootstrap over documents: statistics are kept per block of documents (statistics.BlockStats) and evaluation
  per document (evaluate(..., per_document=True)), so a resample is a weighted sum: no forward pass.
- The pipeline's own null: pseudo-tasks that are random, document-disjoint parts of one domain, put through
  the same scores, selection and overlap (and cross-task ablation) as the real tasks.
- Tests where a claim is a comparison: a label permutation for related vs unrelated tasks, a sign-flip test
  for paired values across tasks, seeds combined with Holm.
Everything is seeded; the same seed gives the same numbers.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch

from .claims import ALPHA, MIN_N, Claim, holm, resample_p
from .evaluation import own_and_others, selectivity
from .models import BlockTape
from .overlaps import chance_overlap, layer_matched_chance_matrix, overlap_matrix, related_vs_unrelated
from .pruning import BLOCK_LOCALISERS, RankedBlocks, Selection, ablate, first_layer, select_neurons
from .statistics import BlockStats, bootstrap_weights, weighted_pool

LEVEL = 0.95


# -- intervals ----------------------------------------------------------------------------------------------
def percentile_ci(samples, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN samples dropped; (nan, nan) if none is left)."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return (float(lo), float(hi))


MIN_UNITS = 8      # below this many documents (blocks) a bootstrap cannot show a task's spread


def _check_units(task, n: int, what: str = "documents") -> None:
    """Warn where a task's interval would rest on too few documents to mean anything (a bootstrap of one
    document has no spread at all)."""
    if n < MIN_UNITS:
        warnings.warn(f"task {task!r} rests on {n} {what}: a bootstrap over fewer than {MIN_UNITS} cannot show its "
                      f"uncertainty (its interval comes out too narrow); read more documents (a larger budget) or "
                      f"split long documents into pieces", RuntimeWarning, stacklevel=3)


def child_seeds(seed: int, n: int) -> list[int]:
    """n independent child seeds of `seed` (one per task, so tasks are resampled independently)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def ratio_of_sums(num, den, n_boot: int, seed: int) -> dict:
    """Σnum / Σden over documents (accuracy: hits / targets; a relative accuracy: pruned hits / unpruned hits
    on the same documents) with a bootstrap over documents: {"estimate", "ci", "samples", "n"}."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError(f"num and den must be per-document arrays of the same length, got {num.shape} and {den.shape}")
    _check_units("ratio", len(num))
    samples = resampled_ratio(num, den, bootstrap_weights(len(num), n_boot, seed).numpy())
    return {"estimate": float(resampled_ratio(num, den)), "ci": percentile_ci(samples), "samples": samples,
            "n": int(len(num))}


def resampled_ratio(num, den, weights=None):
    """Σnum / Σden over documents, or with `weights` [n_boot, D] (bootstrap_weights) one ratio per resample
    [n_boot]. Where the denominator's sum is 0 (e.g. no unpruned hit: a model at chance) the ratio is undefined:
    NaN, which percentile_ci leaves out, never inf."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if weights is None:
        return num.sum() / den.sum() if den.sum() > 0 else np.nan
    w_den = weights @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w_den > 0, (weights @ num) / w_den, np.nan)


def cross_task_bootstrap(base: Mapping[str, np.ndarray], pruned: Mapping[str, Mapping[str, np.ndarray]],
                         n_boot: int, seed: int) -> dict:
    """Intervals on the cross-task matrix and its selectivity from per-document top-1 hits.

    base: task B -> hits [D_B] of the unpruned model on B's evaluation documents; pruned: task A -> {B: hits
    [D_B]} with A's neurons ablated. M[A, B] = Σ pruned[A][B] / Σ base[B]; each resample draws every task's
    documents independently and uses the same draw in every row and in the base, so an entry is a ratio on the
    same documents. Returns {"tasks", "matrix", "samples" [n_boot, T, T], "ci" [T, T, 2], "selectivity",
    "selectivity_samples" [n_boot], "selectivity_ci", "n_documents"}."""
    tasks = list(base)
    missing = [a for a in tasks if a not in pruned or any(b not in pruned[a] for b in tasks)]
    if missing:
        raise ValueError(f"pruned lacks rows or entries for tasks {missing}: give pruned[A][B] for every A, B")
    T = len(tasks)
    samples = np.empty((n_boot, T, T))
    matrix = np.empty((T, T))
    for j, (b, child) in enumerate(zip(tasks, child_seeds(seed, T))):
        den = np.asarray(base[b], dtype=np.float64)
        _check_units(b, len(den), "evaluation documents")
        w = bootstrap_weights(len(den), n_boot, child).numpy()
        for i, a in enumerate(tasks):
            num = np.asarray(pruned[a][b], dtype=np.float64)
            if num.shape != den.shape:
                raise ValueError(f"pruned[{a!r}][{b!r}] has {num.shape} documents but base[{b!r}] has {den.shape}")
            samples[:, i, j] = resampled_ratio(num, den, w)
            matrix[i, j] = resampled_ratio(num, den)
    sel = selectivity(samples)
    ci = np.stack([np.array([percentile_ci(samples[:, i, j]) for j in range(T)]) for i in range(T)])
    return {"tasks": tasks, "matrix": matrix, "samples": samples, "ci": ci, "selectivity": float(selectivity(matrix)),
            "selectivity_samples": sel, "selectivity_ci": percentile_ci(sel),
            "n_documents": {b: len(base[b]) for b in tasks}}


def cross_task_intervals(result, n_boot: int, seed: int) -> dict:
    """Intervals on a fixed-frac cross-task result (evaluation.CrossTaskResult) from the per-document hits it kept:
    the selected ablation's and each random seed's cross_task_bootstrap, resampling the same documents for all;
    "random" averages the seeds (matrix, samples, selectivity). {"selected": ..., "random": ... | None}."""
    if result.documents is None:
        raise ValueError("this cross-task result kept no per-document hits: compute it with a fixed frac and "
                         "evaluators that return {'n', 'top1'} per document (Study.cross_task does)")
    top1 = lambda rows: {b: rows[b]["top1"] for b in result.tasks}  # noqa: E731
    docs = result.documents
    base = top1(docs["base"])
    selected = cross_task_bootstrap(base, {a: top1(docs["pruned"][a]) for a in result.tasks}, n_boot, seed)
    per_seed = [cross_task_bootstrap(base, {a: top1(rows[a]) for a in result.tasks}, n_boot, seed)
                for rows in docs["random"]]
    random = None
    if per_seed:
        random = {k: np.mean([r[k] for r in per_seed], axis=0) for k in ("matrix", "samples", "selectivity_samples")}
        random["selectivity"] = float(np.mean([r["selectivity"] for r in per_seed]))
        random["n_documents"] = per_seed[0]["n_documents"]
    return {"selected": selected, "random": random}


# -- the same pipeline on any statistics ------------------------------------------------------------------
def pipeline_masks(stats: Mapping, *, frac: float, mode: str = "global", importance: str = "abs",
                   eps: float = 1e-3, eps_relative: float | None = None, retain: str = "rest",
                   general=None) -> dict[str, torch.Tensor]:
    """pruning.Selection(...).masks(stats), Study.scores/masks' route ('rest': the other tasks pooled; 'general':
    the general corpus's NeuronStats `general`, the same for the real tasks, their resamples and the null): one
    function for the real tasks, their resamples and the null.
    A block localiser (auroc) takes {task: BlockStats} or weightings of one RankedBlocks (resampled_stats), an
    attribution {task: [L, d_mlp]}."""
    return Selection(frac, mode, importance, eps, eps_relative, retain, general).masks(stats)


def resampled_stats(blocks: BlockStats, weights, importance: str = "abs", *, ranked=None, part: int = 0):
    """Yield what pipeline_masks reads for each row of weights [K, B]: the blocks merged with those weights, or for
    a block localiser (it ranks blocks) the blocks taken as many times as their weights say (WeightedBlocks of
    `ranked`, a RankedBlocks whose pool `part` is these blocks; default: these blocks alone, sorted once here)."""
    if importance not in BLOCK_LOCALISERS:
        yield from blocks.resamples(weights)
        return
    ranked = RankedBlocks([blocks]) if ranked is None else ranked
    for w in torch.as_tensor(weights):
        yield ranked.weighted(part, w)


def _merged(task_blocks: Mapping[str, BlockStats], importance: str = "abs") -> dict:
    """The tasks' statistics as pipeline_masks reads them (all blocks, once each)."""
    return {t: b if importance in BLOCK_LOCALISERS else b.merged() for t, b in task_blocks.items()}


def _pairs(masks: Mapping[str, torch.Tensor]) -> np.ndarray:
    _, matrix = overlap_matrix(masks)
    i, j = np.triu_indices(len(matrix), k=1)
    return matrix[i, j]


def layer_matched_chance(masks: Mapping[str, torch.Tensor]) -> float:
    """Mean over task pairs of the layer-matched chance overlap (overlaps.layer_matched_chance_matrix)."""
    _, matrix = layer_matched_chance_matrix(masks, metric="overlap")
    i, j = np.triu_indices(len(matrix), 1)
    return float(matrix[i, j].mean())


def bootstrap_masks(task_blocks: Mapping[str, BlockStats], n_boot: int, seed: int, **pipeline):
    """Yield the tasks' selections {task: mask} under each of n_boot resamples of their statistics blocks (each
    task's blocks drawn independently, seeded; the same seed draws the same blocks of blocks that hold the same
    documents, e.g. of one model at two training checkpoints), merged and put through pipeline_masks."""
    names = list(task_blocks)
    for t in names:
        _check_units(t, task_blocks[t].n_blocks, "blocks of documents")
    importance = pipeline.get("importance", "abs")
    # a block localiser ranks every task's blocks together: sorted once for all resamples
    ranked = RankedBlocks([task_blocks[t] for t in names]) if importance in BLOCK_LOCALISERS else None
    draws = {t: resampled_stats(task_blocks[t], bootstrap_weights(task_blocks[t].n_blocks, n_boot, s), importance,
                                ranked=ranked, part=k)
             for k, (t, s) in enumerate(zip(names, child_seeds(seed, len(names))))}
    for _ in range(n_boot):
        yield pipeline_masks({t: next(draws[t]) for t in names}, **pipeline)


def bootstrap_overlap(task_blocks: Mapping[str, BlockStats], n_boot: int, seed: int, **pipeline) -> dict:
    """The pairwise overlaps of the tasks' selections under a bootstrap over documents: each task's blocks are
    resampled independently (seeded), merged, and put through pipeline_masks(**pipeline).
    Returns {"pairs" [n_boot, n_pairs], "median" [n_boot], "matrices" [n_boot, T, T], "chance" [n_boot, n_pairs]:
    each pair's layer-matched chance under the resample}."""
    names = list(task_blocks)
    matrices, chance = [], []
    for masks in bootstrap_masks(task_blocks, n_boot, seed, **pipeline):
        matrices.append(overlap_matrix(masks)[1])
        chance.append(layer_matched_chance_matrix(masks, metric="overlap")[1])
    matrices, chance = np.stack(matrices), np.stack(chance)
    i, j = np.triu_indices(len(names), k=1)
    pairs = matrices[:, i, j]
    return {"pairs": pairs, "median": np.median(pairs, axis=1), "matrices": matrices, "chance": chance[:, i, j]}


# -- the pseudo-task null -------------------------------------------------------------------------------------
def pseudo_tasks(documents, sizes: Sequence[int], seed: int) -> list:
    """Random, disjoint parts of one domain with the given sizes (seeded). documents: a list of documents, a
    tensor of images [N, ...], or a BlockStats (parts are then BlockStats of some of its blocks, so a
    pseudo-task's statistics cost no forward pass). Sizes count documents, images or blocks."""
    n = documents.n_blocks if isinstance(documents, BlockStats) else len(documents)
    parts = _partition(n, sizes, seed)
    if isinstance(documents, BlockStats):
        return [documents.subset(p) for p in parts]
    if isinstance(documents, torch.Tensor):
        return [documents[torch.from_numpy(p)] for p in parts]
    return [[documents[k] for k in p] for p in parts]


def _partition(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Disjoint random parts (sorted indices) of range(n) with the given sizes."""
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"pseudo-task sizes {sizes} need {sum(sizes)} units but the domain has {n}: collect more "
                         f"of the null domain (the real tasks' budget times the number of tasks) or use fewer blocks")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + sizes)
    return [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(len(sizes))]


def matched_sizes(task_blocks: Mapping[str, BlockStats], domain: BlockStats) -> list[tuple[float, int]]:
    """Pseudo-task sizes matched to the real tasks (issue #26 item 6): each task's (tokens, documents) — images
    for an image model, whose tokens are its patches — as its statistics blocks hold them; where the null domain
    holds fewer tokens or documents than the tasks together, both scaled down in proportion to fit (a warning
    says so: smaller pseudo-tasks are noisier, so the null is then conservative for overlap)."""
    targets = [(float(b.count[:, 0].sum()), int(b.n_documents.sum())) for b in task_blocks.values()]
    have = float(domain.count[:, 0].sum()), int(domain.n_documents.sum())
    scale = min(1.0, have[0] / sum(t for t, _ in targets), have[1] / sum(d for _, d in targets))
    if scale < 1:
        scaled = [(t * scale, max(1, round(d * scale))) for t, d in targets]
        warnings.warn(f"the null domain holds {have[0]:.0f} tokens in {have[1]} documents but the tasks use "
                      f"{sum(t for t, _ in targets):.0f} in {sum(d for _, d in targets)}: pseudo-tasks scaled to "
                      f"{scale:.2f} of the tasks' sizes", RuntimeWarning, stacklevel=2)
        return scaled
    return targets


def _matched_partition(domain: BlockStats, targets: Sequence[tuple[float, int]], seed: int,
                       window: int = 8) -> list[np.ndarray]:
    """Disjoint random parts of the domain's blocks, one per (tokens, documents) target, built a block at a time:
    of the free blocks that bring the part nearer its targets (relative distance in tokens plus in documents), the
    best of the first `window` in a seeded order, until none does. So parts match the tasks in both where the
    domain's blocks allow, and differ from seed to seed (the window keeps the choice random)."""
    tokens, docs = domain.count[:, 0].double().numpy(), domain.n_documents.double().numpy()
    order = np.random.default_rng(seed).permutation(domain.n_blocks)
    free = np.ones(domain.n_blocks, dtype=bool)
    parts = []
    for tok, doc in targets:
        part, t, d = [], 0.0, 0.0
        while True:
            cand = order[free[order]]
            after = np.abs(tok - t - tokens[cand]) / tok + np.abs(doc - d - docs[cand]) / doc
            nearer = after < abs(tok - t) / tok + abs(doc - d) / doc - 1e-12
            if not nearer.any():
                break
            b = cand[nearer][np.argmin(after[nearer][:window])]
            part.append(b)
            free[b], t, d = False, t + tokens[b], d + docs[b]
        if not part:
            raise ValueError(f"no block of the null domain fits a pseudo-task of {tok:.0f} tokens in {doc} documents: "
                             f"use more evidence.n_blocks or a larger null domain")
        parts.append(np.sort(np.array(part)))
    return parts


def pseudo_task_null(domain: BlockStats | Sequence[BlockStats], sizes, n_null: int, seed: int, *,
                     keep_masks: bool = False, start: int = 0, **pipeline) -> dict:
    """The pipeline's own null for overlap: n_null times, the domain's blocks are split at random into
    pseudo-tasks of `sizes` (the real tasks' sizes: blocks, or (tokens, documents) pairs from matched_sizes, matched
    by _matched_partition), each merged and put through pipeline_masks.
    Several domains (a list of BlockStats, `sizes` one list per domain): the null is their pool, n_null split as
    evenly as can be over the domains in order, so no verdict hinges on which one domain is split.
    start: compute only replicates start .. n_null - 1 (those of a longer null whose first `start` are known: each
    replicate's seed is its own, so the two parts joined are the null drawn at once); one domain only.
    Returns {"pairs" [n_null, n_pairs], "median" [n_null], "layer_matched" [n_null], "masks" (keep_masks:
    one {pseudo-task: mask} per replicate, for pseudo_cross_task), "domain" [n_null]: the domain of each}."""
    if isinstance(domain, (list, tuple)) and len(domain) == 1:
        domain, sizes = domain[0], sizes[0]
    if isinstance(domain, (list, tuple)):
        if start:
            raise ValueError("a null pooled over several domains splits n_null between them: it cannot be extended, "
                             "draw it again with the larger n_null")
        counts = np.diff(np.round(np.linspace(0, n_null, len(domain) + 1))).astype(int)
        seeds = child_seeds(seed, len(domain))          # one domain was taken apart above, with `seed` itself
        parts = [pseudo_task_null(d, z, int(k), child, keep_masks=keep_masks, **pipeline)
                 for d, z, k, child in zip(domain, sizes, counts, seeds) if k]
        return {"pairs": np.concatenate([p["pairs"] for p in parts]),
                "median": np.concatenate([p["median"] for p in parts]),
                "layer_matched": np.concatenate([p["layer_matched"] for p in parts]),
                "masks": [m for p in parts for m in p["masks"]] if keep_masks else None,
                "domain": np.repeat(np.arange(len(domain))[counts > 0], counts[counts > 0])}
    pairs, layer_matched, kept = [], [], []
    n_new = n_null - start
    if n_new < 1:
        raise ValueError(f"start ({start}) must be below n_null ({n_null})")
    indicator = torch.zeros(n_new, len(sizes), domain.n_blocks, dtype=torch.float64)
    matched = not isinstance(sizes[0], (int, np.integer))
    for r, child in enumerate(child_seeds(seed, n_null)[start:]):
        split = _matched_partition(domain, sizes, child) if matched else _partition(domain.n_blocks, sizes, child)
        for k, part in enumerate(split):
            indicator[r, k, torch.from_numpy(part)] = 1.0
    merged = resampled_stats(domain, indicator.flatten(0, 1), pipeline.get("importance", "abs"))   # replicates in order
    for _ in range(n_new):
        masks = pipeline_masks({f"pseudo{k}": next(merged) for k in range(len(sizes))}, **pipeline)
        pairs.append(_pairs(masks))
        layer_matched.append(layer_matched_chance(masks))
        if keep_masks:
            kept.append(masks)
    pairs = np.stack(pairs)
    return {"pairs": pairs, "median": np.median(pairs, axis=1), "layer_matched": np.array(layer_matched),
            "masks": kept if keep_masks else None, "domain": np.zeros(n_new, dtype=int)}


def pseudo_cross_task(handle, null_masks: Sequence[Mapping[str, torch.Tensor]], evaluate_documents, n_documents: int,
                      seed: int, *, ablation: str = "zero", means=None) -> np.ndarray:
    """The selectivity of pseudo-tasks (the null of `selectivity`): for each replicate's masks (from
    pseudo_task_null(..., keep_masks=True)), the domain's evaluation documents are split at random into as
    many parts as pseudo-tasks, and each pseudo-task's neurons are ablated once over all of them.
    evaluate_documents: callable() -> top-1 hits per evaluation document [n_documents] of the model as it is
    (e.g. lambda: evaluate(handle, docs, per_document=True)["documents"]["top1"]). Returns [replicates]."""
    tape = BlockTape()          # every pass reads the same documents: the blocks below a set's first layer replay
    with tape.replay(handle, below=handle.n_layers):
        base = np.asarray(evaluate_documents(), dtype=np.float64)
    if base.shape != (n_documents,):
        raise ValueError(f"evaluate_documents returned {base.shape} hits but n_documents is {n_documents}")
    out = []
    for masks, child in zip(null_masks, child_seeds(seed, len(null_masks))):
        names = list(masks)
        parts = _partition(n_documents, [n_documents // len(names)] * len(names), child)
        matrix = np.empty((len(names), len(names)))
        for i, a in enumerate(names):
            with ablate(handle, masks[a], ablation, means), tape.replay(handle, below=first_layer(masks[a])):
                hits = np.asarray(evaluate_documents(), dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                matrix[i] = [hits[p].sum() / base[p].sum() for p in parts]
        out.append(float(selectivity(matrix)))
    return np.array(out)


# -- claims against a null --------------------------------------------------------------------------------------
def excess_claim(claim_id: str, statement: str, observed: float, boot, null=None, *, n: int | None = None,
                 direction: str = "greater", seed: int = 0, unit: str | None = None, test: str | None = None) -> Claim:
    """A claim that `observed` exceeds the pipeline's null, reported as the excess observed − mean(null).

    boot: bootstrap samples of the statistic (over documents); null: its values on pseudo-tasks (None: the
    null is 0 by exchangeability, e.g. the selectivity of same-distribution tasks). Interval: percentile of
    boot − (a bootstrap of the null's mean), so it carries the uncertainty of both. p: with a null, the
    share of null values at least as extreme as observed, (1 + #) / (1 + n_null); without, the bootstrap's
    one-sided share on the wrong side of 0. Undefined (NaN) resamples or null values count against the claim
    (claims.resample_p); an undefined `observed` gives estimate and p NaN: not supported. With a null the
    record also keeps the statistic's own bootstrap interval and the null's 95% band, apart (issue #26 item 5);
    p_floor: 1/(1 + the values p is counted from). unit: what n counts; test: the test's name in the record
    (default "one-sided bootstrap p" or "rank among null values"). The record keeps what Claim.detectable reads:
    the null's values, else the bootstrap's standard error."""
    boot = np.asarray(boot, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if null is None:
        excess, ci = float(observed), percentile_ci(boot)
        p = resample_p(boot, boot <= 0 if direction == "greater" else boot >= 0, observed)
        return Claim(claim_id, statement, excess, ci, 0.0, p=p, n=n, direction=direction, p_floor=1 / (1 + boot.size),
                     floor_n=f"{boot.size} bootstrap resamples", unit=unit, test=test or "one-sided bootstrap p",
                     bootstrap=True, boot_se=_se(boot))
    null = np.asarray(null, dtype=np.float64)
    known = null[~np.isnan(null)]           # the null's mean from its defined values; p counts the rest against
    if known.size:
        null_means = known[rng.integers(0, len(known), size=(len(boot), len(known)))].mean(1)
        excess, ci = float(observed - known.mean()), percentile_ci(boot - null_means)
    else:
        excess, ci = float("nan"), (float("nan"), float("nan"))
    p = resample_p(null, null >= observed if direction == "greater" else null <= observed, excess)
    return Claim(claim_id, statement, excess, ci, 0.0, p=p, n=n, direction=direction, p_floor=1 / (1 + null.size),
                 floor_n=f"{null.size} null values", observed=float(observed), observed_ci=percentile_ci(boot),
                 null_band=percentile_ci(null), unit=unit, test=test or "rank among null values", null_values=null)


def _se(boot) -> float:
    """The bootstrap's standard error (NaN resamples left out; NaN with fewer than two)."""
    x = np.asarray(boot, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


# -- tests of comparisons -----------------------------------------------------------------------------------------
def permutation_related_vs_unrelated(matrix, names: Sequence[str], groups: Mapping[str, Sequence[str]],
                                     n_perm: int, seed: int) -> dict:
    """Do related tasks (the same group) overlap more than unrelated ones? Statistic: mean within-group minus
    mean across-group overlap (overlaps.related_vs_unrelated). Null: the group labels shuffled over the
    grouped tasks (group sizes kept), n_perm times; one-sided p = (1 + #{perm >= observed}) / (1 + n_perm).
    p_floor: the larger of 1/(1 + n_perm) and 1/(the distinct groupings of these tasks), as no shuffle can be
    rarer than the observed grouping itself (about: 8 tasks in two groups of 4 have 35, so p >= 1/35).
    Returns {"within", "across", "difference", "p", "p_floor", "floor_n", "null" [n_perm], "n_within",
    "n_across"}."""
    names = list(names)
    observed = related_vs_unrelated(matrix, names, groups)
    diff = observed["within"] - observed["across"]
    grouped = [t for t in names if any(t in v for v in groups.values())]
    labels = [g for t in grouped for g, v in groups.items() if t in v]
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for k in range(n_perm):
        shuffled = rng.permutation(labels)
        perm_groups: dict[str, list[str]] = {}
        for t, g in zip(grouped, shuffled):
            perm_groups.setdefault(g, []).append(t)
        r = related_vs_unrelated(matrix, names, perm_groups)
        null[k] = r["within"] - r["across"]
    p = resample_p(null, null >= diff - 1e-12, diff)      # NaN: a permutation without a pair counts against
    sizes = Counter(labels).values()                        # groupings: multinomial, equal-size groups unordered
    groupings = math.factorial(len(labels)) // math.prod(math.factorial(k) for k in sizes)
    groupings //= math.prod(math.factorial(c) for c in Counter(sizes).values())
    floor, floor_n = max((1 / (1 + n_perm), f"{n_perm} permutations"),
                         (1 / groupings, f"{len(grouped)} grouped tasks ({groupings} distinct groupings)"))
    return {"within": observed["within"], "across": observed["across"], "difference": float(diff), "p": float(p),
            "p_floor": floor, "floor_n": floor_n, "null": null, "n_within": observed["n_within"],
            "n_across": observed["n_across"]}


def related_claim(evidence: Mapping, groups: Mapping[str, Sequence[str]], n_perm: int, seed: int) -> tuple[dict, Claim]:
    """`related_share_more` from overlap_evidence's result: the within- minus across-group overlap of the tasks'
    top sets, tested by permuting group labels (permutation_related_vs_unrelated). Estimate: the difference's
    excess over the permutation null's mean; interval: the difference's own bootstrap interval (over statistics
    blocks, overlap_evidence's resamples) shifted by that mean, so it is an interval of the estimate and not of
    the null; the record keeps the difference, its interval and the null's 95% band apart.
    Returns (the permutation test's dict, with "boot" [n_boot] added; the claim)."""
    names = evidence["names"]
    related = permutation_related_vs_unrelated(overlap_matrix(evidence["masks"])[1], names, groups, n_perm, seed)

    def difference(matrix):
        r = related_vs_unrelated(matrix, names, groups)
        return r["within"] - r["across"]
    boot = np.array([difference(m) for m in evidence["boot"]["matrices"]])
    null = np.asarray(related["null"], dtype=np.float64)
    shift = float(np.nanmean(null))
    claim = Claim("related_share_more", "related tasks (the same group) share more neurons than unrelated ones "
                  "(within-group minus across-group overlap, excess over the same with group labels permuted)",
                  float(related["difference"] - shift), percentile_ci(boot - shift), 0.0, p=related["p"],
                  n=len([t for t in names if any(t in v for v in groups.values())]), unit="grouped tasks",
                  p_floor=related["p_floor"], floor_n=related["floor_n"], test="permutation of group labels",
                  observed=related["difference"], observed_ci=percentile_ci(boot), null_band=percentile_ci(null),
                  null_values=null)
    return {**related, "boot": boot}, claim


def paired_difference_ci(a, b, n_boot: int, seed: int, *, alternative: str = "greater") -> dict:
    """Mean of the paired differences a − b across units (e.g. tasks: ends vs middle), NaN pairs dropped, with a
    bootstrap interval over units and a sign-flip test (exact over all 2^n flips up to n = 16 units, else
    n_boot random flips). alternative: "greater" (mean > 0), "less" or "two-sided".
    Returns {"estimate", "ci", "p", "p_floor", "floor_n", "n", "differences"}: p_floor, the smallest p the test
    can give (exact: 1 / 2^n, twice that two-sided; random flips: 1 / (1 + n_boot))."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[~np.isnan(d)]
    if d.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs without NaN, got {d.size}")
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = rng.choice((1.0, -1.0), size=(n_boot, len(d)))
    flipped = (signs * d).mean(1)
    observed = d.mean()
    tol = 1e-12
    if alternative == "greater":
        extreme = flipped >= observed - tol
    elif alternative == "less":
        extreme = flipped <= observed + tol
    elif alternative == "two-sided":
        extreme = np.abs(flipped) >= abs(observed) - tol
    else:
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    exact = len(d) <= 16
    p = extreme.mean() if exact else (1 + extreme.sum()) / (1 + len(flipped))
    floor = (2.0 if alternative == "two-sided" else 1.0) / 2 ** len(d) if exact else 1 / (1 + len(flipped))
    return {"estimate": float(observed), "ci": percentile_ci(boot), "p": float(p), "p_floor": floor,
            "floor_n": f"{len(d)} units", "n": int(len(d)), "differences": d}


def combine_seeds(results: Sequence[Mapping], n_boot: int, seed: int) -> dict:
    """Pattern persistence over random-init seeds, every seed reported: per seed rho, p and its Holm-adjusted
    p; combined, the median rho (interval: bootstrap over seeds) and the largest Holm-adjusted p (the pattern
    persists in every seed), never the best seed. p_floor: that p with every seed at its permutation floor,
    min(1, seeds / (1 + n_perm)) (each result's "n_perm"; None where the results do not say)."""
    rho = np.array([r["rho"] for r in results], dtype=np.float64)
    p = np.array([r["p_value"] for r in results], dtype=np.float64)
    if rho.size == 0:
        raise ValueError("no seeds to combine")
    adjusted = holm(p)
    rng = np.random.default_rng(seed)
    boot = np.median(rho[rng.integers(0, len(rho), size=(n_boot, len(rho)))], axis=1)
    median = float(np.median(rho))
    # a seed whose p is undefined cannot show the pattern persists there: it counts as p = 1, never left out
    p_combined = float("nan") if np.isnan(median) else float(np.max(np.where(np.isnan(adjusted), 1.0, adjusted)))
    n_perm = [r.get("n_perm") for r in results]
    floor = None if None in n_perm else min(1.0, len(rho) / (1 + min(n_perm)))
    return {"rho": rho.tolist(), "p": p.tolist(), "p_holm": adjusted.tolist(), "median_rho": median,
            "ci": percentile_ci(boot), "p_combined": p_combined, "n": int(len(rho)), "p_floor": floor,
            "floor_n": None if floor is None else f"{len(rho)} seeds x {min(n_perm)} permutations"}


def activation_control_mask(stats_list, frac: float, mode: str = "per_layer") -> torch.Tensor:
    """Neurons chosen by activation alone, not by task: the top `frac` by mean |activation| on the tasks pooled
    (the control for activation-based selections clustering under a parameter split, docs/method.md §8)."""
    return select_neurons(weighted_pool(list(stats_list)).mean_abs, frac, mode)


# -- the two headline claims of notebooks 01/02 -----------------------------------------------------------------
def null_sizes(sizes: Sequence[int], available: int) -> list[int]:
    """Pseudo-task sizes (in blocks): the real tasks' sizes, or, where the null domain has fewer blocks than
    they need together, the same proportions scaled down to fit (at least one block each; a warning says so:
    smaller pseudo-tasks are noisier, so the null is then conservative for overlap)."""
    sizes = [int(s) for s in sizes]
    if sum(sizes) <= available:
        return sizes
    if available < len(sizes):
        raise ValueError(f"the null domain has {available} blocks, fewer than the {len(sizes)} pseudo-tasks: choose a "
                         f"larger domain for the null")
    scaled = [max(1, s * available // sum(sizes)) for s in sizes]
    while sum(scaled) > available:
        scaled[int(np.argmax(scaled))] -= 1
    warnings.warn(f"the null domain has {available} blocks but the tasks use {sum(sizes)}: pseudo-task sizes scaled "
                  f"from {sizes} to {scaled}", RuntimeWarning, stacklevel=2)
    return scaled


def overlap_evidence(task_blocks: Mapping[str, BlockStats], null_domain: BlockStats, *, frac: float, n_boot: int,
                     n_null: int, seed: int, mode: str = "global", importance: str = "abs", eps: float = 1e-3,
                     eps_relative: float | None = None, retain: str = "rest", general=None,
                     extend: dict | None = None) -> dict:
    """Median pairwise overlap of the tasks' selections against the pipeline's own null (pseudo-tasks of
    `null_domain`, or pooled over several domains given as a list, matched to the tasks in tokens and documents:
    matched_sizes), uniform and layer-matched chance, with bootstrap intervals
    on every pair and on the median; and the claim `overlap_above_null`.
    retain='general' (scores against the general corpus's statistics `general`): pseudo-tasks of one domain
    would all select that domain's neurons, so the null is instead layer-matched chance (sets drawn at random
    with each task's count per layer: no sharing), pair by pair under every resample; null_domain is not read.
    extend: an earlier result of this call with the same inputs and fewer null values (one null domain): its
    bootstrap and null values are kept and only the rest of the n_null drawn, the same as drawing them at once."""
    pipeline = dict(frac=frac, mode=mode, importance=importance, eps=eps, eps_relative=eps_relative, retain=retain,
                    **({"general": general} if retain == "general" else {}))
    names = list(task_blocks)
    if len(names) < 2:
        raise ValueError("overlap needs at least two tasks")
    masks = pipeline_masks(_merged(task_blocks, importance), **pipeline)
    pairs = _pairs(masks)
    observed = float(np.median(pairs))
    boot = extend["boot"] if extend else bootstrap_overlap(task_blocks, n_boot, seed, **pipeline)
    if retain == "general":
        return _overlap_above_chance(names, masks, pairs, boot, seed, task_blocks)
    domains = list(null_domain) if isinstance(null_domain, (list, tuple)) else [null_domain]
    blocks_only = not all(isinstance(b, BlockStats) for b in (*domains, *task_blocks.values()))   # e.g. attributions
    sizes = [null_sizes([task_blocks[t].n_blocks for t in names], d.n_blocks) if blocks_only
             else matched_sizes(task_blocks, d) for d in domains]
    start = 0 if extend is None else len(extend["null"]["median"])
    null = pseudo_task_null(domains, sizes, n_null, seed + 1, start=start, **pipeline)
    if start:
        null = {k: (v if k == "masks" else np.concatenate([extend["null"][k], v])) for k, v in null.items()}
    sizes = np.array([float(m.sum()) for m in masks.values()])
    n_all = masks[names[0]].numel()
    i, j = np.triu_indices(len(names), k=1)
    claim = excess_claim("overlap_above_null", "tasks' neuron sets overlap more than same-distribution "
                         "pseudo-tasks' do (median pairwise overlap, excess over the null)", observed,
                         boot["median"], null["median"], seed=seed, test="rank among pseudo-task null values",
                         **_block_units(task_blocks))
    return {"names": names, "masks": masks, "pairs": pairs, "pairs_ci": [percentile_ci(boot["pairs"][:, k])
                                                                        for k in range(len(pairs))],
            "median": observed, "median_ci": percentile_ci(boot["median"]),
            "null_median": float(np.mean(null["median"])), "null_band": percentile_ci(null["median"]),
            "uniform_chance": float(np.mean(chance_overlap(sizes[i], sizes[j], n_all))),
            "layer_matched_chance": layer_matched_chance(masks), "boot": boot, "null": null, "claim": claim}


def _block_units(task_blocks: Mapping[str, BlockStats]) -> dict:
    """n and unit of a claim bootstrapped over each task's statistics blocks: the fewest blocks of any task (each
    task's selection rests on its own blocks; the pairs of tasks are not independent units)."""
    return {"n": min(b.n_blocks for b in task_blocks.values()), "unit": "statistics blocks (fewest of any task)"}


def _overlap_above_chance(names, masks, pairs, boot, seed: int, task_blocks) -> dict:
    """overlap_evidence under retain='general': each pair's overlap minus its layer-matched chance, the median
    over pairs, with its bootstrap over statistics blocks (chance recomputed from each resample's sets) and
    the one-sided bootstrap p; the record keeps the median overlap and the chance's band apart."""
    i, j = np.triu_indices(len(names), k=1)
    chance = layer_matched_chance_matrix(masks, metric="overlap")[1][i, j]
    boot_chance = np.median(boot["chance"], axis=1)
    claim = excess_claim("overlap_above_null", "tasks' neuron sets (scored against the general corpus) overlap more "
                         "than random sets with the same count per layer (median over pairs of overlap minus "
                         "layer-matched chance; one-sided bootstrap p)", float(np.median(pairs - chance)),
                         np.median(boot["pairs"] - boot["chance"], axis=1), None, seed=seed,
                         **_block_units(task_blocks))
    claim = replace(claim, observed=float(np.median(pairs)), observed_ci=percentile_ci(boot["median"]),
                    null_band=percentile_ci(boot_chance))
    sizes = np.array([float(m.sum()) for m in masks.values()])
    n_all = masks[names[0]].numel()
    return {"names": names, "masks": masks, "pairs": pairs, "pairs_ci": [percentile_ci(boot["pairs"][:, k])
                                                                        for k in range(len(pairs))],
            "median": float(np.median(pairs)), "median_ci": percentile_ci(boot["median"]),
            "null_median": float(np.median(chance)), "null_band": percentile_ci(boot_chance),
            "null_label": "layer-matched chance",
            "uniform_chance": float(np.mean(chance_overlap(sizes[i], sizes[j], n_all))),
            "layer_matched_chance": layer_matched_chance(masks), "boot": boot, "null": None, "claim": claim}


def selectivity_per_task(selected: dict, random: dict, *, unit: str = "task",
                         documents: str = "evaluation documents") -> Claim:
    """`selectivity_per_task`: whether selectivity is typical rather than carried by one task (issue #26: one
    class can carry the mean). Each task's own others' − own relative accuracy, selected minus matched random
    (cross_task_intervals' "selected" and "random", the same resampled documents), with its own one-sided
    bootstrap p, Holm-adjusted across tasks: a task is selective when that p < 0.05 and its interval lies above 0.
    The claim: the median task's value above 0 (bootstrap of the median over tasks); `per_task` keeps each
    task's estimate, interval, p and Holm p, and the statement how many tasks are selective. A task with fewer
    than MIN_N evaluation documents is "insufficient data", never selective. n: every task's `documents` together
    (the units the bootstrap resamples)."""
    tasks = list(selected["tasks"])
    counts = selected["n_documents"]

    def beyond_random(sel, rand):          # [..., T]: (others − own) of the selected minus of the random
        (own, others), (r_own, r_others) = own_and_others(sel), own_and_others(rand)
        return (others - own) - (r_others - r_own)
    observed = beyond_random(selected["matrix"], random["matrix"])
    boot = beyond_random(selected["samples"], random["samples"])                       # [n_boot, T]
    p = np.array([resample_p(boot[:, i], boot[:, i] <= 0, observed[i]) for i in range(len(tasks))])
    p_holm = holm(p)
    per_task = {}
    for i, t in enumerate(tasks):
        ci = percentile_ci(boot[:, i])
        enough = counts[t] >= MIN_N
        per_task[t] = {"estimate": float(observed[i]), "ci": list(ci), "p": float(p[i]), "p_holm": float(p_holm[i]),
                       "n": int(counts[t]), "selective": bool(enough and ci[0] > 0 and p_holm[i] < ALPHA),
                       "verdict": None if enough else f"insufficient data (n = {counts[t]} {documents} < {MIN_N})"}
    n_selective = sum(r["selective"] for r in per_task.values())
    few = sum(counts[t] < MIN_N for t in tasks)
    few = f", {few} with fewer than {MIN_N} {documents}: insufficient data" if few else ""
    with warnings.catch_warnings():          # a resample where every task is undefined: NaN, counted against
        warnings.simplefilter("ignore", RuntimeWarning)
        median, boot_median = float(np.nanmedian(observed)), np.nanmedian(boot, axis=1)
    return Claim("selectivity_per_task", f"pruning its selected neurons hurts the median {unit} more than the "
                 f"others, beyond as many random neurons ({n_selective} of {len(tasks)} {unit}s selective on their "
                 f"own one-sided bootstrap test, Holm across {unit}s{few}; estimate: the median {unit}'s)", median,
                 percentile_ci(boot_median), 0.0, p=resample_p(boot_median, boot_median <= 0, median),
                 n=int(sum(counts.values())), unit=documents, test="one-sided bootstrap p", bootstrap=True,
                 p_floor=1 / (1 + len(boot)), floor_n=f"{len(boot)} bootstrap resamples", per_task=per_task,
                 boot_se=_se(boot_median))


def selectivity_claim(bootstrap: dict, *, seed: int = 0) -> Claim:
    """`selectivity` from cross_task_bootstrap: others' relative accuracy minus own, against 0 (the
    selectivity of same-distribution pseudo-tasks is 0 in expectation, as their evaluation documents are
    exchangeable; pseudo_cross_task measures its spread)."""
    n = int(sum(bootstrap["n_documents"].values()))
    return excess_claim("selectivity", "pruning a task's neurons hurts that task more than the others "
                        "(mean over tasks of others' minus own relative accuracy)", bootstrap["selectivity"],
                        bootstrap["selectivity_samples"], None, n=n, seed=seed, unit="evaluation documents")
