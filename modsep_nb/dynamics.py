"""Training dynamics (notebook 06): notebook 01's pipeline and claims at every training checkpoint of one model,
and how the final model's task structure forms on the way there.

A checkpoint is a Study of the same tasks (the same images or documents) on the weights saved at one step.
Every curve has an interval from resamples of sums already collected, drawn with the same seed at every
checkpoint: the documents are the same, so resamples are paired across checkpoints, and a trend or the step
where a curve settles gets an interval too.

- accuracy: top-1 over the evaluation images or tokens (bootstrap over documents; null band: chance level).
- 01's claims at each checkpoint: selectivity (selected minus matched random neurons: the first of
  pruning.random_seeds; no pseudo-task ablations, to keep ten checkpoints affordable), overlap_above_null
  (against pseudo-tasks), related_share_more (with groups); with the cross-task matrix and its random baseline.
- settling: each task's top-`frac` set's overlap with the final model's set (bootstrap over statistics blocks,
  the same draw at the checkpoint and at the end; null: layer-matched chance).
- pattern: Spearman rho of the task x task overlap matrix with the final one (bootstrap interval, permutation
  p and null band).
- correspondence: the tasks' mean z of their per-layer selections in the parameter split (k-means of W_in rows;
  interval over tasks; null band: the same selections in random balanced splits).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from . import plots, selective
from .claims import Claim, resample_p
from .correspondence import random_balanced_splits, task_correspondence
from .evaluation import selectivity
from .evidence import child_seeds, bootstrap_masks, paired_difference_ci, percentile_ci, ratio_of_sums
from .models import load_model
from .overlaps import layer_matched_chance, overlap, overlap_matrix, pattern_persistence
from .params import device_of, dtype_of
from .study import Study, training_options
from .vit_training import fmnist_vit_checkpoints

SETTLED_OVERLAP = 0.5     # a task's set has settled once its overlap with the final set stays at or above this
ACCURACY_SHARE = 0.9      # accuracy has arrived once it stays at or above this share of the final accuracy


# -- the checkpoints --------------------------------------------------------------------------------------------
def dynamics_params(params: dict) -> dict:
    """The params a checkpoint's Study runs on: the budgets and resample counts of params['dynamics'] (each
    checkpoint costs a full pipeline, so they are smaller than 01's), the rest as given."""
    p, dyn = copy.deepcopy(params), params["dynamics"]
    p["vit"]["stats_images"] = min(dyn["stats_images"], params["vit"]["stats_images"])   # the first of 01's images
    p["vit"]["eval_images"] = min(dyn["eval_images"], params["vit"]["eval_images"])
    p["evidence"].update(n_boot=dyn["n_boot"], n_null=dyn["n_null"],
                         n_null_ablation=min(params["evidence"]["n_null_ablation"], dyn["n_null"]))
    return p


def revision_step(revision: str) -> int | None:
    """The training step a revision names ("step1000", or a folder ending in step-1000), else None."""
    match = re.search(r"(\d+)$", Path(revision).name)
    return int(match.group(1)) if match else None


def checkpoint_studies(params: dict, kind: str = "vit") -> list[tuple[int, Study]]:
    """[(step, Study)] from the first checkpoint to the last, every one on the same tasks. vit: the checkpoints
    saved while training the Fashion-MNIST ViT (step 0 = its seeded initialisation; the last = the model the
    other notebooks load). lm: params['lm']['revisions'], hub revisions of lm.model or model folders."""
    if kind not in ("vit", "lm"):
        raise ValueError(f"kind must be 'vit' (the ViT trained here) or 'lm' (lm.revisions), got {kind!r}")
    p = dynamics_params(params)
    device = device_of(params)
    if device == "sharded":
        raise ValueError("notebook 06 loads every checkpoint whole: use device auto, cpu or cuda, not sharded")
    if kind == "vit":
        if p["vit"]["model"] != "fmnist-vit":
            raise ValueError(f"training checkpoints exist for the ViT trained here only (vit.model: fmnist-vit), "
                             f"not for {p['vit']['model']!r}")
        final = Study.from_params(p, kind)             # the model the other notebooks use, loaded the same way
        folders = fmnist_vit_checkpoints(**training_options(p, kind))
        last = max(folders)
        specs = [(step, str(folder), None) for step, folder in sorted(folders.items()) if step != last]
        labels = {step: f"{final.handle.name}@step-{step}" for step in folders}
    else:
        revisions = p["lm"]["revisions"]
        if not revisions:
            raise ValueError("lm.revisions is not set: name the model's training checkpoints (hub revisions such "
                             "as Pythia's step1000, or model folders), oldest first and the final model last")
        found = [revision_step(r) for r in revisions]
        steps = found if None not in found and found == sorted(set(found)) else list(range(len(revisions)))
        local = [Path(r).expanduser().is_dir() for r in revisions]
        final = Study.from_params(p, kind, handle=_load(p, kind, *((revisions[-1], None) if local[-1] else
                                                                    (p["lm"]["model"], revisions[-1])), device))
        last = steps[-1]
        specs = [(s, r, None) if is_dir else (s, p["lm"]["model"], r)
                 for s, r, is_dir in zip(steps[:-1], revisions[:-1], local[:-1])]
        labels = {s: f"{p['lm']['model']}@{r}" for s, r in zip(steps, revisions)}
    out = []
    for step, spec, revision in specs:
        handle = _load(p, kind, spec, revision, device)
        handle.name = labels[step]
        out.append((step, Study(handle, p, kind, final.tasks)))
    final.handle.name = labels[last]
    return out + [(last, final)]


