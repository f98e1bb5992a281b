"""Layerwise correspondence between expert splits and task-specific neurons (docs/method.md §8).

For one layer: `selected` is a bool [d_mlp] (a task's top-frac neurons within the layer) and
`labels` a balanced split into E experts ([d_mlp], or [P, d_mlp] for P splits at once).

- concentration curve and its normalised AUC (the paper's measure): do the selected neurons sit in
  few experts?
- enrichment (Emergent Modularity): per expert a hypergeometric test, Benjamini-Hochberg across
  experts.
- every figure against a null of random balanced splits (z-score and percentile).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import hypergeom
from tqdm.auto import tqdm

from .claims import Claim, benjamini_hochberg, resample_p
from .evidence import paired_difference_ci, percentile_ci
from .moefication import check_labels, check_n_experts, layer_seeds
from .pruning import as_mask, select_neurons

STATISTICS = ("auc", "share_significant", "mean_obs_over_exp")
# correspondence_above_control: the share of the test's level spent on the control's own uncertainty (its bound)
BERGER_BOOS_GAMMA = 0.005


# ----------------------------------------------------------------------------- inputs

def _check_selected(selected: torch.Tensor) -> torch.Tensor:
    selected = as_mask(selected, "selected")
    if selected.dim() != 1:
        raise ValueError(f"selected must be a 1-D bool mask [d_mlp], got {selected.dtype} of shape "
                         f"{tuple(selected.shape)}; for one layer of select_neurons(...) use mask[layer]")
    if not bool(selected.any()):
        raise ValueError("no neuron is selected in this layer, so the statistic is undefined; "
                         "select per layer (select_neurons(..., mode='per_layer')) or skip the layer")
    return selected.cpu()


def expert_counts(selected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many selected neurons each expert holds: [E] for labels [d_mlp], [P, E] for [P, d_mlp]."""
    selected = _check_selected(selected)
    labels = labels.cpu()
    if labels.shape[-1] != selected.shape[0] or labels.dim() not in (1, 2):
        raise ValueError(f"labels must be [d_mlp] or [P, d_mlp] with d_mlp={selected.shape[0]}, "
                         f"got shape {tuple(labels.shape)}")
    n_experts = check_labels(labels)       # integer ids only: .long() would truncate float labels silently
    labels = labels.long()
    lab2 = labels.reshape(-1, labels.shape[-1])
    counts = torch.zeros(lab2.shape[0], n_experts, dtype=torch.long)
    counts.scatter_add_(1, lab2, selected.long().expand_as(lab2).contiguous())
    return counts if labels.dim() == 2 else counts[0]


# ----------------------------------------------------------------------------- concentration

