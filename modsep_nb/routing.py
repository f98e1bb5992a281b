"""MoEfication's steps (notebook 03): each MLP split into experts three ways, how stable each split is, and how
much of the dense accuracy oracle top-k routing (and a fitted router) keeps. Every step computes what it needs
on demand, so the notebook's cells run in any order after the setup cell.

    mo = Routing(report)                 # the params' lm and vit models (loaded on first use)
    mo.models()                          # each model, its tasks and its expert count
    mo.build_splits()                    # param / coactivation / random splits (cached on disk), W_in inertia
    mo.split_agreement()                 # adjusted Rand index between splits and seeds
    mo.routing_quality()                 # the routing curves with their bands, and the claims
    text = mo.findings()                 # the findings in words
    report.save(mo.results())

`routing_evidence`, `routing_curve` and `fit_study_router` are the routing measures on one Study.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from . import plots
from .evidence import excess_claim, percentile_ci, resampled_ratio
from .moefication import (Router, expert_routing, fit_router, inertia, layer_inertias, normalize_rows,
                          predicted_routing, split_agreement)
from .statistics import bootstrap_weights
from .study import Study

METHODS = ("param", "coactivation", "random")
# under another seed: the parameter split (k-means restarts) and the random one (chance); not the co-activation
# split, whose partitioner (METIS) returns the same partition whatever the seed, so its ARI would be 1 by construction
RESEEDED = ("param", "random")
FITTED = "param, fitted router"


def _kept(study: Study, frac: float) -> int:
    return max(1, int(round(frac * study.n_experts)))


def routing_evidence(study: Study, splits: dict, keep_fracs, tasks=None, *, reseeded=(), claim_frac=None) -> dict:
    """MoEfication's oracle routing for each split in `splits` ({method: labels}, with "random" among them),
    from per-document hits: "curve" {method: {keep_frac: {task: accuracy relative to dense}}} (as
    routing_curve), "bands" {method: {keep_frac: 95% interval of the mean over tasks}}, and the claims
    `<method>_routing_beats_random[<kind>]`: the relative accuracy averaged over tasks at `claim_frac` (None: over
    the kept fractions below 1), method minus random, against 0.
    reseeded: further seeds' splits [{method: labels}] (a method left out keeps the first seed's split, e.g. a
    deterministic partitioner): the claims' outer loop (issue #26 item 8). Each seed's difference is read on the
    same resampled documents; the claim's estimate is the mean over seeds and its interval and one-sided bootstrap
    p resample seeds and documents together, so no verdict rests on one split or one random draw.
    "seeds" {method: each seed's difference} records the spread."""
    if "random" not in splits:
        raise ValueError("routing_evidence compares each split with the random one: include 'random' in splits")
    ev, seed, kind = study.params["evidence"], study.params["seed"], study.kind
    tasks = list(tasks or study.task_names)
    dense = {t: h["top1"] for t, h in study.document_hits(tasks).items()}
    curve, hits = {}, {}
    for method, labels in splits.items():
        curve[method], hits[method] = {}, {}
        for frac in keep_fracs:
            if _kept(study, frac) >= study.n_experts:
                curve[method][frac] = {t: 1.0 for t in tasks}
                continue
            hits[method][frac] = _routed_hits(study, labels, frac, tasks)
            curve[method][frac] = {t: float(resampled_ratio(hits[method][frac][t], dense[t])) for t in tasks}
    weights = {t: bootstrap_weights(len(dense[t]), ev["n_boot"], seed + i).numpy() for i, t in enumerate(tasks)}

    def relative(method_hits, mean=np.mean):     # {frac: {task: hits}} -> observed, [n_boot]: mean over tasks, fracs
        observed = mean([resampled_ratio(h[t], dense[t]) for h in method_hits.values() for t in tasks])
        boot = mean([[resampled_ratio(h[t], dense[t], weights[t]) for t in tasks] for h in method_hits.values()],
                    axis=(0, 1))
        return float(observed), boot
    bands = {}          # 95% interval of each curve point (mean over tasks), the same resamples as the claims
    for method in splits:
        bands[method] = {f: (1.0, 1.0) for f in keep_fracs if f not in hits[method]}   # every expert kept
        for f in hits[method]:
            bands[method][f] = percentile_ci(relative({f: hits[method][f]}, np.nanmean)[1])
    claim_fracs = list(hits["random"]) if claim_frac is None else [claim_frac]
    if any(f not in hits["random"] for f in claim_fracs):
        raise ValueError(f"claim_frac {claim_frac} is not among the routed keep_fracs {list(hits['random'])}")
    per_seed = [{m: {f: hits[m][f] for f in claim_fracs} for m in splits}]
    for other in reseeded:              # only the redrawn splits are routed again
        per_seed.append({m: ({f: _routed_hits(study, other[m], f, tasks) for f in claim_fracs} if m in other
                             else per_seed[0][m]) for m in splits})
    claims, seeds = [], {}
    claimed = [m for m in splits if m != "random" and hits[m]]
    ratios = [{m: relative(s[m]) for m in ["random", *claimed]} for s in per_seed]     # (observed, [n_boot]) each
    for method in claimed:
        diffs = [(r[method][0] - r["random"][0], r[method][1] - r["random"][1]) for r in ratios]
        observed, boot = seeds_and_documents(np.array([d[0] for d in diffs]), np.stack([d[1] for d in diffs]), seed)
        seeds[method] = [d[0] for d in diffs]
        where = "kept fractions < 1" if claim_frac is None else f"{claim_frac:.1%} of the experts kept"
        claims.append(excess_claim(f"{method}_routing_beats_random[{kind}]", f"{kind}: with {method}-split "
                                   f"experts, oracle top-k routing keeps more of the dense accuracy than with random "
                                   f"experts (relative accuracy, mean over {len(tasks)} tasks at {where}, {method} "
                                   f"minus random, mean over {len(per_seed)} split seeds)", observed, boot, None,
                                   n=int(sum(len(dense[t]) for t in tasks)), seed=seed,
                                   unit="evaluation documents (with the split seeds resampled too)",
                                   test="one-sided bootstrap p over seeds and documents"))
    return {"curve": curve, "bands": bands, "claims": claims, "seeds": seeds}


def _routed_hits(study: Study, labels: torch.Tensor, frac: float, tasks: list) -> dict:
    """{task: top-1 hits per evaluation document} with each token routed to its top-k experts of `labels`."""
    with expert_routing(study.handle, labels, _kept(study, frac)):
        return {t: h["top1"] for t, h in study.document_hits(tasks).items()}


def seeds_and_documents(observed, boot, seed: int) -> tuple[float, np.ndarray]:
    """A statistic measured under S seeds (observed [S]), each with bootstrap resamples over the same documents
    (boot [S, n_boot], column k the same documents in every row): the mean over seeds, and its resamples with
    the seeds drawn with replacement too (resample k: the mean of boot[s, k] over S seeds drawn for it), so the
    interval carries the spread between seeds as well as the documents'."""
    observed, boot = np.asarray(observed, dtype=np.float64), np.asarray(boot, dtype=np.float64)
    n_seeds, n_boot = boot.shape
    drawn = np.random.default_rng(seed).integers(0, n_seeds, size=(n_boot, n_seeds))    # [n_boot, S] seed indices
    return float(observed.mean()), boot[drawn, np.arange(n_boot)[:, None]].mean(1)


def fit_study_router(study: Study, labels: torch.Tensor, *, progress: bool = False) -> Router:
    """A learned router for split `labels`: per layer a linear predictor of each expert's score from the
    MLP input, fitted on the statistics data of every task (coactivation_tokens in all), never on the
    evaluation data the routing curve is scored on."""
    n_tokens = study.params["moefication"]["coactivation_tokens"]
    per_task = study.tasks.sample_budget(max(1, n_tokens // len(study.task_names)))
    # the budget in the tasks' unit (images: about n_tokens rows), which the interleaved sample stays within
    return fit_router(study.handle, study.tasks.interleaved(per_task), labels,
                      max_tokens=study.tasks.sample_budget(n_tokens), batch_size=study.settings["batch_size"],
                      ctx=study.tasks.collect_options().get("ctx", 256), progress=progress)


def routing_curve(study: Study, labels: torch.Tensor, keep_fracs, tasks=None, *, router: Router | None = None) -> dict:
    """Accuracy relative to the dense model, per task, when each token keeps only its top-k experts
    (k = keep_frac × n_experts): chosen from the true activations (MoEfication's ground-truth routing, an
    oracle), or, with `router`, predicted from the MLP's input (a router one could deploy)."""
    tasks = list(tasks or study.task_names)
    dense = study.evaluate_tasks(tasks)
    curve = {}
    for frac in keep_fracs:
        k = _kept(study, frac)
        if k >= study.n_experts:
            curve[frac] = {t: 1.0 for t in tasks}
            continue
        with expert_routing(study.handle, labels, k) if router is None else predicted_routing(study.handle, router, k):
            acc = study.evaluate_tasks(tasks)
        curve[frac] = {t: acc[t] / dense[t] if dense[t] > 0 else float("nan") for t in tasks}
    return curve


def _mean_over_tasks(curve: dict) -> dict:
    """{keep_frac: {task: value}} -> {keep_frac: mean over tasks}."""
    return {f: float(np.mean(list(v.values()))) for f, v in curve.items()}


class Routing:
    """Notebook 03's steps on the params' language model and image model (`kinds`)."""

    def __init__(self, report, kinds=("lm", "vit")):
        self.report, self.params, self.kinds = report, report.params, tuple(kinds)
        self.mo = self.params["moefication"]

    @cached_property
    def studies(self) -> dict[str, Study]:
        """Each model with its tasks; an impossible expert count stops here, before any heavy work."""
        studies = {kind: Study.from_params(self.params, kind) for kind in self.kinds}
        for study in studies.values():
            study.n_experts                             # noqa: B018 (validates moefication.<kind>_experts)
            self.report.save_tasks(study)
        return studies

    def models(self) -> dict[str, Study]:
        for kind, st in self.studies.items():
            print(f"{kind}: {st.describe()}; {st.n_experts} experts of {st.handle.d_mlp // st.n_experts} neurons")
        return self.studies

    @cached_property
    def splits(self) -> dict[str, dict[str, torch.Tensor]]:
        """{kind: {method: expert labels [n_layers, d_mlp]}}, cached on disk (notebook 05 reuses them)."""
        return {kind: {m: st.splits(m) for m in METHODS} for kind, st in self.studies.items()}

    def build_splits(self) -> dict:
        """The splits, their expert sizes, and the parameter split's W_in inertia per layer against the random one."""
        for kind, split in self.splits.items():
            print(kind, "expert sizes per method (layer 0):",
                  {m: torch.bincount(s[0]).unique().tolist() for m, s in split.items()})
        for kind, st in self.studies.items():
            self.report.show(plots.layer_lines(self.layer_inertias[kind],
                                               title=f"Parameter split vs random: mean squared distance of W_in rows "
                                                     f"to their expert's centre — {st.label}",
                                               ylabel="inertia / neuron"), f"03_{kind}_inertia",
                             "A real parameter split sits clearly below the random one in every layer: neurons "
                             "reading similar directions exist.")
        return self.splits

    def layer0_inertia(self) -> dict:
        """{kind: {method: k-means inertia of layer 0's normalised W_in rows under the split}} (rounded: a check)."""
        out = {}
        for kind, st in self.studies.items():
            x = normalize_rows(st.handle.w_in(0).double())
            out[kind] = {m: round(inertia(x, s[0]), 2) for m, s in self.splits[kind].items()}
        return out

    @cached_property
    def layer_inertias(self) -> dict:
        """{kind: {"param" | "random": W_in inertia per layer}}."""
        return {kind: {m: layer_inertias(st.handle, self.splits[kind][m]) for m in ("param", "random")}
                for kind, st in self.studies.items()}

    @cached_property
    def agreement(self) -> dict:
        """{kind: {comparison: ARI per layer}}: parameter vs co-activation split, and each reseeded split against
        itself under the params' seed and the next."""
        seed, other = self.params["seed"], self.params["seed"] + 1
        out = {}
        for kind, st in self.studies.items():
            splits = self.splits[kind]
            again = {m: st.splits(m, seed=other, progress=False) for m in RESEEDED}
            out[kind] = {"param vs coactivation": split_agreement(splits["param"], splits["coactivation"]),
                         **{f"{m}, seed {seed} vs {other}": split_agreement(splits[m], again[m]) for m in RESEEDED}}
        return out

    def split_agreement(self) -> dict:
        """The agreement figures, and each comparison's mean ARI over layers."""
        for kind, agreement in self.agreement.items():
            self.report.show(plots.layer_lines(agreement, title=f"Agreement between splits (adjusted Rand index) — "
                                                                f"{self.studies[kind].label}",
                                               ylabel="ARI", ylim=(-0.1, 1.05)), f"03_{kind}_split_agreement",
                             "A stable split is reproduced under another seed (ARI near 1); two views that find the "
                             "same modules agree across methods. The random split's two seeds sit at 0 (chance).")
            print(kind, "mean ARI over layers:", {name: round(float(v.mean()), 3) for name, v in agreement.items()})
        return self.agreement

    @cached_property
    def evidence(self) -> dict:
        """{kind: routing_evidence} on the first moefication.eval_tasks tasks, its claims over moefication.n_seeds
        split seeds (the params' seed and the next ones: the random split redrawn, and the parameter split for the
        kinds in moefication.reseed_param); the claims are recorded."""
        out, seed = {}, self.params["seed"]
        for kind, st in self.studies.items():
            redrawn = ["random"] + (["param"] if kind in self.mo["reseed_param"] else [])
            reseeded = [{m: st.splits(m, seed=seed + k, progress=False) for m in redrawn}
                        for k in range(1, self.mo["n_seeds"])]
            out[kind] = routing_evidence(st, self.splits[kind], self.mo["keep_fracs"], self._tasks(kind),
                                         reseeded=reseeded, claim_frac=self.mo["claim_frac"])
            out[kind]["redrawn"] = redrawn
            self.report.claim(*out[kind]["claims"])
        return out

    def _tasks(self, kind: str) -> list[str]:
        return self.studies[kind].task_names[: self.mo["eval_tasks"] or None]

    @cached_property
    def routing(self) -> dict:
        """{kind: {method: {keep_frac: {task: relative accuracy}}}}: the oracle curves of every split and the
        parameter split's curve with a fitted router."""
        out = {}
        for kind, st in self.studies.items():
            param = self.splits[kind]["param"]
            out[kind] = dict(self.evidence[kind]["curve"])
            out[kind][FITTED] = routing_curve(st, param, self.mo["keep_fracs"], self._tasks(kind),
                                              router=fit_study_router(st, param))
        return out

    def routing_quality(self) -> dict:
        """The routing curves (mean over tasks; the oracle curves with their 95% bands over documents), the
        claims' forest plot and one line per claim."""
        fracs = self.mo["keep_fracs"]
        for kind, routing in self.routing.items():
            mean_curves = {m: list(_mean_over_tasks(c).values()) for m, c in routing.items()}
            for m, band in self.evidence[kind]["bands"].items():
                mean_curves[m] = ([band[f][0] for f in fracs], mean_curves[m], [band[f][1] for f in fracs])
            self.report.show(plots.sweep(fracs, mean_curves, title=f"Top-k expert routing — {self.studies[kind].label}",
                                         ylabel="accuracy / dense accuracy", xlabel="fraction of experts kept per token",
                                         line_label="mean over tasks", band_label="95% interval"),
                             f"03_{kind}_routing", "Modular: a split's curve stays near 1 with few experts kept, well "
                             "above the random split's; the fitted router shows how much of that a router that sees "
                             "only the input keeps.")
        self.report.claims_figure("03_claims")
        self.report.print_claims()
        return self.routing

    def mean_routing(self) -> dict:
        """{kind: {method: {keep_frac: relative accuracy, mean over tasks}}} (rounded: a check)."""
        return {kind: {m: {f: round(v, 3) for f, v in _mean_over_tasks(c).items()} for m, c in routing.items()}
                for kind, routing in self.routing.items()}

    def findings(self) -> str:
        """The findings in words, every number from this run's records; verdicts only through the claims."""
        text = ""
        for kind, st in self.studies.items():
            fr = [f for f in self.mo["keep_fracs"] if f < 1.0]
            if not fr:
                continue
            mean = {m: {f: float(np.mean(list(self.routing[kind][m][f].values()))) for f in fr} for m in METHODS}
            area = {m: float(np.mean(list(mean[m].values()))) for m in METHODS}     # the curve's mean height below 100%
            inert = {m: float(v.mean()) for m, v in self.layer_inertias[kind].items()}
            if inert["param"] >= inert["random"]:
                raise RuntimeError(f"{kind}: the parameter split's W_in inertia is not below the random split's: "
                                   "balanced k-means must beat a random split on its own objective")
            f_hi = max(fr)
            text += (f"* {st.label}, {st.n_experts} experts per layer: relative accuracy (routed / dense) averaged over "
                     f"keeping {', '.join(f'{f:.0%}' for f in fr)} of the experts per token: "
                     + ", ".join(f"{m} {area[m]:.2f}" for m in METHODS)
                     + " (whether each split beats random beyond chance: the claims above; the splits are not tested "
                       "against each other)"
                     + (f". At {f_hi:.0%} of the experts: " + ", ".join(f"{m} {mean[m][f_hi]:.2f}" for m in METHODS)
                        if len(fr) > 1 else "") + "."
                     + f" The parameter split's W_in inertia is {inert['param'] / inert['random']:.2f}× the random split's.\n")
            fitted = float(np.mean([np.mean(list(self.routing[kind][FITTED][f].values())) for f in fr]))
            text += (f"  With a router fitted on the statistics data that sees only the layer's input, the parameter "
                     f"split keeps {fitted:.2f} (vs {area['param']:.2f} with oracle routing).\n")
            ev = self.evidence[kind]
            text += (f"  The claims' difference from random per split seed ({len(ev['seeds'].get('param', []))} seeds; "
                     f"redrawn: {', '.join(ev['redrawn'])} split): "
                     + "; ".join(f"{m} " + ", ".join(f"{x:.3f}" for x in v) for m, v in ev["seeds"].items()) + ".\n")
            text += ("  Agreement between splits (adjusted Rand index, mean over layers): "
                     + ", ".join(f"{name} {float(v.mean()):.2f}" for name, v in self.agreement[kind].items()) + ".\n")
        return text + ("\nThe three method curves use oracle routing (experts chosen from the true dense activations): "
                       "an upper bound on any router that sees only the layer's input.\n")

    def results(self) -> dict:
        """The numbers of this run for the results JSON."""
        return {"routing": self.routing, "n_experts": {k: st.n_experts for k, st in self.studies.items()},
                "claim_seeds": {k: {"redrawn": ev["redrawn"], "difference_per_seed": ev["seeds"]}
                                for k, ev in self.evidence.items()},
                "split_agreement": self.agreement}