def _load(params: dict, kind: str, spec: str, revision: str | None, device: str):
    return load_model(spec, revision=revision, dtype=dtype_of(params, kind), device=device)


# -- measures at one checkpoint ---------------------------------------------------------------------------------
def measure(study: Study, *, frac: float, groups: dict | None = None, seed: int | None = None) -> dict:
    """Everything 06 reads at one checkpoint, before comparing with the final one: 01's claims and evidence at
    the params' fractions; accuracy; the top-`frac` sets (observed and per bootstrap resample of the statistics
    blocks), their overlap matrix, and the per-layer correspondence z in the parameter split and in random ones."""
    params = study.params
    ev_p = params["evidence"]
    seed = params["seed"] if seed is None else seed
    # per checkpoint: one matched random seed and no pseudo-task ablations (06's claims are trends across
    # checkpoints, paired by seed; the full baseline and null are 01's, on the final model)
    fixed = study.cross_task(frac=params["pruning"]["frac"], random_seeds=params["pruning"]["random_seeds"][:1],
                             progress=False)
    evidence = selective.claims(study, params["pruning"]["frac"], groups, seed=seed, fixed=fixed,
                                selectivity_null=False)
    hits = study.document_hits()
    top1 = np.concatenate([h["top1"] for h in hits.values()]).astype(np.float64)
    n = np.concatenate([h["n"] for h in hits.values()]).astype(np.float64)
    accuracy = ratio_of_sums(top1, n, ev_p["n_boot"], seed)
    blocks = study.block_stats(progress=False)
    pipeline = study.pipeline(frac)
    stats = {t: b.merged() for t, b in blocks.items()}
    scores = study.scores(stats=stats)
    masks = study.masks(frac, mode=pipeline["mode"], scores=scores)
    boot_masks = list(bootstrap_masks(blocks, ev_p["n_boot"], seed, **pipeline))
    corr = correspondence_z(scores, study.splits("param", progress=False), frac,
                            n_null=params["correspondence"]["n_null"], n_splits=params["dynamics"]["n_splits"],
                            n_boot=ev_p["n_boot"], seed=seed)
    selected, random = evidence["selectivity"]["selected"], evidence["selectivity"]["random"]
    return {"evidence": evidence, "claims": evidence["claims"], "accuracy": accuracy,
            "chance_accuracy": _chance_accuracy(study), "masks": masks, "boot_masks": boot_masks,
            "matrix": overlap_matrix(masks)[1], "names": list(masks), "correspondence": corr,
            "selectivity": selectivity_of_right_tasks(selected, random),
            "cross_task": {"tasks": selected["tasks"], "selected": selected["matrix"], "random": random["matrix"]}}


def selectivity_of_right_tasks(selected: dict, random: dict) -> dict:
    """Selectivity beyond random neurons (selected minus random, observed and per resample) over the tasks the
    checkpoint gets right at all: a task at zero unpruned accuracy has no relative accuracy (its column is NaN)
    and is left out, instead of the whole checkpoint (issue #26 item 9; early checkpoints miss some classes).
    selected, random: cross_task_bootstrap results on the same documents. NaN with fewer than 2 such tasks."""
    tasks = list(selected["tasks"])
    right = ~(np.isnan(selected["matrix"]).all(0) | np.isnan(random["matrix"]).all(0))
    if right.sum() < 2:
        return {"estimate": float("nan"), "samples": np.full(len(selected["selectivity_samples"]), np.nan),
                "tasks": [t for t, r in zip(tasks, right) if r]}
    sub = np.ix_(right, right)
    return {"estimate": float(selectivity(selected["matrix"][sub]) - selectivity(random["matrix"][sub])),
            "samples": (selectivity(selected["samples"][:, right][:, :, right])
                        - selectivity(random["samples"][:, right][:, :, right])),
            "tasks": [t for t, r in zip(tasks, right) if r]}