def concentration_curve(selected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cumulative share of the selected neurons held by the j most-loaded experts, j = 0..E.

    Shape [E+1] (or [P, E+1] for labels [P, d_mlp]), float64, starting at 0 and ending at 1."""
    return _curve_of_counts(expert_counts(selected, labels))


def _curve_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """The concentration curve of per-expert counts [..., E]: [..., E+1], float64."""
    top = torch.sort(counts, dim=-1, descending=True).values.to(torch.float64)
    curve = torch.cumsum(top, -1) / top.sum(-1, keepdim=True)
    return torch.cat([torch.zeros_like(curve[..., :1]), curve], -1)


def _trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under a curve sampled at x = j/E, j = 0..E (trapezoid rule)."""
    n_experts = curve.shape[-1] - 1
    return (curve[..., 1:] + curve[..., :-1]).sum(-1) / (2.0 * n_experts)


@functools.lru_cache(maxsize=4096)
def packed_auc(n_selected: int, d_mlp: int, n_experts: int) -> float:
    """AUC of the best possible curve: the selected neurons fill the fewest experts (cached: notebook 05 asks for
    the same few counts per layer hundreds of thousands of times)."""
    m = d_mlp // n_experts
    j = torch.arange(n_experts + 1, dtype=torch.float64)
    return float(_trapezoid_auc(torch.clamp(j * m, max=n_selected) / n_selected))


def concentration_auc(selected: torch.Tensor, labels: torch.Tensor) -> float | torch.Tensor:
    """Normalised area under the concentration curve: 1 = perfectly packed, 0 = uniform spread.

    With the curve y_j (j = 0..E) sampled at x = j/E and the trapezoid rule,
        auc = sum_j (y_{j-1} + y_j) / (2E),
        normalised = (auc - auc_uniform) / (auc_packed - auc_uniform),
    where auc_uniform = 1/2 is the curve y_j = j/E of every expert holding the same number of selected
    neurons, and auc_packed that of the selected neurons filling the fewest experts (y_j =
    min(j*m, s)/s with expert size m and s selected). The value lies in [0, 1]; a random balanced
    split gives a small positive value (chance clumping), which is what `null_distribution` measures.
    NaN when packing cannot beat uniform (E = 1, or every neuron selected).
    Returns a float for labels [d_mlp], a float64 tensor [P] for labels [P, d_mlp].
    """
    auc = _trapezoid_auc(concentration_curve(selected, labels))
    d = selected.shape[0]
    n_experts = check_labels(labels.cpu())
    best = packed_auc(int(selected.sum()), d, n_experts)
    out = (auc - 0.5) / (best - 0.5) if best > 0.5 else torch.full_like(auc, float("nan"))
    return float(out) if labels.dim() == 1 else out


# ----------------------------------------------------------------------------- enrichment

def _hypergeom_upper(counts: torch.Tensor, d_mlp: int, n_selected: int, size: int) -> torch.Tensor:
    """P(X >= c) for X ~ hypergeometric(population d_mlp, n_selected successes, size draws).
    Experts have equal sizes, so one table over c = 0..size serves every expert (and every null)."""

    return _upper_table(d_mlp, n_selected, size)[counts]


@functools.lru_cache(maxsize=1024)
def _upper_table(d_mlp: int, n_selected: int, size: int) -> torch.Tensor:
    return torch.as_tensor(hypergeom.sf(np.arange(size + 1) - 1, d_mlp, n_selected, size), dtype=torch.float64)


def _enrichment_stats(counts: torch.Tensor, d_mlp: int, alpha: float) -> dict:
    """Enrichment for counts [..., E] of selected neurons per expert (equal-size experts)."""
    n_experts = counts.shape[-1]
    size = d_mlp // n_experts
    n_sel = int(counts[..., :].sum(-1).flatten()[0])
    p = _hypergeom_upper(counts, d_mlp, n_sel, size)
    q = benjamini_hochberg(p)
    significant = q <= alpha
    expected = size * n_sel / d_mlp
    ratio = counts.to(torch.float64) / expected
    share = significant.to(torch.float64).mean(-1)
    # enrichment of the expert a selected neuron sits in, averaged over the selected neurons
    # (= E * sum of squared shares: 1 when spread evenly, E when all sit in one expert)
    weighted = (counts.to(torch.float64) / n_sel * ratio).sum(-1)
    n_sig = significant.sum(-1)
    sig_mean = torch.where(n_sig > 0, (ratio * significant).sum(-1) / n_sig.clamp_min(1),
                           torch.full_like(share, float("nan")))
    return dict(p=p, q=q, significant=significant, obs_over_exp=ratio, share_significant=share,
                mean_obs_over_exp=weighted, mean_obs_over_exp_significant=sig_mean)


def enrichment(selected: torch.Tensor, labels: torch.Tensor, alpha: float = 0.05) -> dict:
    """Per-expert over-representation of the selected neurons (Emergent Modularity's test).

    For each expert with c selected neurons: p = P(X >= c), X hypergeometric with population d_mlp,
    n = number selected, N = expert size (scipy.stats.hypergeom.sf(c-1, d_mlp, n, N)); q-values by
    Benjamini-Hochberg across the experts; an expert is significant when q <= alpha.
    Returns p, q, significant, counts, obs_over_exp (per expert, c / (N n / d_mlp)), and the layer
    summaries share_significant (fraction of experts significant), mean_obs_over_exp (the
    observed/expected ratio of the expert each selected neuron sits in, averaged over the selected
    neurons; 1 for an even spread; the plain mean over experts would be 1 for every balanced split)
    and mean_obs_over_exp_significant (mean ratio over the significant experts; NaN if none).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be [d_mlp] here, got shape {tuple(labels.shape)}")
    counts = expert_counts(selected, labels)
    out = _enrichment_stats(counts, selected.shape[0], alpha)
    out["counts"] = counts
    for key in ("share_significant", "mean_obs_over_exp", "mean_obs_over_exp_significant"):
        out[key] = float(out[key])
    return out


# ----------------------------------------------------------------------------- nulls

def random_balanced_splits(d_mlp: int, n_experts: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """n independent seeded random balanced splits at once: labels [n, d_mlp]. A copy of a cached draw: notebook 05
    draws the same layer's null (the same seed) for every task and fraction."""
    check_n_experts(d_mlp, n_experts)
    return _balanced_splits(d_mlp, n_experts, n, seed).clone()


@functools.lru_cache(maxsize=256)
def _balanced_splits(d_mlp: int, n_experts: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # numpy's stable argsort is torch's (argsort(stable=True)) permutation, about twice as fast
    perm = torch.from_numpy(np.argsort(torch.rand(n, d_mlp, generator=g).numpy(), axis=1, kind="stable"))
    block = (torch.arange(d_mlp) // (d_mlp // n_experts)).expand(n, d_mlp)
    return torch.empty(n, d_mlp, dtype=torch.long).scatter_(1, perm, block)


def _statistic(selected: torch.Tensor, labels: torch.Tensor, statistic: str, alpha: float) -> torch.Tensor:
    if statistic == "auc":
        return torch.as_tensor(concentration_auc(selected, labels), dtype=torch.float64)
    counts = expert_counts(selected, labels)
    return torch.as_tensor(_enrichment_stats(counts, selected.shape[0], alpha)[statistic], dtype=torch.float64)


def null_distribution(selected: torch.Tensor, n_experts: int, *, n_null: int = 100, seed: int = 0,
                      statistic: str = "auc", alpha: float = 0.05) -> torch.Tensor:
    """The statistic for n_null seeded random balanced splits: float64 tensor [n_null].
    statistic: "auc" (concentration_auc), "share_significant" or "mean_obs_over_exp" (enrichment)."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}: choose one of {', '.join(STATISTICS)}")
    if n_null < 2:
        raise ValueError(f"n_null must be >= 2 to estimate a spread (docs/method.md §8 asks for >= 100), got {n_null}")
    selected = _check_selected(selected)
    labels = random_balanced_splits(selected.shape[0], n_experts, n_null, seed=seed)
    return _statistic(selected, labels, statistic, alpha)


def against_null(observed: float, null: torch.Tensor | np.ndarray) -> dict:
    """z = (observed - mean) / std (std with n-1; +-inf if the null has no spread, 0 if equal) and
    percentile = 100 * (#null < observed + #null == observed / 2) / n (mid-rank)."""
    null = torch.as_tensor(null, dtype=torch.float64).flatten()
    if null.numel() < 2:
        raise ValueError("the null needs at least 2 values")
    mean, std = float(null.mean()), float(null.std())
    diff = observed - mean
    if std > 0:
        z = diff / std
    else:
        z = 0.0 if diff == 0 else float(np.sign(diff)) * float("inf")
    pct = 100.0 * float(((null < observed).sum() + 0.5 * (null == observed).sum()) / null.numel())
    return dict(z=z, percentile=pct, null_mean=mean, null_std=std)


# ----------------------------------------------------------------------------- all layers

def task_correspondence(scores: dict, labels: torch.Tensor, frac: float, *, n_null: int = 100,
                        seed: int = 0) -> dict:
    """Per task: layer_correspondence of its within-layer top-`frac` neurons (docs/method.md §8) in the split `labels`."""
    return {t: layer_correspondence(select_neurons(s, frac, "per_layer"), labels, n_null=n_null, seed=seed)
            for t, s in scores.items()}


def ends_vs_middle(values) -> tuple[float, float]:
    """(mean over the first and last thirds of the layers, mean over the middle third), NaN-aware: the
    paper's claim is that correspondence is stronger at the ends."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    a, b = n // 3, n - n // 3
    return float(np.nanmean(np.r_[values[:a], values[b:]])), float(np.nanmean(values[a:b]))


EXACT_LIMIT = 200_000      # up to this many relabellings a permutation test enumerates them all


def layer_permutation_test(a, b, *, n_perm: int, seed: int) -> dict:
    """Is mean(a) > mean(b), with layers as the units (one value per layer, e.g. z averaged over tasks)? One-sided
    permutation test of the difference of means over the layers' group labels: exact over all C(n_a + n_b, n_a)
    relabellings when there are at most EXACT_LIMIT (p = share at least as large, the observed one included;
    floor 1/C), else n_perm random ones ((1 + #) / (1 + n_perm)). NaN layers are dropped.
    Returns {"estimate", "p", "p_floor", "floor_n", "n"}; p NaN with fewer than one layer a side."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n = len(a) + len(b)
    if len(a) == 0 or len(b) == 0:
        return {"estimate": float("nan"), "p": float("nan"), "p_floor": 1.0, "floor_n": f"{n} layers", "n": n}
    both, observed = np.r_[a, b], a.mean() - b.mean()
    total = math.comb(n, len(a))
    if total <= EXACT_LIMIT:
        first = np.zeros((total, n), dtype=bool)
        for k, idx in enumerate(itertools.combinations(range(n), len(a))):
            first[k, list(idx)] = True
    else:
        rng = np.random.default_rng(seed)
        first = np.zeros((n_perm, n), dtype=bool)
        first[np.arange(n_perm)[:, None], rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)[:, :len(a)]] = True
    stat = (first @ both) / len(a) - (~first @ both) / len(b)
    hits = int(np.sum(stat >= observed - 1e-12))
    exact = total <= EXACT_LIMIT
    return {"estimate": float(observed), "p": hits / total if exact else (1 + hits) / (1 + n_perm),
            "p_floor": 1 / total if exact else 1 / (1 + n_perm), "floor_n": f"{n} layers", "n": n}


def ends_claim(kind: str, layer_values, *, n_boot: int, n_perm: int, seed: int) -> Claim:
    """`ends_stronger_than_middle[kind]` with layers as the units (issue #26 item 1): layer_values [n_layers],
    one per layer (z averaged over tasks and fractions). early > middle and late > middle are tested apart
    (layer_permutation_test, thirds as in ends_vs_middle) and the claim needs both: estimate the smaller
    difference, interval that minimum under a bootstrap of the layers within each third, p the larger p
    (an intersection-union test), floor the larger floor. With too few layers for either test to reach
    p < 0.05 the verdict says "cannot be tested with N layers"."""
    values = np.asarray(layer_values, dtype=np.float64)
    n = len(values)
    a, b = n // 3, n - n // 3
    early, middle, late = values[:a], values[a:b], values[b:]
    tests = [layer_permutation_test(side, middle, n_perm=n_perm, seed=seed + k) for k, side in enumerate((early, late))]
    rng = np.random.default_rng(seed)

    def boot_mean(x):                   # the third's mean under n_boot resamples of its layers
        x = x[~np.isnan(x)]
        return x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1) if len(x) else np.full(n_boot, np.nan)
    m = boot_mean(middle)
    boot = np.minimum(boot_mean(early) - m, boot_mean(late) - m)
    e, l = tests
    return Claim(f"ends_stronger_than_middle[{kind}]", f"{kind}: correspondence is stronger in both the first and the "
                 f"last third of the layers than in the middle third (mean z per layer over tasks; layers as units: "
                 f"early − middle {e['estimate']:+.2f}, p {e['p']:.2g}; late − middle {l['estimate']:+.2f}, p "
                 f"{l['p']:.2g}; estimate the smaller)", float(np.min([e["estimate"], l["estimate"]])),
                 percentile_ci(boot), 0.0, p=float(np.max([e["p"], l["p"]])), n=n,     # NaN either side: NaN
                 p_floor=max(e["p_floor"], l["p_floor"]), floor_n=f"{n} layers")


@dataclass
class LayerCorrespondence:
    """Per-layer results (float64 tensors [n_layers]; NaN where a layer has no selected neuron)."""
    auc: torch.Tensor
    null_mean: torch.Tensor
    null_std: torch.Tensor
    z: torch.Tensor
    percentile: torch.Tensor
    share_significant: torch.Tensor
    mean_obs_over_exp: torch.Tensor
    null_share_significant: torch.Tensor
    null_mean_obs_over_exp: torch.Tensor
    n_selected: torch.Tensor
    n_experts: int
    n_null: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}


def layer_correspondence(selected_mask: torch.Tensor, labels: torch.Tensor, *, n_null: int = 100, seed: int = 0,
                         alpha: float = 0.05, progress: bool = False) -> LayerCorrespondence:
    """Concentration AUC and enrichment of every layer's selected neurons in its split, each against
    n_null random balanced splits of that layer (z-score and percentile of the AUC; the nulls' mean
    share of significant experts and mean obs/exp for comparison).
    selected_mask: bool [n_layers, d_mlp]; labels: [n_layers, d_mlp] balanced splits."""
    selected_mask = as_mask(selected_mask, "selected_mask")
    if selected_mask.dim() != 2:
        raise ValueError(f"selected_mask must be bool [n_layers, d_mlp], got {selected_mask.dtype} "
                         f"{tuple(selected_mask.shape)}")
    if labels.shape != selected_mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and selected_mask {tuple(selected_mask.shape)} differ in shape")
    n_layers, d = selected_mask.shape
    n_experts = check_labels(labels.cpu())
    seeds = layer_seeds(seed, n_layers)
    nan = float("nan")
    rows = []
    for layer in tqdm(range(n_layers), desc="correspondence", disable=not progress):
        sel = selected_mask[layer].cpu()
        n_sel = int(sel.sum())
        if n_sel == 0:
            rows.append((nan,) * 9 + (0,))
            continue
        lab = labels[layer].cpu().long()
        null_labels = random_balanced_splits(d, n_experts, n_null, seed=seeds[layer])
        both = torch.cat([lab[None], null_labels])           # observed and nulls in one pass
        auc = concentration_auc(sel, both)
        enr = _enrichment_stats(expert_counts(sel, both), d, alpha)
        ref = against_null(float(auc[0]), auc[1:])
        rows.append((float(auc[0]), ref["null_mean"], ref["null_std"], ref["z"], ref["percentile"],
                     float(enr["share_significant"][0]), float(enr["mean_obs_over_exp"][0]),
                     float(enr["share_significant"][1:].mean()), float(enr["mean_obs_over_exp"][1:].mean()),
                     n_sel))
    cols = [torch.tensor(c, dtype=torch.float64) for c in zip(*rows)]
    return LayerCorrespondence(*cols[:9], n_selected=cols[9].long(), n_experts=n_experts, n_null=n_null)


def correspondence_claims(kind: str, by_frac: dict, control_by_frac: dict, *, n_boot: int, seed: int,
                          n_perm: int = 1000, resampled: dict | None = None) -> list[Claim]:
    """Notebook 05's claims for one model, each with the unit its hypothesis is about (not layer x task x
    fraction cells):
    correspondence_above_control: each task's mean z (over layers and fractions) minus the mean z of a
        selection by activation alone (top neurons by mean |activation| on the pooled data, the same fraction);
        the control takes out what any activation-based selection shows under a parameter split (neurons with
        similar W_in rows have correlated activations). The control is measured on the same data as the tasks,
        so it varies with them: with `resampled` ({"task_z" [n_boot, T], "control_z" [n_boot]}, both from the same
        resampled statistics blocks, resampled_correspondence_z) the interval and a one-sided bootstrap p
        resample tasks and blocks together, the control with them (issue #26: not a constant), and the test is exact
        sign flips over tasks against the control's upper (1 - BERGER_BOOS_GAMMA) bound, p + BERGER_BOOS_GAMMA
        (Berger and Boos's p-value over a nuisance parameter's confidence set). Without, the
        control is held fixed and tasks are the units of a sign-flip test (the statement says so).
    ends_stronger_than_middle: a claim about layers, so layers are the units (ends_claim): each layer's z
        averaged over tasks and fractions, early and late thirds each against the middle third.
    by_frac: {frac: {task: LayerCorrespondence}}; control_by_frac: {frac: LayerCorrespondence}."""
    tasks = list(next(iter(by_frac.values())))
    task_z = np.array([np.nanmean([np.nanmean(by_frac[f][t].z.numpy()) for f in by_frac]) for t in tasks])
    control_z = float(np.nanmean([np.nanmean(control_by_frac[f].z.numpy()) for f in by_frac]))
    statement = (f"{kind}: tasks' selected neurons concentrate in parameter-split experts more than neurons selected "
                 f"by activation alone (mean z, task minus control, tasks as units")
    if resampled is None:
        above = paired_difference_ci(task_z, np.full(len(tasks), control_z), n_boot, seed)
        claim = Claim(f"correspondence_above_control[{kind}]", statement + "; the control held fixed)",
                      above["estimate"], above["ci"], 0.0, p=above["p"], n=above["n"], p_floor=above["p_floor"],
                      floor_n=f"{above['n']} tasks", unit="tasks")
    else:
        boot_tasks, boot_control = (np.asarray(resampled[k], dtype=np.float64) for k in ("task_z", "control_z"))
        drawn = np.random.default_rng(seed).integers(0, len(tasks), size=boot_tasks.shape)   # tasks, per resample
        diffs = np.nanmean(np.take_along_axis(boot_tasks, drawn, 1), 1) - boot_control
        observed = float(np.nanmean(task_z) - control_z)
        # the test: exact sign flips over tasks against the control at the top of its own (1 - gamma) bootstrap
        # bound, plus gamma (Berger and Boos 1994): valid whatever the control's true value, and over 8-10 tasks,
        # where a bootstrap over tasks is too few units to judge (claims.MIN_N)
        control_high = float(np.nanquantile(boot_control, 1 - BERGER_BOOS_GAMMA))
        flips = paired_difference_ci(task_z, np.full(len(tasks), control_high), n_boot, seed)
        claim = Claim(f"correspondence_above_control[{kind}]", statement + ", the control resampled with them)",
                      observed, percentile_ci(diffs), 0.0, p=min(1.0, flips["p"] + BERGER_BOOS_GAMMA), n=len(tasks),
                      p_floor=min(1.0, flips["p_floor"] + BERGER_BOOS_GAMMA),
                      floor_n=f"{len(tasks)} tasks (sign flips) + {BERGER_BOOS_GAMMA:g} for the control's bound",
                      unit="tasks (and their statistics blocks, resampled together for the interval)",
                      test=f"sign flips over tasks, the control at its {1 - BERGER_BOOS_GAMMA:.1%} bootstrap bound "
                           f"(Berger-Boos)")
    layer_z = np.nanmean([by_frac[f][t].z.numpy() for f in by_frac for t in tasks], axis=0)   # [n_layers]
    return [claim, ends_claim(kind, layer_z, n_boot=n_boot, n_perm=n_perm, seed=seed + 1)]


def mean_z_against(selected_mask: torch.Tensor, labels: torch.Tensor, reference: LayerCorrespondence) -> float:
    """The mean over layers of a selection's concentration z in `labels`, read against the null of `reference`
    (a layer_correspondence of a selection with the same count per layer: a random balanced split's AUC
    distribution depends on the count only, so a resample's z needs no new null draws). Every layer at once:
    concentration_auc's curve and normalisation on the [layers, experts] counts."""
    counts = selected_mask.sum(1).cpu()
    if not torch.equal(counts, reference.n_selected):
        raise ValueError("the resampled selection's count per layer differs from the reference's: select per layer")
    labels = labels.cpu().long()
    per_expert = torch.zeros(labels.shape[0], reference.n_experts, dtype=torch.float64)
    per_expert.scatter_add_(1, labels, selected_mask.cpu().to(torch.float64))
    curve = _curve_of_counts(per_expert)
    best = torch.tensor([packed_auc(int(c), labels.shape[1], reference.n_experts) if c else float("nan")
                         for c in counts], dtype=torch.float64)
    auc = torch.where(best > 0.5, (_trapezoid_auc(curve) - 0.5) / (best - 0.5), float("nan"))   # as concentration_auc
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (auc.numpy() - reference.null_mean.numpy()) / reference.null_std.numpy()
    return float(np.nanmean(np.where(counts.numpy() > 0, z, np.nan)))
