"""Layerwise correspondence between expert splits and task-specific neurons (SPEC §8).

For one layer: `selected` is a bool [d_mlp] (a task's top-frac neurons within the layer) and
`labels` a balanced split into E experts ([d_mlp], or [P, d_mlp] for P splits at once).

- concentration curve and its normalised AUC (the paper's measure): do the selected neurons sit in
  few experts?
- enrichment (Emergent Modularity): per expert a hypergeometric test, Benjamini-Hochberg across
  experts.
- every figure against a null of random balanced splits (z-score and percentile).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import hypergeom
from tqdm.auto import tqdm

from .claims import Claim, benjamini_hochberg
from .evidence import paired_difference_ci
from .moefication import _check_labels, check_n_experts, layer_seeds
from .pruning import as_mask, select_neurons

STATISTICS = ("auc", "share_significant", "mean_obs_over_exp")


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
    n_experts = _check_labels(labels)       # integer ids only: .long() would truncate float labels silently
    labels = labels.long()
    lab2 = labels.reshape(-1, labels.shape[-1])
    counts = torch.zeros(lab2.shape[0], n_experts, dtype=torch.long)
    counts.scatter_add_(1, lab2, selected.long().expand_as(lab2).contiguous())
    return counts if labels.dim() == 2 else counts[0]


# ----------------------------------------------------------------------------- concentration

def concentration_curve(selected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cumulative share of the selected neurons held by the j most-loaded experts, j = 0..E.

    Shape [E+1] (or [P, E+1] for labels [P, d_mlp]), float64, starting at 0 and ending at 1."""
    counts = expert_counts(selected, labels)
    top = torch.sort(counts, dim=-1, descending=True).values.to(torch.float64)
    curve = torch.cumsum(top, -1) / top.sum(-1, keepdim=True)
    return torch.cat([torch.zeros_like(curve[..., :1]), curve], -1)


def _trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under a curve sampled at x = j/E, j = 0..E (trapezoid rule)."""
    n_experts = curve.shape[-1] - 1
    return (curve[..., 1:] + curve[..., :-1]).sum(-1) / (2.0 * n_experts)


def packed_auc(n_selected: int, d_mlp: int, n_experts: int) -> float:
    """AUC of the best possible curve: the selected neurons fill the fewest experts."""
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
    n_experts = _check_labels(labels.cpu())
    best = packed_auc(int(selected.sum()), d, n_experts)
    out = (auc - 0.5) / (best - 0.5) if best > 0.5 else torch.full_like(auc, float("nan"))
    return float(out) if labels.dim() == 1 else out


# ----------------------------------------------------------------------------- enrichment

def _hypergeom_upper(counts: torch.Tensor, d_mlp: int, n_selected: int, size: int) -> torch.Tensor:
    """P(X >= c) for X ~ hypergeometric(population d_mlp, n_selected successes, size draws).
    Experts have equal sizes, so one table over c = 0..size serves every expert (and every null)."""

    table = torch.as_tensor(hypergeom.sf(np.arange(size + 1) - 1, d_mlp, n_selected, size), dtype=torch.float64)
    return table[counts]


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
    """n independent seeded random balanced splits at once: labels [n, d_mlp]."""
    check_n_experts(d_mlp, n_experts)
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(n, d_mlp, generator=g).argsort(dim=1, stable=True)
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
        raise ValueError(f"n_null must be >= 2 to estimate a spread (SPEC asks for >= 100), got {n_null}")
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
    """Per task: layer_correspondence of its within-layer top-`frac` neurons (SPEC §8) in the split `labels`."""
    return {t: layer_correspondence(select_neurons(s, frac, "per_layer"), labels, n_null=n_null, seed=seed)
            for t, s in scores.items()}


def ends_vs_middle(values) -> tuple[float, float]:
    """(mean over the first and last thirds of the layers, mean over the middle third), NaN-aware: the
    paper's claim is that correspondence is stronger at the ends."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    a, b = n // 3, n - n // 3
    return float(np.nanmean(np.r_[values[:a], values[b:]])), float(np.nanmean(values[a:b]))


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
    n_experts = _check_labels(labels.cpu())
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


def correspondence_claims(kind: str, by_frac: dict, control_by_frac: dict, *, n_boot: int, seed: int) -> list[Claim]:
    """Notebook 05's claims for one model, with tasks as the unit (not layer x task x fraction cells):
    correspondence_above_control: each task's mean z (over layers and fractions) minus the mean z of a
        selection by activation alone (top neurons by mean |activation| on the pooled data, the same fraction),
        paired across tasks; the control takes out what any activation-based selection shows under a
        parameter split (neurons with similar W_in rows have correlated activations).
    ends_stronger_than_middle: each task's mean z in the first and last thirds of the layers minus the middle
        third, paired across tasks.
    by_frac: {frac: {task: LayerCorrespondence}}; control_by_frac: {frac: LayerCorrespondence}."""
    tasks = list(next(iter(by_frac.values())))
    task_z = np.array([np.nanmean([np.nanmean(by_frac[f][t].z.numpy()) for f in by_frac]) for t in tasks])
    control_z = float(np.nanmean([np.nanmean(control_by_frac[f].z.numpy()) for f in by_frac]))
    above = paired_difference_ci(task_z, np.full(len(tasks), control_z), n_boot, seed)
    ends, middle = zip(*[np.nanmean([ends_vs_middle(by_frac[f][t].z.numpy()) for f in by_frac], 0) for t in tasks])
    ends_test = paired_difference_ci(np.array(ends), np.array(middle), n_boot, seed + 1)
    return [Claim(f"correspondence_above_control[{kind}]", f"{kind}: tasks' selected neurons concentrate in "
                  f"parameter-split experts more than neurons selected by activation alone (mean z, task minus "
                  f"control, tasks as units)", above["estimate"], above["ci"], 0.0, p=above["p"], n=above["n"]),
            Claim(f"ends_stronger_than_middle[{kind}]", f"{kind}: correspondence is stronger in the first and last "
                  f"thirds of the layers than in the middle third (mean z, ends minus middle, tasks as units)",
                  ends_test["estimate"], ends_test["ci"], 0.0, p=ends_test["p"], n=ends_test["n"])]