def _chance_accuracy(study: Study) -> float | None:
    return study.handle.modality.chance_accuracy(study.handle)


def correspondence_z(scores: dict, labels: torch.Tensor, frac: float, *, n_null: int, n_splits: int, n_boot: int,
                     seed: int) -> dict:
    """Each task's per-layer top-`frac` selection in the split `labels`: its z against random balanced splits
    (correspondence.task_correspondence), averaged over layers; the mean over tasks with a bootstrap interval over
    tasks; and the same mean with `n_splits` random balanced splits in place of `labels` (the null band)."""
    def mean_z(split):
        per_task = task_correspondence(scores, split, frac, n_null=n_null, seed=seed)
        return np.array([np.nanmean(r.z.numpy()) for r in per_task.values()])
    task_z = mean_z(labels)
    n_layers, d_mlp = labels.shape
    n_experts = int(labels.max()) + 1
    null = []
    for child in child_seeds(seed + 7, n_splits):
        split = torch.stack([random_balanced_splits(d_mlp, n_experts, 1, seed=child + layer)[0]
                             for layer in range(n_layers)])
        null.append(float(np.nanmean(mean_z(split))))
    ci = paired_difference_ci(task_z, np.zeros_like(task_z), n_boot, seed)["ci"] if len(task_z) > 1 else \
        (float("nan"), float("nan"))
    return {"tasks": list(scores), "task_z": task_z, "estimate": float(np.nanmean(task_z)), "ci": ci,
            "null": np.array(null), "null_band": percentile_ci(null)}


