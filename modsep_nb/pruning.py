"""Selective pruning (docs/method.md §3): importance, scores, selection and ablation.

Score for forgetting task F while retaining R:  S = I(F) / (I(R) + eps).
eps is absolute by default; with eps_relative it is set per layer to eps_relative × the median retain
importance of that layer, so that it means the same whatever the model's activation scale (typical mean
|activation| differs several-fold between models, e.g. trained vs random-init).
Selection takes the top `frac` of scores, globally or per layer, ties broken by index
(lower index wins) so that float16 scores with many equal values still select deterministically.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import torch

from .data import images_and_labels, lm_batches
from .statistics import BlockStats, documents_read, block_of_documents, weighted_pool

IMPORTANCES = ("abs", "rms", "std", "freq", "sqrt")
# localisers that score each task against all the others at once from the same statistics (task_scores), not as
# a ratio of two importances: LAPE-style activation-probability entropy, and a Welch t of the task vs the rest
LOCALISERS = ("lape", "ttest")
# localisers that rank documents, not tokens: they need each statistics block's mean (BlockStats), not the merged
# sums: an AUROC of the task's blocks against every other task's (auroc_scores)
BLOCK_LOCALISERS = ("auroc",)
# localisers read from a gradient pass (collect_attribution), not from the statistics: task_scores takes {task:
# attribution [L, d_mlp]} for them (AttributionBlocks.merged() gives it, whole or resampled)
ATTRIBUTIONS = ("attribution", "attribution_contrast")
SELECTION_MODES = ("global", "per_layer")
ABLATION_MODES = ("zero", "mean")


def importance(stats, name: str = "abs") -> torch.Tensor:
    """Per-neuron importance [L, d_mlp] (float64) of one task's NeuronStats, by name."""
    if name == "abs":
        return stats.mean_abs
    if name == "rms":
        return stats.rms
    if name == "std":
        return stats.std
    if name == "freq":
        return stats.frac_pos
    if name == "sqrt":
        return stats.mean_sqrt
    if name in LOCALISERS + BLOCK_LOCALISERS:
        raise ValueError(f"{name!r} scores a neuron across all tasks at once, not one task's statistics: use "
                         f"task_scores(stats, importance={name!r})")
    raise ValueError(f"unknown importance {name!r}: choose one of "
                     f"{', '.join(IMPORTANCES + LOCALISERS + BLOCK_LOCALISERS)}")


