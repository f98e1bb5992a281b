"""Localisers on trial (notebook 07): several published ways of finding task neurons put through one pipeline at
one fraction, on one model, each step one call with its printed check.

    trial = Localisers(study, report)        # the study: Study.from_params(localiser_params(params, kind), kind)
    trial.scores()       # every localiser's scores per task; the attribution's forward+backward pass; cost
    trial.cross_task()   # each localiser's cross-task matrix at pruning.frac, with matched random ablations
    trial.evidence()     # claims: selectivity beyond random; overlap against the pseudo-task null (statistics ones)
    trial.agreement()    # overlap of the localisers' sets per task, against layer-matched chance
    trial.table()        # localiser x measure, with 95% intervals
    report.save(trial.results())

Localisers computed from the per-task statistics (selective pruning's importances, `lape`, `ttest`) share the
statistics pass and go through Study's own scores, so their bootstraps and pseudo-task nulls are resamples of the
block sums; the attribution needs one forward and one backward pass per statistics batch (the same data and
budget), and has no cheap pseudo-task null (that would need a gradient pass over the null domain too).
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from . import plots
from .data import ImageDataset
from .evaluation import own_and_others
from .evidence import cross_task_intervals, excess_claim, overlap_evidence, percentile_ci
from .overlaps import layer_matched_chance, overlap
from .pruning import attribution_scores, collect_attribution

ATTRIBUTION = ("attribution", "attribution_contrast")
# no "|" in these: they go into the claims' markdown table
WHAT = {"abs": "selective pruning, mean absolute activation ratio", "rms": "selective pruning, RMS ratio",
        "std": "selective pruning, std ratio", "freq": "selective pruning, P(active) ratio",
        "sqrt": "selective pruning, mean square-root activation ratio", "lape": "activation-probability entropy",
        "ttest": "Welch t, task vs rest (per token)", "attribution": "-activation x gradient of the task's loss",
        "attribution_contrast": "attribution minus the other tasks' mean"}


def localiser_params(params: dict, kind: str) -> dict:
    """The params with lm.tasks cut to the first localisers.lm_tasks (the LM's cross-task matrices cost tasks² x
    evaluation passes per localiser); unchanged for the ViT."""
    n = params["localisers"]["lm_tasks"]
    if kind != "lm" or n is None:
        return params
    out = copy.deepcopy(params)
    tasks = out["lm"]["tasks"]
    out["lm"]["tasks"] = dict(list(tasks.items())[:n]) if isinstance(tasks, dict) else tasks[:n]
    return out


class Localisers:
    def __init__(self, study, report, prefix: str = "07"):
        self.study, self.report, self.prefix, self.kind = study, report, prefix, study.kind
        self.params, self.frac = study.params, study.params["pruning"]["frac"]
        self.methods = list(study.params["localisers"]["methods"])
        self.all_scores = self.cost = self.fixed = self.boot = self.claims = self.overlap = self.agree = None

    def _study_with(self, importance: str):
        """This study scoring with another statistics localiser: the same model, tasks and cached statistics."""
        params = {**self.params, "pruning": {**self.params["pruning"], "importance": importance}}
        return dataclasses.replace(self.study, params=params)

    def _attribution_data(self, task: str):
        """A task's statistics data with what its loss needs (images: their labels), within the budget."""
        budget, tasks = self.study.stats_budget, self.study.tasks
        if self.study.handle.kind == "lm":
            return tasks.statistics_data(task, budget)
        train = tasks.train
        keep = torch.isin(train.labels, torch.tensor([train.class_names.index(c) for c in tasks[task]]))
        return ImageDataset(train.images[keep][:budget], train.labels[keep][:budget], train.class_names, train.name,
                            None, None)

    def scores(self) -> dict:
        """Every localiser's scores {name: {task: [L, d_mlp]}} and its cost: seconds, and passes over the statistics
        data (forward; backward for the attribution). The statistics pass is shared (cached once per model and
        data); the attribution pass is the same batches with a backward each."""
        start = time.perf_counter()
        stats = self.study.stats(progress=False)
        stats_seconds = time.perf_counter() - start
        self.all_scores, self.cost = {}, {}
        attribution = None
        for name in self.methods:
            if name in ATTRIBUTION:
                if attribution is None:
                    s = self.settings_for_attribution()
                    runs = {t: collect_attribution(self.study.handle, self._attribution_data(t), **s)
                            for t in self.study.task_names}
                    attribution = ({t: r["attribution"] for t, r in runs.items()},
                                   sum(r["batches"] for r in runs.values()), sum(r["seconds"] for r in runs.values()))
                start = time.perf_counter()         # the pass's seconds are counted once, in attribution[2]
                self.all_scores[name] = attribution_scores(attribution[0], contrast=name == "attribution_contrast")
                self.cost[name] = {"seconds": attribution[2] + time.perf_counter() - start,
                                   "forward": attribution[1], "backward": attribution[1]}
            else:
                start = time.perf_counter()
                self.all_scores[name] = self._study_with(name).scores(stats=stats)
                self.cost[name] = {"seconds": time.perf_counter() - start, "forward": "shared", "backward": 0}
        print(f"statistics pass (shared by {', '.join(m for m in self.methods if m not in ATTRIBUTION)}): "
              f"{stats_seconds:.1f} s (0 when cached)")
        for name, c in self.cost.items():
            print(f"{name:>22}: {c['seconds']:.2f} s, forward passes {c['forward']}, backward {c['backward']}")
        return self.all_scores

    def settings_for_attribution(self) -> dict:
        s, budget = self.study.settings, self.study.stats_budget
        if self.study.handle.kind == "lm":
            return {"max_tokens": budget, "ctx": s["ctx"], "batch_size": s["batch_size"],
                    "skip_positions": s.get("skip_positions", ())}
        return {"batch_size": s["batch_size"], "cls_only": s["cls_only"]}

    def cross_task(self) -> dict:
        """Each localiser's cross-task matrix at pruning.frac (its own top sets ablated, with matched random sets in
        the same layers, localisers.random_seeds), keeping per-document hits for the intervals. Prints, per
        localiser, own and others' relative accuracy (mean over tasks)."""
        seeds, ev = self.params["localisers"]["random_seeds"], self.params["evidence"]
        self.fixed, self.boot = {}, {}
        for name in self.methods:       # each keeps its own unpruned hits: the intervals resample them per document
            self.fixed[name] = self.study.cross_task(frac=self.frac, scores=self.all_scores[name], random_seeds=seeds,
                                                     progress=False)
            self.boot[name] = cross_task_intervals(self.fixed[name], ev["n_boot"], self.params["seed"])
            sel = self.fixed[name].selectivity()
            print(f"{name:>22}: own {sel['own'].mean():.3f}, others {sel['others'].mean():.3f}; matched random: own "
                  f"{np.nanmean(sel['random_own']):.3f}, others {np.nanmean(sel['random_others']):.3f}")
        return self.fixed

    def evidence(self) -> list:
        """Claims per localiser (ids `<claim>[<localiser>:<kind>]`), recorded in the report (Holm over the notebook):
        selectivity: others' minus own relative accuracy, selected minus matched random, bootstrap over evaluation
            documents (the claim of notebooks 01/02, Study.claims);
        overlap_above_null: median pairwise overlap of the tasks' sets at pruning.frac against same-distribution
            pseudo-tasks put through the same localiser (statistics localisers only: evidence.overlap_evidence)."""
        ev, seed = self.params["evidence"], self.params["seed"]
        self.claims, self.overlap = [], {}
        blocks = null = None
        for name in self.methods:
            selected, matched = self.boot[name]["selected"], self.boot[name]["random"]
            self.claims.append(excess_claim(
                f"selectivity[{name}:{self.kind}]", f"{self.kind}, {WHAT[name]}: pruning a task's selected neurons "
                f"hurts it more than the other tasks, beyond as many random neurons in the same layers (others' minus "
                f"own relative accuracy, selected minus random)", selected["selectivity"] - matched["selectivity"],
                selected["selectivity_samples"] - matched["selectivity_samples"], None,
                n=int(sum(selected["n_documents"].values())), seed=seed))
            if name in ATTRIBUTION:
                continue
            if blocks is None:
                blocks, null = self.study.block_stats(progress=False), self.study.null_block_stats(progress=False)
            pipeline = {**self.study.pipeline(self.frac), "importance": name}
            self.overlap[name] = overlap_evidence(blocks, null, n_boot=ev["n_boot"], n_null=ev["n_null"], seed=seed,
                                                  **pipeline)
            claim = self.overlap[name]["claim"]
            self.claims.append(dataclasses.replace(claim, id=f"overlap_above_null[{name}:{self.kind}]",
                                                   statement=f"{self.kind}, {WHAT[name]}: {claim.statement}"))
        self.report.claim(*self.claims)
        self.report.print_claims(self.claims)
        return self.claims

    def agreement(self) -> dict:
        """Overlap coefficient of two localisers' sets for the same task, averaged over tasks, and the same for
        random sets with those counts per layer (layer-matched chance): {"names", "overlap" [M, M], "chance"
        [M, M]}, shown as a heatmap of overlap minus chance."""
        masks = {m: self.study.masks(self.frac, scores=self.all_scores[m]) for m in self.methods}
        tasks, n = self.study.task_names, len(self.methods)
        agree, chance = np.ones((n, n)), np.ones((n, n))
        for i, a in enumerate(self.methods):
            for j, b in enumerate(self.methods):
                if i != j:
                    agree[i, j] = np.mean([float(overlap(masks[a][t], masks[b][t])) for t in tasks])
                    chance[i, j] = np.mean([layer_matched_chance(masks[a][t], masks[b][t]) for t in tasks])
        self.agree = {"names": self.methods, "overlap": agree, "chance": chance}
        fig = plots.heatmap(agree - chance, self.methods, title=f"{self.study.label}: agreement of localisers at "
                            f"{self.frac:.1%} (overlap minus layer-matched chance, mean over tasks)",
                            cbar_label="overlap − chance", vmin=min(0.0, float((agree - chance).min())))
        self.report.show(fig, f"{self.prefix}_{self.kind}_agreement",
                         "Localisers that find the same neurons: bright off-diagonal cells; near 0: no more shared "
                         "than random sets in the same layers.")
        return self.agree

    def table(self) -> list[dict]:
        """One row per localiser: own and others' relative accuracy and the selectivity beyond matched random, with
        95% intervals over evaluation documents; the median pairwise overlap's excess over the pseudo-task null
        (interval); mean agreement with the other localisers (overlap, and layer-matched chance); cost."""
        by_id = {c.id: c for c in self.report.adjusted(self.claims)}
        rows = []
        for k, name in enumerate(self.methods):
            samples = self.boot[name]["selected"]["samples"]              # [n_boot, T, T]
            own, others = own_and_others(samples)
            sel = self.fixed[name].selectivity()
            claim = by_id[f"selectivity[{name}:{self.kind}]"]
            ov = by_id.get(f"overlap_above_null[{name}:{self.kind}]")
            other = [j for j in range(len(self.methods)) if j != k]
            rows.append({"localiser": name, "own": float(sel["own"].mean()), "own_ci": percentile_ci(own.mean(-1)),
                         "others": float(sel["others"].mean()), "others_ci": percentile_ci(others.mean(-1)),
                         "selectivity_beyond_random": claim.estimate, "selectivity_ci": claim.ci,
                         "selectivity_p_adjusted": claim.p_adjusted,
                         "overlap_excess": None if ov is None else ov.estimate, "overlap_ci": None if ov is None else ov.ci,
                         "agreement": float(self.agree["overlap"][k, other].mean()) if other else None,
                         "agreement_chance": float(self.agree["chance"][k, other].mean()) if other else None,
                         **{f"cost_{key}": v for key, v in self.cost[name].items()}})
        self.rows = rows
        print(markdown_table(rows, self.study.label))
        return rows

    def results(self) -> dict:
        return {"model": self.study.label, "tasks": self.study.task_names, "frac": self.frac,
                "table": self.rows, "agreement": self.agree,
                "cross_task": {m: f.matrix for m, f in self.fixed.items()},
                "cross_task_random": {m: f.random_matrix for m, f in self.fixed.items()}}


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_table(rows: list[dict], label: str) -> str:
    """The trial's table for one model, as markdown (the findings and the notebook print it)."""
    head = (f"**{label}**\n\n| localiser | own rel. accuracy | others' rel. accuracy | selectivity beyond random "
            f"| p (Holm) | overlap excess over pseudo-task null | agreement (chance) | seconds | passes fwd / bwd |\n"
            + "|---" * 9 + "|\n")
    lines = []
    for r in rows:
        p = "n/a" if r["selectivity_p_adjusted"] is None else f"{r['selectivity_p_adjusted']:.3g}"
        agree = "n/a" if r["agreement"] is None else f"{r['agreement']:.2f} ({r['agreement_chance']:.2f})"
        lines.append(f"| {r['localiser']} | {_ci(r['own'], r['own_ci'])} | {_ci(r['others'], r['others_ci'])} | "
                     f"{_ci(r['selectivity_beyond_random'], r['selectivity_ci'])} | {p} | "
                     f"{_ci(r['overlap_excess'], r['overlap_ci'])} | {agree} | {r['cost_seconds']:.1f} | "
                     f"{r['cost_forward']} / {r['cost_backward']} |")
    return head + "\n".join(lines)