# -- against the final checkpoint -------------------------------------------------------------------------------
def against_final(now: dict, final: dict, *, n_perm: int, seed: int) -> dict:
    """How close a checkpoint's sets and pattern are to the final model's: per task the overlap of the top sets
    (observed, per paired resample, layer-matched chance) and their mean over tasks; the Spearman rho of the
    task x task overlap matrices with its permutation p, permutation null and bootstrap samples."""
    names = final["names"]
    settle = np.array([overlap(now["masks"][t], final["masks"][t]) for t in names])
    boot = np.array([[overlap(a[t], b[t]) for t in names] for a, b in zip(now["boot_masks"], final["boot_masks"])])
    chance = np.array([layer_matched_chance(now["masks"][t], final["masks"][t]) for t in names])
    out = {"tasks": names, "overlap": settle, "overlap_samples": boot, "overlap_chance": chance,
           "mean_overlap": float(settle.mean()), "mean_overlap_samples": boot.mean(1),
           "mean_overlap_ci": percentile_ci(boot.mean(1)), "mean_chance": float(chance.mean()), "pattern": None}
    if len(names) >= 3:
        test = pattern_persistence(final["matrix"], now["matrix"], n_perm=n_perm, seed=seed, keep_null=True)
        samples = np.array([_rho(overlap_matrix(b)[1], overlap_matrix(a)[1])
                            for a, b in zip(now["boot_masks"], final["boot_masks"])])
        out["pattern"] = {"rho": test["rho"], "p": test["p_value"], "ci": percentile_ci(samples), "samples": samples,
                          "null_band": percentile_ci(test["null"]), "n_tasks": len(names)}
    return out


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rho of the upper triangles of two task x task matrices (NaN where either is constant)."""
    i, j = np.triu_indices(len(a), 1)
    x, y = a[i, j], b[i, j]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


# -- the three claims -------------------------------------------------------------------------------------------
def structure_at_init_claim(pattern: dict | None) -> Claim:
    """`structure_at_init`: the final task x task overlap pattern is already present at the first checkpoint
    (Spearman rho of the two matrices; bootstrap interval over statistics blocks; permutation p over task labels)."""
    statement = ("the task x task overlap pattern at initialisation correlates positively with the final model's "
                 "(Spearman rho of the first checkpoint's overlap matrix with the final one, above 0)")
    if pattern is None:
        return Claim("structure_at_init", statement + " [needs at least 3 tasks]", float("nan"),
                     (float("nan"), float("nan")), 0.0, p=float("nan"))
    return Claim("structure_at_init", statement, pattern["rho"], pattern["ci"], 0.0, p=pattern["p"],
                 n=pattern["n_tasks"], unit="tasks (permuted labels)")


def trend_claim(claim_id: str, statement: str, values, samples, *, n_perm: int, seed: int) -> Claim:
    """A monotone trend over checkpoints: Spearman rho of `values` [C] with the checkpoint order, against 0.
    Interval: the same rho in each paired resample (samples [n_boot, C]); p: one-sided, the order of the
    values permuted n_perm times. Checkpoints whose value is NaN (e.g. a task never right before pruning)
    are left out of all three."""
    values = np.asarray(values, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    keep = ~np.isnan(values)
    values, samples = values[keep], samples[:, keep]
    order = np.arange(len(values), dtype=np.float64)
    if len(values) < 3:
        return Claim(claim_id, statement + f" [{len(values)} checkpoints with a value: too few]", float("nan"),
                     (float("nan"), float("nan")), 0.0, p=float("nan"), n=int(len(values)))
    rho = _spearman(order, values)
    boot = np.array([_spearman(order[~np.isnan(s)], s[~np.isnan(s)]) if np.sum(~np.isnan(s)) >= 3 else np.nan
                     for s in samples])
    rng = np.random.default_rng(seed)
    null = np.array([_spearman(order, rng.permutation(values)) for _ in range(n_perm)])
    p = resample_p(null, null >= rho - 1e-12, rho)      # NaN (constant values): no test
    return Claim(claim_id, statement, rho, percentile_ci(boot), 0.0, p=p, n=int(len(values)), unit="checkpoints")


def _spearman(x, y) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)


def settled_at(curve, threshold) -> np.ndarray | float:
    """The first checkpoint index from which `curve` stays at or above `threshold` to the end (NaN if the last
    value is below it). curve [C] -> a number; [n, C] -> [n] (one per resample); threshold: a number or [n]."""
    curve = np.asarray(curve, dtype=np.float64)
    flat = curve[None] if curve.ndim == 1 else curve
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float64), flat.shape[:1])[:, None]
    below = ~(flat >= threshold)                            # NaN counts as below
    last_below = np.where(below.any(1), flat.shape[1] - 1 - np.argmax(below[:, ::-1], axis=1), -1)
    index = (last_below + 1).astype(np.float64)
    index[index >= flat.shape[1]] = np.nan
    return float(index[0]) if curve.ndim == 1 else index


def settle_before_accuracy_claim(overlap_curve, overlap_samples, accuracy, accuracy_samples, steps, *,
                                 settled: float = SETTLED_OVERLAP, share: float = ACCURACY_SHARE,
                                 n: int | None = None) -> tuple[Claim, dict]:
    """`sets_settle_before_accuracy`: the checkpoint from which the tasks' mean top-set overlap with the final
    sets stays >= `settled`, against the checkpoint from which accuracy stays >= `share` x the final accuracy.
    Estimate: the difference in checkpoints (log-spaced steps), accuracy's minus the sets'; positive = the sets
    settle first. Interval: the same difference in each paired resample (overlap_samples and accuracy_samples
    [n_boot, C], the final accuracy being each resample's own last value); p: the share of resamples where the
    sets do not settle first. n: the evaluation documents (images) the resamples draw (the claim's unit: its
    interval and p come from resampling them, not the checkpoints). Also returns both steps."""
    overlap_curve, accuracy = np.asarray(overlap_curve, float), np.asarray(accuracy, float)
    overlap_samples, accuracy_samples = np.asarray(overlap_samples, float), np.asarray(accuracy_samples, float)
    sets_at = settled_at(overlap_curve, settled)
    acc_at = settled_at(accuracy, share * accuracy[-1])
    diff = settled_at(accuracy_samples, share * accuracy_samples[:, -1]) - settled_at(overlap_samples, settled)
    p = resample_p(diff, diff <= 0, acc_at - sets_at)      # a resample where either never settles counts against
    step = lambda k: None if np.isnan(k) else int(steps[int(k)])      # noqa: E731
    claim = Claim("sets_settle_before_accuracy", f"the tasks' top neuron sets settle (mean overlap with the final "
                  f"sets stays >= {settled:g}) before accuracy arrives (stays >= {share:.0%} of the final accuracy); "
                  f"difference in log-spaced checkpoints", acc_at - sets_at, percentile_ci(diff), 0.0, p=p,
                  n=n, unit="evaluation documents (paired resamples at every checkpoint)", test="one-sided bootstrap p",
                  bootstrap=True)
    return claim, {"sets_settle_step": step(sets_at), "accuracy_step": step(acc_at), "sets_settle_index": sets_at,
                   "accuracy_index": acc_at}


def settle_sensitivity(run, settled_values, share_values) -> list[dict]:
    """sets_settle_before_accuracy at every pair of thresholds (a sensitivity table beside the claim, not more tests):
    per pair the estimate, interval, raw p and the two steps, from the run's curves and paired resamples."""
    overlap = ([v["mean_overlap"] for v in run.versus], np.stack([v["mean_overlap_samples"] for v in run.versus], 1))
    accuracy = ([m["accuracy"]["estimate"] for m in run.measures],
                np.stack([m["accuracy"]["samples"] for m in run.measures], 1))
    rows = []
    for settled in settled_values:
        for share in share_values:
            claim, at = settle_before_accuracy_claim(*overlap, *accuracy, run.steps, settled=settled, share=share)
            rows.append({"settled_overlap": settled, "accuracy_share": share, "estimate": claim.estimate,
                         "ci": claim.ci, "p": claim.p, "sets_settle_step": at["sets_settle_step"],
                         "accuracy_step": at["accuracy_step"]})
    return rows


# -- the whole notebook's numbers ---------------------------------------------------------------------------------
@dataclass
class DynamicsRun:
    """What follow() found over one training run, in checkpoint order (the final last)."""
    steps: list                 # training steps
    labels: list                # each checkpoint's model label
    measures: list              # measure() at each checkpoint
    versus: list                # against_final() of each checkpoint
    claims: list                # dynamics_claims: structure_at_init, selectivity_grows, sets_settle_before_accuracy
    settle: dict                # the steps (and checkpoint indices) where the sets and accuracy settle


def follow(studies: list, *, frac: float, groups: dict | None = None, progress: bool = True,
           suffix: str = "") -> DynamicsRun:
    """measure() at every checkpoint of `studies` ([(step, Study)], the final last) and against_final() for each;
    then the claims, their ids ending in `suffix` (e.g. "[lm]")."""
    steps = [s for s, _ in studies]
    params = studies[-1][1].params
    measures = []
    for step, study in studies:
        measures.append(measure(study, frac=frac, groups=groups))
        if progress:
            print(f"step {step}: {study.label}: accuracy {measures[-1]['accuracy']['estimate']:.3f}", flush=True)
    versus = [against_final(m, measures[-1], n_perm=params["evidence"]["n_perm"], seed=params["seed"])
              for m in measures]
    dyn = params["dynamics"]
    claims, settle = dynamics_claims(steps, measures, versus, n_perm=params["evidence"]["n_perm"], seed=params["seed"],
                                     suffix=suffix, settled=dyn["settled_overlap"], share=dyn["accuracy_share"])
    return DynamicsRun(steps, [st.label for _, st in studies], measures, versus, claims, settle)


def dynamics_claims(steps, measures: list, versus: list, *, n_perm: int, seed: int, suffix: str = "",
                    settled: float = SETTLED_OVERLAP, share: float = ACCURACY_SHARE) -> tuple:
    """The three claims of notebook 06 (ids structure_at_init, selectivity_grows, sets_settle_before_accuracy,
    with `suffix` appended, e.g. "[lm]"), and the steps where sets and accuracy settle (settled, share: the
    thresholds, dynamics.settled_overlap and dynamics.accuracy_share)."""
    from dataclasses import replace
    init = structure_at_init_claim(versus[0]["pattern"])
    grows = trend_claim("selectivity_grows", "selectivity (01's: others' minus own relative accuracy, selected minus "
                        "random neurons, over the tasks each checkpoint gets right at all) grows over training "
                        "(Spearman rho with the checkpoint order)",
                        [m["selectivity"]["estimate"] for m in measures],
                        np.stack([m["selectivity"]["samples"] for m in measures], 1), n_perm=n_perm, seed=seed)
    settle, at = settle_before_accuracy_claim([v["mean_overlap"] for v in versus],
                                              np.stack([v["mean_overlap_samples"] for v in versus], 1),
                                              [m["accuracy"]["estimate"] for m in measures],
                                              np.stack([m["accuracy"]["samples"] for m in measures], 1), steps,
                                              settled=settled, share=share, n=measures[-1]["accuracy"]["n"])
    claims = [init, grows, settle]
    return [replace(c, id=c.id + suffix) for c in claims], at


def curves(run: DynamicsRun) -> dict:
    """Per measure (estimate [C], low [C], high [C]) and its null, in checkpoint order: what the figures draw and
    the results JSON records."""
    ms, vs = run.measures, run.versus
    ci = lambda pairs: (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))   # noqa: E731
    overlap_ev = [m["evidence"]["overlap"] for m in ms]
    pattern = [v["pattern"] or {"rho": np.nan, "ci": (np.nan, np.nan), "null_band": (np.nan, np.nan), "p": np.nan}
               for v in vs]
    return {
        "accuracy": ((np.array([m["accuracy"]["estimate"] for m in ms]), *ci([m["accuracy"]["ci"] for m in ms])),
                     ms[-1]["chance_accuracy"]),
        "selectivity": ((np.array([m["selectivity"]["estimate"] for m in ms]),
                         *ci([percentile_ci(m["selectivity"]["samples"]) for m in ms])), 0.0),
        "median_overlap": ((np.array([e["median"] for e in overlap_ev]), *ci([e["median_ci"] for e in overlap_ev])),
                           ci([e["null_band"] for e in overlap_ev])),
        "overlap_with_final": ((np.array([v["mean_overlap"] for v in vs]), *ci([v["mean_overlap_ci"] for v in vs])),
                               np.array([v["mean_chance"] for v in vs])),
        "pattern_rho": ((np.array([p["rho"] for p in pattern]), *ci([p["ci"] for p in pattern])),
                        ci([p["null_band"] for p in pattern])),
        "correspondence_z": ((np.array([m["correspondence"]["estimate"] for m in ms]),
                              *ci([m["correspondence"]["ci"] for m in ms])),
                             ci([m["correspondence"]["null_band"] for m in ms])),
    }


