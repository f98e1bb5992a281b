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
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from .claims import Claim, resample_p
from .correspondence import random_balanced_splits, task_correspondence
from .evidence import _seeds, bootstrap_masks, paired_difference_ci, percentile_ci, ratio_of_sums
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
    evidence = study.claims(params["pruning"]["frac"], groups, seed=seed, fixed=fixed, selectivity_null=False)
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
            "selectivity": {"estimate": float(selected["selectivity"] - random["selectivity"]),
                            "samples": selected["selectivity_samples"] - random["selectivity_samples"]},
            "cross_task": {"tasks": selected["tasks"], "selected": selected["matrix"], "random": random["matrix"]}}


def _chance_accuracy(study: Study) -> float | None:
    n_labels = getattr(study.handle.model.config, "num_labels", None) if study.kind == "vit" else None
    return 1.0 / n_labels if n_labels else None


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
    for child in _seeds(seed + 7, n_splits):
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
    statement = ("the final model's task x task overlap pattern is already present at initialisation (Spearman rho "
                 "of the first checkpoint's overlap matrix with the final one)")
    if pattern is None:
        return Claim("structure_at_init", statement + " [needs at least 3 tasks]", float("nan"),
                     (float("nan"), float("nan")), 0.0, p=float("nan"))
    return Claim("structure_at_init", statement, pattern["rho"], pattern["ci"], 0.0, p=pattern["p"],
                 n=pattern["n_tasks"])


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
    return Claim(claim_id, statement, rho, percentile_ci(boot), 0.0, p=p, n=int(len(values)))


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
                                 settled: float = SETTLED_OVERLAP, share: float = ACCURACY_SHARE) -> tuple[Claim, dict]:
    """`sets_settle_before_accuracy`: the checkpoint from which the tasks' mean top-set overlap with the final
    sets stays >= `settled`, against the checkpoint from which accuracy stays >= `share` x the final accuracy.
    Estimate: the difference in checkpoints (log-spaced steps), accuracy's minus the sets'; positive = the sets
    settle first. Interval: the same difference in each paired resample (overlap_samples and accuracy_samples
    [n_boot, C], the final accuracy being each resample's own last value); p: the share of resamples where the
    sets do not settle first. Also returns both steps."""
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
                  n=len(overlap_curve))
    return claim, {"sets_settle_step": step(sets_at), "accuracy_step": step(acc_at), "sets_settle_index": sets_at,
                   "accuracy_index": acc_at}


# -- the whole notebook's numbers ---------------------------------------------------------------------------------
def follow(studies: list, *, frac: float, groups: dict | None = None, progress: bool = True) -> dict:
    """measure() at every checkpoint of `studies` ([(step, Study)], the final last) and against_final() for each;
    then the claims. Returns {"steps", "labels", "measures", "versus", "claims", "settle"}."""
    steps = [s for s, _ in studies]
    params = studies[-1][1].params
    measures = []
    for step, study in studies:
        measures.append(measure(study, frac=frac, groups=groups))
        if progress:
            print(f"step {step}: {study.label}: accuracy {measures[-1]['accuracy']['estimate']:.3f}", flush=True)
    versus = [against_final(m, measures[-1], n_perm=params["evidence"]["n_perm"], seed=params["seed"])
              for m in measures]
    claims, settle = dynamics_claims(steps, measures, versus, n_perm=params["evidence"]["n_perm"], seed=params["seed"])
    return {"steps": steps, "labels": [st.label for _, st in studies], "measures": measures, "versus": versus,
            "claims": claims, "settle": settle}


def dynamics_claims(steps, measures: list, versus: list, *, n_perm: int, seed: int, suffix: str = "") -> tuple:
    """The three claims of notebook 06 (ids structure_at_init, selectivity_grows, sets_settle_before_accuracy,
    with `suffix` appended, e.g. "[lm]"), and the steps where sets and accuracy settle."""
    from dataclasses import replace
    init = structure_at_init_claim(versus[0]["pattern"])
    grows = trend_claim("selectivity_grows", "selectivity (01's: others' minus own relative accuracy, selected minus "
                        "random neurons) grows over training (Spearman rho with the checkpoint order)",
                        [m["selectivity"]["estimate"] for m in measures],
                        np.stack([m["selectivity"]["samples"] for m in measures], 1), n_perm=n_perm, seed=seed)
    settle, at = settle_before_accuracy_claim([v["mean_overlap"] for v in versus],
                                              np.stack([v["mean_overlap_samples"] for v in versus], 1),
                                              [m["accuracy"]["estimate"] for m in measures],
                                              np.stack([m["accuracy"]["samples"] for m in measures], 1), steps)
    claims = [init, grows, settle]
    return [replace(c, id=c.id + suffix) for c in claims], at


def curves(run: dict) -> dict:
    """Per measure (estimate [C], low [C], high [C]) and its null, in checkpoint order: what the figures draw and
    the results JSON records."""
    ms, vs = run["measures"], run["versus"]
    ci = lambda pairs: (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))   # noqa: E731
    overlap_ev = [m["evidence"]["overlap"] for m in ms]
    sel_claims = [next(c for c in m["claims"] if c.id == "selectivity") for m in ms]
    pattern = [v["pattern"] or {"rho": np.nan, "ci": (np.nan, np.nan), "null_band": (np.nan, np.nan), "p": np.nan}
               for v in vs]
    return {
        "accuracy": ((np.array([m["accuracy"]["estimate"] for m in ms]), *ci([m["accuracy"]["ci"] for m in ms])),
                     ms[-1]["chance_accuracy"]),
        "selectivity": ((np.array([c.estimate for c in sel_claims]), *ci([c.ci for c in sel_claims])), 0.0),
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


def record(run: dict) -> dict:
    """The results JSON's per-checkpoint record (no masks or resamples)."""
    rows = []
    for step, label, m, v in zip(run["steps"], run["labels"], run["measures"], run["versus"]):
        ov = m["evidence"]["overlap"]
        rows.append({"step": step, "model": label, "accuracy": {k: m["accuracy"][k] for k in ("estimate", "ci", "n")},
                     "claims": [c.as_dict() for c in m["claims"]], "cross_task": m["cross_task"],
                     "overlap": {"median": ov["median"], "median_ci": ov["median_ci"], "null_median": ov["null_median"],
                                 "null_band": ov["null_band"], "layer_matched_chance": ov["layer_matched_chance"]},
                     "overlap_with_final": {"tasks": v["tasks"], "per_task": v["overlap"], "mean": v["mean_overlap"],
                                            "ci": v["mean_overlap_ci"], "layer_matched_chance": v["overlap_chance"]},
                     "pattern": None if v["pattern"] is None else {k: v["pattern"][k] for k in
                                                                   ("rho", "ci", "p", "null_band", "n_tasks")},
                     "correspondence": {k: m["correspondence"][k] for k in ("tasks", "task_z", "estimate", "ci",
                                                                             "null_band")}})
    return {"steps": run["steps"], "checkpoints": rows, "settle": run["settle"]}


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
               + ("the final task x task pattern is already present at step 0." if ok else
                  "not significant; this run does not show the final pattern at step 0."))
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