def prune_scores(forget, retain, importance: str = "abs", eps: float = 1e-3,
                 eps_relative: float | None = None) -> torch.Tensor:
    """S = I(forget) / (I(retain) + eps), shape [L, d_mlp], float64.

    `forget` and `retain` are NeuronStats (or lists of NeuronStats: a list for `retain` is pooled
    with equal weight per task, docs/method.md §3 'rest'). eps_relative (if given, `eps` is not used): layer l's
    eps is eps_relative × the median over that layer's neurons of I(retain).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps_relative is not None and not eps_relative >= 0:
        raise ValueError(f"eps_relative must be >= 0 (a fraction of the layer's median importance) or None, "
                         f"got {eps_relative}")
    i_forget = _pooled_importance(forget, importance)
    i_retain = _pooled_importance(retain, importance)
    if i_forget.shape != i_retain.shape:
        raise ValueError(f"forget and retain statistics have different shapes {tuple(i_forget.shape)} "
                         f"and {tuple(i_retain.shape)}: were they collected on the same model?")
    if eps_relative is not None:
        eps = eps_relative * layer_medians(i_retain)[:, None]
    return i_forget / (i_retain + eps)


def layer_medians(values: torch.Tensor) -> torch.Tensor:
    """Median of each layer's row of [L, d_mlp] (the mean of the two middle values for even d_mlp). On a CPU by
    numpy's partition (the two middle values only: 2x faster than a sort, and every resample's scores need it)."""
    d = values.shape[1]
    middle = [(d - 1) // 2, d // 2]
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.partition(values.detach().numpy(), middle, axis=1))
    else:
        ordered = values.sort(dim=1).values
    return (ordered[:, middle[0]] + ordered[:, middle[1]]) / 2


def _pooled_importance(stats, name: str) -> torch.Tensor:
    """A list of tasks is one retain set: their statistics pooled with equal weight per task, then the
    importance of the pool (for rms and std this differs from averaging the tasks' importances)."""
    if isinstance(stats, (list, tuple)):
        if not stats:
            raise ValueError("an empty list of statistics was given: pass at least one task's NeuronStats")
        stats = weighted_pool(stats)
    return importance(stats, name)


def task_scores(stats: dict, *, importance="abs", eps=1e-3, eps_relative=None, retain="rest", general=None) -> dict:
    """Per task the selective-pruning score for forgetting it while retaining `retain`:
    'rest' (the other tasks pooled with equal weight) or 'general' (a NeuronStats given as `general`).
    eps / eps_relative: see prune_scores. importance "lape" or "ttest" (LOCALISERS): that localiser's scores
    (lape_scores, ttest_scores), which contrast each task with all the others themselves (retain and eps unused);
    "auroc" (BLOCK_LOCALISERS) likewise, from {task: BlockStats} (auroc_scores); "attribution" and
    "attribution_contrast" (ATTRIBUTIONS) from {task: attribution [L, d_mlp]} (attribution_scores)."""
    if importance == "lape":
        return lape_scores(stats)
    if importance == "ttest":
        return ttest_scores(stats)
    if importance == "auroc":
        return auroc_scores(stats)
    if importance in ATTRIBUTIONS:
        return attribution_scores(stats, contrast=importance == "attribution_contrast")
    scores = {}
    for name, st in stats.items():
        if retain == "rest":
            others = [s for n, s in stats.items() if n != name]
            if not others:
                raise ValueError("retain='rest' needs at least two tasks")
            ret = others
        elif retain == "general":
            if general is None:
                raise ValueError("retain='general' needs the general corpus's NeuronStats as `general`")
            ret = general
        else:
            raise ValueError(f"unknown retain set {retain!r}: choose 'rest' or 'general'")
        scores[name] = prune_scores(st, ret, importance=importance, eps=eps, eps_relative=eps_relative)
    return scores


def lape_scores(stats: dict) -> dict:
    """Activation-probability entropy (LAPE-style) per task, [L, d_mlp] float64 in [0, 1].

    p_t = each task's frac_pos (the probability that the neuron is positive on t), q_t = p_t / sum_u p_u its
    share across tasks and H = -sum_t q_t log q_t. Score for task t: q_t x (1 - H / log T): 1 for a neuron that
    fires on t only, 0 for one that fires as often on every task (H = log T) or never on t, and 0 for a neuron
    that never fires (no share to take)."""
    names = _at_least_two(stats)
    p = torch.stack([stats[t].frac_pos for t in names])              # [T, L, d]
    total = p.sum(0)
    q = torch.where(total > 0, p / total.clamp_min(torch.finfo(p.dtype).tiny), 1.0 / len(names))
    entropy = -(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(0)
    specificity = (1 - entropy / math.log(len(names))).clamp(0.0, 1.0)
    return {t: q[k] * specificity for k, t in enumerate(names)}


def ttest_scores(stats: dict) -> dict:
    """Welch's t of each neuron's activation on the task's tokens (images' tokens) against every other task's
    tokens pooled (token-weighted: NeuronStats.merge), from count, mean and mean_sq: [L, d_mlp] float64, large
    when the neuron is higher on the task. Tokens of one document are not independent, so t is a ranking
    statistic here, not a test. A neuron constant on both sides (no spread) scores 0 if the constants are equal,
    else +-inf (a perfect separation)."""
    names = _at_least_two(stats)
    out = {}
    for t in names:
        rest = None
        for u in names:
            if u != t:
                rest = stats[u] if rest is None else rest.merge(stats[u])
        own = stats[t]
        n1, n2 = own.count.unsqueeze(1), rest.count.unsqueeze(1)
        se = (own.var / n1 + rest.var / n2).sqrt()
        diff = own.mean - rest.mean
        out[t] = torch.where(se > 0, diff / se.clamp_min(torch.finfo(se.dtype).tiny), diff.sign() * float("inf"))
    return out


def auroc_scores(blocks: dict) -> dict:
    """Per task the AUROC of each neuron's mean activation over the task's statistics blocks against every other
    task's blocks (the probability that a block of the task is higher than one of the rest, ties counted half;
    Mann-Whitney from mid-ranks), [L, d_mlp] float64 in [0, 1]: 1 for a neuron higher on every block of the task,
    0.5 for one that does not tell them apart. `blocks`: {task: BlockStats}, or {task: WeightedBlocks} of one
    RankedBlocks (a resample or a pseudo-task: the pool's blocks taken as many times as weighted). The unit is
    the block of documents (the bootstrap's), not the token: tokens of one document are not independent draws."""
    names = _at_least_two(blocks)
    views = list(blocks.values())
    if all(isinstance(v, WeightedBlocks) for v in views) and len({id(v.ranked) for v in views}) == 1:
        ranked = views[0].ranked
    elif all(isinstance(b, BlockStats) for b in views):
        ranked = RankedBlocks(views)
        views = [ranked.weighted(k) for k in range(len(views))]
    else:
        raise ValueError("the auroc localiser ranks statistics blocks: give {task: BlockStats} (Study.block_stats()), "
                         "or weightings of one RankedBlocks, not merged NeuronStats")
    weights = torch.stack([v.pool_weights() for v in views]) * ranked.read
    for t, w in zip(names, weights):
        if float(w.sum()) == 0:
            raise ValueError(f"task {t!r} has no non-empty statistics block: collect its statistics first")
    return dict(zip(names, ranked.auroc(weights)))


class RankedBlocks:
    """Every neuron's mean activation over each block of a pool of statistics blocks (one or several BlockStats laid
    end to end), sorted once per neuron. auroc(weights) then scores any weighting of the pool's blocks (a bootstrap
    resample or a pseudo-task takes each block 0, 1, 2... times) with a cumulative sum of the weights in each
    neuron's sorted order instead of a sort: notebook 07 scores hundreds of resamples of 46,080 neurons. The result
    is the Mann-Whitney AUROC of the blocks repeated as often as weighted, exactly (integer weights: every sum is
    of halves). A block that read no token has no mean and weighs 0."""

    def __init__(self, pools):
        means, self.offsets = [], [0]
        for b in pools:
            count = b.count.to(torch.float64)
            means.append(b.sums[:, 0].to(torch.float64) / count.clamp_min(1).unsqueeze(-1))     # [B, L, d]
            self.offsets.append(self.offsets[-1] + b.n_blocks)
        self.shape = means[0].shape[1:]
        self.read = torch.cat([b.count[:, 0] > 0 for b in pools]).to(torch.float64)      # 0: an empty block
        x = torch.cat(means).flatten(1).T.contiguous().numpy()     # [N, B]: one row per neuron
        n, size = x.shape
        self.order = x.argsort(axis=1)                             # numpy's sort: ~10x torch's for short rows
        rows = np.arange(n)[:, None] * size
        inverse = np.empty_like(self.order)
        np.put_along_axis(inverse, self.order, np.arange(size)[None, :], axis=1)
        self.back = (inverse + rows).ravel()                       # sorted position of each block, laid end to end
        ordered = np.take_along_axis(x, self.order, axis=1)
        tied = ordered[:, 1:] == ordered[:, :-1]
        self.runs = None
        if tied.any():          # each sorted position's run of equal values: its first and last position
            starts = np.ones((n, size), dtype=bool)
            starts[:, 1:] = ~tied
            ends = np.ones((n, size), dtype=bool)
            ends[:, :-1] = ~tied
            index = np.arange(n * size)
            first = np.maximum.accumulate(np.where(starts.ravel(), index, 0))
            last = np.minimum.accumulate(np.where(ends.ravel(), index, n * size - 1)[::-1])[::-1]
            self.runs = first, last

    @property
    def n_blocks(self) -> int:
        return self.offsets[-1]

    def weighted(self, part: int, weights=None) -> "WeightedBlocks":
        """The blocks of pool `part` taken `weights` [its blocks] times each (default: once)."""
        return WeightedBlocks(self, part, weights)

    def auroc(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """AUROC [L, d_mlp] of each row of weights [T, pool blocks] (a task) against the others' rows together.
        From each block's weighted mid-rank R (the weight below it plus half the weight equal to it, itself
        included): task t's Mann-Whitney U is w_t . R - W_t^2 / 2, since its pairs within itself sum to W_t^2 / 2."""
        w = weights.to(torch.float64) * self.read
        total = w.sum(0).numpy()
        spread = np.take(total, self.order)                        # [N, B]: the weights in each neuron's order
        upto = np.cumsum(spread, axis=1)
        if self.runs is None:
            ranks = upto - spread / 2
        else:
            below = (upto - spread).ravel()
            ranks = (below[self.runs[0]] + upto.ravel()[self.runs[1]]) / 2
        ranks = torch.from_numpy(ranks.ravel()[self.back].reshape(spread.shape))   # back in block order
        own = w.sum(1)
        u = w @ ranks.T - (own ** 2 / 2)[:, None]                  # [T, N]
        auc = u / (own * (float(total.sum()) - own))[:, None]
        return [a.view(self.shape) for a in auc]


class WeightedBlocks:
    """Pool `part` of a RankedBlocks with a weight per block (what evidence.resampled_stats yields for a block
    localiser): auroc_scores reads it without sorting again."""

    def __init__(self, ranked: RankedBlocks, part: int, weights=None):
        size = ranked.offsets[part + 1] - ranked.offsets[part]
        w = torch.ones(size, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (size,) or bool((w < 0).any()):
            raise ValueError(f"weights must be {size} non-negative numbers (one per block), got shape {tuple(w.shape)}")
        self.ranked, self.part, self.weights = ranked, part, w

    def pool_weights(self) -> torch.Tensor:
        out = torch.zeros(self.ranked.n_blocks, dtype=torch.float64)
        out[self.ranked.offsets[self.part]:self.ranked.offsets[self.part + 1]] = self.weights
        return out


def _at_least_two(stats: dict) -> list:
    if len(stats) < 2:
        raise ValueError(f"a localiser contrasts each task with the others: give at least two tasks' statistics, "
                         f"got {len(stats)}")
    return list(stats)


def attribution_scores(attribution: dict, contrast: bool = False) -> dict:
    """Per task its attribution (collect_attribution: the first-order estimate of the loss increase per token or
    image when the neuron is zeroed), or with contrast=True that minus the mean of the other tasks' (a neuron
    that matters as much everywhere scores 0)."""
    if not contrast:
        return dict(attribution)
    names = _at_least_two(attribution)
    return {t: attribution[t] - torch.stack([attribution[u] for u in names if u != t]).mean(0) for t in names}


class AttributionBlocks:
    """A task's attribution kept per block of documents (collect_attribution(..., n_blocks=...)): sums [B, L, d]
    of -a*g and units [B] (tokens or images whose loss was taken), read by evidence.py as it reads BlockStats:
    merged(weights) is the attribution of the blocks taken `weights` times each (a resample, a pseudo-task)."""

    def __init__(self, sums: torch.Tensor, units: torch.Tensor):
        self.sums, self.units = sums, units.to(torch.float64)

    @property
    def n_blocks(self) -> int:
        return len(self.units)

    def merged(self, weights=None) -> torch.Tensor:
        w = torch.ones(self.n_blocks, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if float(w @ self.units) <= 0:
            raise ValueError("the weighted blocks hold no token (image): give a non-empty block a weight")
        return (w @ self.sums.flatten(1)).view(self.sums.shape[1:]) / (w @ self.units)

    def resamples(self, weights):
        yield from (self.merged(w) for w in torch.as_tensor(weights, dtype=torch.float64))

    def subset(self, blocks) -> "AttributionBlocks":
        idx = torch.as_tensor(blocks, dtype=torch.long)
        return AttributionBlocks(self.sums[idx], self.units[idx])


def collect_attribution(handle, data, *, max_tokens: int | None = None, batch_size: int | None = None,
                        ctx: int = 256, cls_only: bool = False, skip_positions=(), progress: bool = False,
                        n_blocks: int | None = None) -> dict:
    """Attribution of every neuron to the task's loss (attribution patching's first-order estimate): one
    forward and one backward pass per batch of `data`, read with the budget and windows of collect_stats.

    Loss: the summed next-token cross-entropy of the windows (LM), or of each image's label (data with labels,
    e.g. an ImageDataset). With a = a neuron's activation at a position and g = dLoss/da, zeroing the neuron
    changes the loss by about -a*g there; the result sums -a*g over the positions collect_stats counts (not
    padding, not skip_positions; the CLS token only with cls_only) and divides by the number of tokens
    (images) whose loss was taken. Returns {"attribution" [L, d_mlp] float64 (positive: zeroing the neuron
    raises the loss), "batches", "units", "seconds"}, and with n_blocks "blocks": AttributionBlocks of the
    documents (images) read cut into min(n_blocks, documents) contiguous runs, as collect_block_stats cuts them,
    for bootstraps over documents and pseudo-task nulls."""
    import time
    import torch.nn.functional as F

    start = time.perf_counter()
    total = torch.zeros(handle.n_layers, handle.d_mlp, dtype=torch.float64)
    acts: dict[int, torch.Tensor] = {}
    if n_blocks is not None:         # per document (image) read first, then summed into blocks as statistics are
        n_read = documents_read(handle, data, max_tokens=max_tokens, ctx=ctx)
        per_doc = torch.zeros(handle.n_layers, n_read, handle.d_mlp, dtype=torch.float64)
        doc_units = torch.zeros(n_read, dtype=torch.float64)

    def keep(layer):
        def hook(x):
            if not x.requires_grad:          # frozen weights: the first neuron vector starts the graph
                x = x.detach().requires_grad_(True)
            acts[layer] = x
            return x
        return hook

    def accumulate(loss, counted, docs, units):
        layers = sorted(acts)
        grads = torch.autograd.grad(loss, [acts[l] for l in layers], allow_unused=True)
        for l, g in zip(layers, grads):
            if g is not None:
                contrib = -(acts[l].detach().double() * g.double())     # [batch, seq, d] or [batch, d]
                if counted is not None:
                    contrib = contrib * counted.to(contrib.device, contrib.dtype).unsqueeze(-1)
                total[l] += contrib.reshape(-1, contrib.shape[-1]).sum(0).double().cpu()
                if n_blocks is not None:
                    rows = contrib.reshape(contrib.shape[0], -1, contrib.shape[-1]).sum(1).double().cpu()
                    per_doc[l].index_add_(0, docs, rows)
        if n_blocks is not None:
            doc_units.index_add_(0, docs, units.double())
        acts.clear()

    batches = units = 0
    with torch.enable_grad(), handle.hooks({l: keep(l) for l in range(handle.n_layers)}):
        if handle.kind == "lm":
            for ids, mask, docs, weights in lm_batches(handle.tokenizer, data, ctx=ctx, batch_size=batch_size or 8,
                                                       max_tokens=max_tokens, skip_positions=skip_positions,
                                                       with_weights=True, with_documents=True, by_length=True):
                ids, mask = ids.to(handle.device), mask.to(handle.device)
                logits = _at_least_float32(handle.lm_logits(ids, mask)[:, :-1])
                targets = ids[:, 1:]
                has_target = (mask[:, 1:] * mask[:, :-1]).bool()
                loss = F.cross_entropy(logits[has_target], targets[has_target], reduction="sum")
                accumulate(loss, weights > 0, docs, has_target.sum(1).cpu())
                batches, units = batches + 1, units + int(has_target.sum())
        else:
            images, labels, _ = images_and_labels(data)
            if labels is None:
                raise ValueError("attribution of an image model needs each image's label: pass an ImageDataset "
                                 "(or a dataset of (image, label) items), not bare images")
            if max_tokens is not None:
                images, labels = images[:max_tokens], labels[:max_tokens]
            bs = batch_size or 64
            for i in range(0, len(images), bs):
                x = images[i:i + bs].to(handle.device, handle.dtype)
                logits = _at_least_float32(handle.image_logits(x))
                loss = F.cross_entropy(logits, labels[i:i + bs].to(logits.device), reduction="sum")
                counted = None
                if cls_only:             # statistics read the CLS token only: so does the attribution
                    counted = torch.zeros(x.shape[0], acts[0].shape[1], dtype=torch.bool)
                    counted[:, 0] = True
                accumulate(loss, counted, torch.arange(i, i + len(x)), torch.ones(len(x)))
                batches, units = batches + 1, units + len(x)
    if units == 0:
        raise ValueError("no tokens (images) were read for the attribution: the data is empty")
    out = {"attribution": total / units, "batches": batches, "units": units}
    if n_blocks is not None:
        block = block_of_documents(n_read, n_blocks)
        used = int(block.max()) + 1
        sums = torch.zeros(handle.n_layers, used, handle.d_mlp, dtype=torch.float64).index_add_(1, block, per_doc)
        out["blocks"] = AttributionBlocks(sums.transpose(0, 1).contiguous(),
                                          torch.zeros(used, dtype=torch.float64).index_add_(0, block, doc_units))
    return {**out, "seconds": time.perf_counter() - start}


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def as_mask(mask, name: str = "mask") -> torch.Tensor:
    """A bool neuron mask (True = selected) from a bool tensor/array, or from integers that are all 0 or 1
    (converted exactly). Anything else is an error: `~` on an integer 0/1 mask gives -1/-2, and a float
    mask has no exact meaning."""
    try:
        mask = torch.as_tensor(mask)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a bool tensor [n_layers, d_mlp], got {type(mask).__name__}") from err
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be a bool tensor (True = selected neuron) or integers 0/1, got dtype "
                         f"{mask.dtype}{'' if mask.is_floating_point() else ' with values other than 0 and 1'}: "
                         f"build it with select_neurons(...) or compare scores, e.g. scores > t")
    return mask.bool()


def n_selected(n: int, frac: float) -> int:
    """How many of n neurons a fraction selects (rounded, at least 1)."""
    _check_frac(frac)
    return max(1, int(round(frac * n)))


def _check_frac(frac: float) -> None:
    if not (isinstance(frac, (int, float)) and 0.0 < float(frac) < 1.0):
        raise ValueError(f"frac must be a number strictly between 0 and 1 (e.g. 0.01 for 1%), got {frac!r}")


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries along the last dim (1-D or [rows, n]); ties broken by index
    (lower index wins). O(n): a top-k finds the threshold, then tied entries are taken in index order."""
    n = values.shape[-1]
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    rows = values.reshape(-1, n)
    threshold = rows.topk(k, dim=1).values[:, -1:]          # the k-th largest value of each row
    greater = rows > threshold
    need = k - greater.sum(1, keepdim=True)                   # how many tied entries complete the k
    tied = rows == threshold
    mask = greater | (tied & (tied.cumsum(1) <= need))
    return mask.reshape(values.shape)


def select_neurons(scores: torch.Tensor, frac: float, mode: str = "global") -> torch.Tensor:
    """Bool mask [L, d_mlp] of the top `frac` of scores.

    mode="global": top frac of all L*d_mlp neurons (the reference; piles selections into few layers).
    mode="per_layer": the same fraction in every layer.
    Ties are broken by flat index, so the result is deterministic whatever the score dtype.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}: choose one of {', '.join(SELECTION_MODES)}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [n_layers, d_mlp], got {tuple(scores.shape)}")
    scores = scores.detach()
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.to(torch.float32)     # float16/bfloat16 values are exact in float32: ties are kept
    if torch.isnan(scores).any():
        bad = sorted(set(torch.nonzero(torch.isnan(scores))[:, 0].tolist()))
        raise ValueError(f"scores contain NaN in layers {bad}: check the statistics for those layers")
    n_layers, d_mlp = scores.shape
    if mode == "global":
        return top_k_mask(scores.flatten(), n_selected(scores.numel(), frac)).view(n_layers, d_mlp)
    return top_k_mask(scores, n_selected(d_mlp, frac))


@dataclass(frozen=True)
class Selection:
    """How statistics become each task's selected neurons (docs/method.md §3), the one route for Study.scores /
    Study.masks and for evidence.pipeline_masks (the real tasks, their resamples and the nulls): scores by
    `importance` against the `retain` set (task_scores; eps / eps_relative: prune_scores), then the top `frac` by
    `mode`. general: the general corpus's NeuronStats, needed when retain is 'general' (not compared: data)."""
    frac: float | None = None
    mode: str = "global"
    importance: str = "abs"
    eps: float = 1e-3
    eps_relative: float | None = None
    retain: str = "rest"
    general: object = field(default=None, compare=False, repr=False)

    def scores(self, stats) -> dict:
        """{task: scores [L, d_mlp]} from {task: NeuronStats} (a block localiser: BlockStats; an attribution:
        [L, d_mlp])."""
        general = self.general
        if self.importance in LOCALISERS + BLOCK_LOCALISERS + ATTRIBUTIONS:      # they contrast the tasks themselves
            general = None
        elif self.retain == "general" and general is None:
            raise ValueError("retain='general' needs the general corpus's statistics as `general` "
                             "(Study.general_stats())")
        return task_scores(dict(stats), importance=self.importance, eps=self.eps, eps_relative=self.eps_relative,
                           retain=self.retain, general=general)

    def select(self, scores) -> dict:
        """{task: bool mask [L, d_mlp]}: each task's top `frac` of its scores by `mode`."""
        return {t: select_neurons(s, self.frac, self.mode) for t, s in scores.items()}

    def masks(self, stats) -> dict:
        """Statistics to selection: select(scores(stats))."""
        return self.select(self.scores(stats))

    def kwargs(self) -> dict:
        """The settings as keyword arguments (evidence.pipeline_masks, bootstrap_masks, pseudo_task_null take them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def ties_at_threshold(scores: torch.Tensor, mask: torch.Tensor) -> int:
    """How many unselected neurons share the lowest selected score (decided by the index tie-break)."""
    mask = as_mask(mask)
    if not mask.any():
        return 0
    threshold = scores[mask].min()
    return int(((scores == threshold) & ~mask).sum())


def iterative_prune(handle, collect_forget, collect_retain, *, frac: float, steps: int, importance: str = "abs",
                    eps: float = 1e-3, eps_relative: float | None = None, mode: str = "global",
                    ablation: str = "zero") -> torch.Tensor:
    """Iterative selective pruning (docs/method.md §3): `steps` times, recollect statistics on the model as pruned so
    far, score, and prune `frac` more of the neurons (never one already pruned).

    collect_forget / collect_retain: callables() -> NeuronStats, run on the model as it is at that moment
    (e.g. lambda: collect_stats(handle, forget_docs, max_tokens=...)). Returns the cumulative bool mask
    [L, d_mlp]; apply it with ablate(). Mean ablation uses the retain set's means from the first step.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    mask = torch.zeros(handle.n_layers, handle.d_mlp, dtype=torch.bool)
    means = None
    for _ in range(steps):
        with ablate(handle, mask, ablation, means) if mask.any() else contextlib.nullcontext():
            forget, retain = collect_forget(), collect_retain()
        if means is None and ablation == "mean":
            means = retain.mean
        scores = prune_scores(forget, retain, importance=importance, eps=eps, eps_relative=eps_relative).clone()
        scores[mask] = float("-inf")          # already pruned: never selected again
        mask |= select_neurons(scores, frac, mode)
    return mask


@contextlib.contextmanager
def ablate(handle, mask: torch.Tensor, mode: str = "zero", means: torch.Tensor | None = None) -> Iterator[None]:
    """Ablate the neurons in `mask` [L, d_mlp] while inside the context.

    mode="zero" multiplies them by 0; mode="mean" replaces them with `means` [L, d_mlp]
    (usually the retain set's NeuronStats.mean). Implemented as forward-pre-hooks on each layer's
    neuron module, removed on exit, so the model is exactly as before afterwards.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}: choose one of {', '.join(ABLATION_MODES)}")
    expected = (handle.n_layers, handle.d_mlp)
    mask = as_mask(mask)
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the model has [n_layers, d_mlp] = {list(expected)}")
    if mode == "mean":
        if means is None:
            raise ValueError("mode='mean' needs means=[n_layers, d_mlp], e.g. the retain set's NeuronStats.mean")
        if tuple(means.shape) != expected:
            raise ValueError(f"means has shape {tuple(means.shape)}, expected {list(expected)}")
    fns = {layer: _ablation_fn(~mask[layer], None if mode == "zero" else means[layer] * mask[layer])
           for layer in range(handle.n_layers) if mask[layer].any()}
    with handle.hooks(fns):
        yield


def first_layer(mask: torch.Tensor) -> int:
    """The first layer with a neuron in `mask` [L, d_mlp] (L when none): ablating it changes nothing below, so a
    models.BlockTape may replay the blocks under it."""
    layers = as_mask(mask).any(1).nonzero()
    return int(layers[0]) if len(layers) else int(mask.shape[0])


def _ablation_fn(keep: torch.Tensor, fill: torch.Tensor | None):
    cache: dict = {}

    def ablated(x):
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (keep.to(x.device, x.dtype),
                          None if fill is None else fill.to(x.device, x.dtype))
        k, f = cache[key]
        return x * k if f is None else x * k + f

    return ablated