def record(run: DynamicsRun) -> dict:
    """The results JSON's per-checkpoint record (no masks or resamples)."""
    rows = []
    for step, label, m, v in zip(run.steps, run.labels, run.measures, run.versus):
        ov = m["evidence"]["overlap"]
        rows.append({"step": step, "model": label, "accuracy": {k: m["accuracy"][k] for k in ("estimate", "ci", "n")},
                     "claims": [c.as_dict() for c in m["claims"]], "cross_task": m["cross_task"],
                     "selectivity": {"estimate": m["selectivity"]["estimate"], "tasks": m["selectivity"]["tasks"]},
                     "overlap": {"median": ov["median"], "median_ci": ov["median_ci"], "null_median": ov["null_median"],
                                 "null_band": ov["null_band"], "layer_matched_chance": ov["layer_matched_chance"]},
                     "overlap_with_final": {"tasks": v["tasks"], "per_task": v["overlap"], "mean": v["mean_overlap"],
                                            "ci": v["mean_overlap_ci"], "layer_matched_chance": v["overlap_chance"]},
                     "pattern": None if v["pattern"] is None else {k: v["pattern"][k] for k in
                                                                   ("rho", "ci", "p", "null_band", "n_tasks")},
                     "correspondence": {k: m["correspondence"][k] for k in ("tasks", "task_z", "estimate", "ci",
                                                                             "null_band")}})
    return {"steps": run.steps, "checkpoints": rows, "settle": run.settle}


def findings(claims: list, settle: dict) -> str:
    """One sentence per claim, from its record: the estimate, interval and p, and plainly whether it holds."""
    by_id = {c.id.split("[")[0]: c for c in claims}
    def verdict(c):
        p = "" if c.p is None or np.isnan(c.p) else f", p = {c.p:.2g}"
        numbers = f"{c.estimate:.2f} (95% CI [{c.ci[0]:.2f}, {c.ci[1]:.2f}]{p})"
        return numbers, c.supported
    out = []
    c = by_id["structure_at_init"]
    numbers, ok = verdict(c)
    out.append(f"* `{c.id}`: the overlap pattern at initialisation against the final one, Spearman rho {numbers}: "
               + (f"the step-0 task x task pattern correlates positively with the final one (a partial rank "
                  f"agreement, rho {c.estimate:.2f}; not a test that the final pattern is already there)." if ok else
                  "not significant; this run does not show the step-0 pattern correlating with the final one."))
    c = by_id["selectivity_grows"]
    numbers, ok = verdict(c)
    out.append(f"* `{c.id}`: the trend of selectivity over {c.n} checkpoints, Spearman rho {numbers}: "
               + ("selectivity grows over training." if ok else "not significant; no monotone growth is shown."))
    c = by_id["sets_settle_before_accuracy"]
    numbers, ok = verdict(c)
    where = (f"the sets settle at step {settle['sets_settle_step']}, accuracy arrives at step {settle['accuracy_step']}"
             if settle["sets_settle_step"] is not None and settle["accuracy_step"] is not None else
             "one of the two never settles before the end")
    out.append(f"* `{c.id}`: {where}; accuracy's checkpoint minus the sets', {numbers}: "
               + ("the neuron sets settle before accuracy arrives." if ok else
                  "not significant; this run does not show the sets settling first."))
    return "\n".join(out) + "\n"


# -- notebook 06's steps ----------------------------------------------------------------------------------------
FIGURES = (     # (curve, y label, null label, title, caption); the titles' {} are filled from the params
    ("accuracy", "test accuracy (top-1)", "chance", "Test accuracy over training",
     "Accuracy rises from chance; the other curves say whether the task structure forms before, with or after it."),
    ("selectivity", "selectivity beyond random neurons", "null (0)",
     "01's selectivity at {pruned:.0%} pruned, selected minus random",
     "Modular: above 0 (pruning a task's neurons hurts it more than the others, beyond random neurons)."),
    ("median_overlap", "median pairwise overlap", "pseudo-task null (95%)",
     "Median pairwise overlap of top-{overlap:.0%} sets",
     "Read as 01/02's overlap_above_null: above the null band, the tasks' sets overlap more than the null's; "
     "below it, they are more separate."),
    ("overlap_with_final", "overlap with the final set (mean over tasks)", "layer-matched chance",
     "How settled each task's top-{frac:.0%} sets are: overlap with the final model's",
     "A set has settled once its overlap with the final set stays high; thin lines: single tasks."),
    ("pattern_rho", "Spearman rho with the final matrix", "permutation null (95%)",
     "Pattern persistence: task x task overlap vs the final one",
     "Above the band: the checkpoint's pattern correlates with the final one beyond shuffled task labels."),
    ("correspondence_z", "mean z in the parameter split", "random splits (95%)",
     "Correspondence of the tasks' per-layer top-{frac:.0%} sets with W_in's k-means split",
     "Above the band: task neurons cluster in W_in's experts; compare when this appears with the accuracy curve."),
)
LM_CURVES = ("accuracy", "overlap_with_final", "pattern_rho", "correspondence_z")


class TrainingDynamics:
    """Notebook 06's steps: the embedded ViT's training checkpoints (and a language model's, where lm.revisions
    names them). Every step computes what it needs on demand, so the cells run in any order after the setup cell.

        td = TrainingDynamics(report)
        td.checkpoints()              # the checkpoints of one training run
        run = td.run                  # follow(): the pipeline and claims at every checkpoint (DynamicsRun)
        td.figures()                  # each measure against the training step
        td.evidence()                 # the claims, their forest plot and p
        td.language_model()           # the same on lm.revisions, or one line saying it is skipped
        text = td.findings()
        report.save(td.results())
    """

    def __init__(self, report):
        self.report, self.params = report, report.params
        self.dyn = self.params["dynamics"]

    @cached_property
    def studies(self) -> list[tuple[int, Study]]:
        return checkpoint_studies(self.params, "vit")

    def checkpoints(self) -> list[tuple[int, Study]]:
        final = self.studies[-1][1]
        print(final.describe())
        print("checkpoints (training steps):", [s for s, _ in self.studies])
        print("final checkpoint:", final.label, "| test accuracy stored with it:", final.handle.info.get("test_accuracy"))
        return self.studies

    @cached_property
    def run(self) -> DynamicsRun:
        """follow() over the checkpoints; related tasks (tasks.groups) for the related_share_more claim."""
        return follow(self.studies, frac=self.dyn["frac"], groups=self.studies[-1][1].tasks.groups)

    @cached_property
    def curves(self) -> dict:
        return curves(self.run)

    def check(self) -> dict:
        """The steps, accuracy and mean overlap with the final sets at each checkpoint (rounded: a check)."""
        return {"steps": self.run.steps, "accuracy": np.round(self.curves["accuracy"][0][0], 3).tolist(),
                "overlap with the final sets": np.round(self.curves["overlap_with_final"][0][0], 2).tolist()}

    def figures(self) -> None:
        """Every measure against the training step, with its interval and null."""
        run, names = self.run, {"pruned": self.params["pruning"]["frac"], "overlap": self.params["overlap"]["frac"],
                                "frac": self.dyn["frac"]}
        for key, ylabel, null_label, title, caption in FIGURES:
            line, null = self.curves[key]
            thin = ({t: [v["overlap"][k] for v in run.versus] for k, t in enumerate(run.versus[0]["tasks"])}
                    if key == "overlap_with_final" else None)
            self.report.show(plots.over_steps(run.steps, {ylabel: line}, null=null, null_label=null_label, thin=thin,
                                              title=title.format(**names), ylabel=ylabel), f"06_{key}", caption)

    @cached_property
    def claims(self) -> list[Claim]:
        """The run's claims, recorded in the report."""
        self.report.claim(*self.run.claims)
        return self.run.claims

    def evidence(self) -> list[Claim]:
        """The claims' forest plot, one line per claim, and where the sets and accuracy settle."""
        self.report.claims_figure("06_claims", self.claims)
        self.report.print_claims(self.claims)
        print("sets settle at step", self.run.settle["sets_settle_step"], "| accuracy arrives at step",
              self.run.settle["accuracy_step"])
        return self.claims

    @cached_property
    def settle_rows(self) -> list[dict]:
        """sets_settle_before_accuracy under every pair of dynamics.settled_sweep x dynamics.share_sweep."""
        return settle_sensitivity(self.run, self.dyn["settled_sweep"], self.dyn["share_sweep"])

    def sensitivity(self) -> list[dict]:
        """sets_settle_before_accuracy under every pair of dynamics.settled_sweep x dynamics.share_sweep, one table
        row each (the claim itself uses dynamics.settled_overlap and accuracy_share, fixed in advance)."""
        rows = self.settle_rows
        print("| settled overlap | accuracy share | sets settle at step | accuracy at step | estimate | 95% interval | p |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['settled_overlap']:g} | {r['accuracy_share']:g} | {r['sets_settle_step']} | "
                  f"{r['accuracy_step']} | {r['estimate']:.2f} | [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['p']:.2g} |")
        return rows

    @cached_property
    def lm_run(self) -> DynamicsRun | None:
        """follow() over lm.revisions (claims with "[lm]" in their ids, recorded), or None where it is not set."""
        if not self.params["lm"]["revisions"]:
            return None
        run = follow(checkpoint_studies(self.params, "lm"), frac=self.dyn["frac"], suffix="[lm]")
        self.report.claim(*run.claims)
        return run

    def language_model(self) -> DynamicsRun | None:
        """The language model's curves, or one line saying the section is skipped and how to run it."""
        if self.lm_run is None:
            print("lm.revisions is not set: this section is skipped (set it to a model's training checkpoints, e.g. "
                  "Pythia's hub revisions, to follow a language model).")
            return None
        lm_curves = curves(self.lm_run)
        for key in LM_CURVES:
            line, null = lm_curves[key]
            self.report.show(plots.over_steps(self.lm_run.steps, {key: line}, null=null, ylabel=key,
                                              title=f"{key} over training — {self.lm_run.labels[-1]}"),
                             f"06_lm_{key}", "The same measures as above, on the language model's checkpoints.")
        return self.lm_run

    def findings(self) -> str:
        """The findings in words, every number from this run's records; verdicts only through the claims."""
        run, steps, acc = self.run, self.run.steps, self.curves["accuracy"][0][0]
        if len(steps) < 3 or steps[0] != 0 or not np.all(np.diff(steps) > 0) or not np.all((acc >= 0) & (acc <= 1)):
            raise RuntimeError(f"the checkpoints must be at least 3 increasing steps from 0 with accuracies in [0, 1]; "
                               f"got steps {steps}, accuracies {acc.tolist()}")
        text = (f"Model: {self.studies[-1][1].describe()}; {len(steps)} checkpoints of one training run, steps {steps} "
                f"(step 0: the seeded initialisation, as in notebook 04; the last: the model of the other notebooks). "
                f"Test accuracy on {run.measures[-1]['accuracy']['n']} "
                f"images goes from {acc[0]:.3f} at step 0 to {acc[-1]:.3f} at the end.\n\n")
        text += findings(self.report.adjusted(self.claims), run.settle)
        if self.lm_run is not None:
            text += f"\n**Language model** ({self.lm_run.labels[-1]}, checkpoints {self.lm_run.steps}):\n\n"
            text += findings(self.report.adjusted(self.lm_run.claims), self.lm_run.settle)
        return text

    def results(self) -> dict:
        """The numbers of this run for the results JSON (the claims recorded first: report.save lists them)."""
        self.claims, self.lm_run        # noqa: B018
        return {"vit": record(self.run), "lm": None if self.lm_run is None else record(self.lm_run),
                "settle_sensitivity": self.settle_rows,
                "dynamics": self.dyn, "params": self.params}
