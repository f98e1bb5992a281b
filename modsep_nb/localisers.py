"""Localisers on trial (notebook 07): several published ways of finding task neurons put through one pipeline at
one fraction, on one model, each step one call with its printed check.

    trial = Localisers(study, report)        # the study: Study.from_params(localiser_params(params, kind), kind)
    trial.scores()       # every localiser's scores per task; the attribution's forward+backward pass; cost
    trial.cross_task()   # each localiser's cross-task matrix at pruning.frac, with matched random ablations
    trial.evidence()     # claims: selectivity beyond random; overlap against the pseudo-task null (statistics ones)
    trial.agreement()    # overlap of the localisers' sets per task, against layer-matched chance
    trial.table()        # localiser x measure, with 95% intervals
    report.save(trial.results())

Localisers computed from the per-task statistics (selective pruning's importances, `lape`, `ttest`, `auroc`)
share the statistics pass of notebooks 01/02 (cached), so their bootstraps and pseudo-task nulls are resamples of
the block sums; the null domain is read with these tasks' budget (the ViT's is notebook 01's, cached; the LM's,
for its localisers.lm_tasks domains, one pass of 07's own), cut into pseudo-tasks of these tasks' sizes and drawn in two
stages (Localisers._overlap). The attribution needs one forward and one backward pass per batch, on the first
localisers.attribution_tokens (attribution_images) of each task's statistics data and, for its pseudo-task null,
on the null domain read with all tasks' attribution budget: kept per block of documents, so its bootstrap and
null are resamples too, as for the statistics localisers.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np

from . import plots
from .claims import MIN_N
from .evaluation import own_and_others
from .evidence import cross_task_intervals, excess_claim, overlap_evidence, percentile_ci
from .overlaps import layer_matched_chance, overlap
from .pruning import (ATTRIBUTIONS as ATTRIBUTION, BLOCK_LOCALISERS, IMPORTANCES, attribution_scores,
                      collect_attribution, task_scores)
from .study import SECTIONS
from .tasks import TextTasks
# the overlap null's first stage (Localisers._overlap): stop when STOP_AFTER of NULL_FIRST values reach the observed
# (Monte Carlo p >= 11/51 there: a claim whose p is below Holm's 0.05 / 20 stops with probability < 1e-15)
NULL_FIRST, STOP_AFTER = 50, 10
# no "|" in these: they go into the claims' markdown table
WHAT = {"abs": "selective pruning, mean absolute activation ratio", "rms": "selective pruning, RMS ratio",
        "std": "selective pruning, std ratio", "freq": "selective pruning, P(active) ratio",
        "sqrt": "selective pruning, mean square-root activation ratio", "lape": "activation-probability entropy",
        "ttest": "Welch t, task vs rest (per token)", "auroc": "AUROC, task vs rest (per block of documents)",
        "attribution": "-activation x gradient of the task's loss",
        "attribution_contrast": "attribution minus the other tasks' mean"}


def localiser_params(params: dict, kind: str) -> dict:
    """The params notebook 07 runs `kind` with: lm.tasks cut to localisers.lm_tasks domains with enough documents
    (localiser_tasks: the LM's cross-task matrices cost tasks² evaluation passes per localiser, and its claims rest on
    those domains' documents), the LM's localisers localisers.lm_methods where set, and
    the evaluation budget localisers.eval_tokens
    (eval_images) where set (each localiser's matrix is one more set of tasks x (1 + random seeds) passes). The
    statistics settings are not touched: 07 reads the statistics notebooks 01/02 cached."""
    loc, out, key = params["localisers"], copy.deepcopy(params), SECTIONS[kind].eval_key
    if loc[key] is not None:            # cheaper, never more than the section's
        out[kind][key] = min(loc[key], params[kind][key])
    # the section's own settings, localisers.<section>_methods and <section>_tasks: the LM's only (lm_methods, lm_tasks)
    if loc.get(f"{kind}_methods") is not None:
        out["localisers"]["methods"] = list(loc[f"{kind}_methods"])
    n = loc.get(f"{kind}_tasks")
    if n is not None:
        keep = localiser_tasks(params, n)
        tasks = out[kind]["tasks"]
        out[kind]["tasks"] = {t: v for t, v in tasks.items() if t in keep} if isinstance(tasks, dict) else \
            [t for t in tasks if t in keep]
    return out


def localiser_tasks(params: dict, n: int) -> list[str]:
    """n of lm.tasks, in lm.tasks' order: the first ones with at least claims.MIN_N statistics and MIN_N evaluation
    documents, then (only if too few have) the others in order. Not simply the first n: a small domain (the embedded
    licences: 10 statistics and 4 evaluation documents) would leave 07's LM claims resting on a handful of documents
    (issue #26, item 7). Not the n largest either: those are the fortune categories, one format, which would leave
    the trial without the code / documentation domains whose neurons differ most."""
    tasks = TextTasks.from_params(params).tasks
    enough = [t for t, task in tasks.items() if min(len(task.collect), len(task.evaluate)) >= MIN_N]
    keep = set((enough + [t for t in tasks if t not in enough])[:n])
    return [t for t in tasks if t in keep]


class Localisers:
    def __init__(self, study, report, prefix: str = "07"):
        self.study, self.report, self.prefix, self.kind = study, report, prefix, study.kind
        self.params, self.frac = study.params, study.params["pruning"]["frac"]
        self.methods = list(study.params["localisers"]["methods"])
        self.all_scores = self.cost = self.fixed = self.boot = self.claims = self.overlap = self.agree = None
        self.attribution_blocks = None

    def _study_with(self, importance: str):
        """This study scoring with another statistics localiser: the same model, tasks and cached statistics."""
        params = {**self.params, "pruning": {**self.params["pruning"], "importance": importance}}
        return dataclasses.replace(self.study, params=params)

    @property
    def attribution_budget(self) -> int:
        """Tokens (images) per task of the attribution's gradient pass: localisers.attribution_tokens
        (attribution_images), at most the statistics budget; null: the statistics budget."""
        own = self.params["localisers"][f"attribution_{self.study.tasks.unit}"]
        return self.study.stats_budget if own is None else min(own, self.study.stats_budget)

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
                    runs = {t: self._attribution(t, self.attribution_budget) for t in self.study.task_names}
                    attribution = ({t: r["attribution"] for t, r in runs.items()},
                                   sum(r["batches"] for r in runs.values()), sum(r["seconds"] for r in runs.values()))
                    self.attribution_blocks = {t: r["blocks"] for t, r in runs.items()}
                start = time.perf_counter()         # the pass's seconds are counted once, in attribution[2]
                self.all_scores[name] = attribution_scores(attribution[0], contrast=name == "attribution_contrast")
                self.cost[name] = {"seconds": attribution[2] + time.perf_counter() - start,
                                   "forward": attribution[1], "backward": attribution[1]}
            elif name in BLOCK_LOCALISERS:          # ranks the cached statistics blocks
                start = time.perf_counter()
                self.all_scores[name] = task_scores(self.study.block_stats(progress=False), importance=name)
                self.cost[name] = {"seconds": time.perf_counter() - start, "forward": "shared", "backward": 0}
            else:
                start = time.perf_counter()
                self.all_scores[name] = self._study_with(name).scores(stats=stats)
                self.cost[name] = {"seconds": time.perf_counter() - start, "forward": "shared", "backward": 0}
        print(f"statistics pass (shared by {', '.join(m for m in self.methods if m not in ATTRIBUTION)}): "
              f"{stats_seconds:.1f} s (0 when cached)")
        for name, c in self.cost.items():
            print(f"{name:>22}: {c['seconds']:.2f} s, forward passes {c['forward']}, backward {c['backward']}")
        return self.all_scores

    def _attribution(self, task: str, budget: int, n_blocks: int | None = None) -> dict:
        """collect_attribution on a task's first `budget` tokens (images), kept per block of documents (by default
        evidence.n_blocks, as the statistics)."""
        tasks = self.study.tasks
        options = tasks.collect_options()
        options.pop("equal_positions", None)        # the loss weighs every counted position alike
        # the statistics' own documents (images: their seeded sample, with the labels the loss needs)
        return collect_attribution(self.study.handle, tasks.labelled_data(task, budget), max_tokens=budget,
                                   batch_size=self.study.settings["batch_size"],
                                   n_blocks=n_blocks or self.params["evidence"]["n_blocks"], **options)

    def cross_task(self) -> dict:
        """Each localiser's cross-task matrix at pruning.frac (its own top sets ablated, with matched random sets in
        the same layers, localisers.random_seeds), keeping per-document hits for the intervals. Prints, per
        localiser, own and others' relative accuracy (mean over tasks)."""
        seeds, ev = self.params["localisers"]["random_seeds"], self.params["evidence"]
        self.fixed, self.boot = {}, {}
        base = None         # the unpruned model's per-document hits: one pass, shared by every localiser's matrix
        for name in self.methods:
            self.fixed[name] = self.study.cross_task(frac=self.frac, scores=self.all_scores[name], random_seeds=seeds,
                                                     base=base, progress=False)
            base = self.fixed[name].documents["base"]
            self.boot[name] = cross_task_intervals(self.fixed[name], self.n_boot, self.params["seed"])
            sel = self.fixed[name].selectivity()
            print(f"{name:>22}: own {sel['own'].mean():.3f}, others {sel['others'].mean():.3f}; matched random: own "
                  f"{np.nanmean(sel['random_own']):.3f}, others {np.nanmean(sel['random_others']):.3f}")
        return self.fixed

    def evidence(self) -> list:
        """Claims per localiser (ids `<claim>[<localiser>:<kind>]`), recorded in the report (Holm over the notebook):
        selectivity: others' minus own relative accuracy, selected minus matched random, bootstrap over evaluation
            documents (the claim of notebooks 01/02, Study.claims);
        overlap_above_null: median pairwise overlap of the tasks' sets at pruning.frac against same-distribution
            pseudo-tasks put through the same localiser, bootstrap over blocks of documents (evidence.overlap_evidence;
            the attribution's from its per-block gradient pass over the tasks and the null domain)."""
        seed = self.params["seed"]
        self.claims, self.overlap = [], {}
        inputs = {}         # (task blocks, null domain blocks) of the statistics and of the attribution
        for name in self.methods:
            selected, matched = self.boot[name]["selected"], self.boot[name]["random"]
            self.claims.append(excess_claim(
                f"selectivity[{name}:{self.kind}]", f"{self.kind}, {WHAT[name]}: pruning a task's selected neurons "
                f"hurts it more than the other tasks, beyond as many random neurons in the same layers (others' minus "
                f"own relative accuracy, selected minus random)", selected["selectivity"] - matched["selectivity"],
                selected["selectivity_samples"] - matched["selectivity_samples"], None,
                n=int(sum(selected["n_documents"].values())), seed=seed))
            source = "attribution" if name in ATTRIBUTION else "statistics"
            if source not in inputs:
                inputs[source] = self._null_inputs(source)
            # selective pruning keeps pruning.retain; the others contrast the tasks themselves
            pipeline = {**self.study.pipeline(self.frac, retain=None if name in IMPORTANCES else "rest"),
                        "importance": name}
            self.overlap[name] = self._overlap(inputs[source], pipeline)
            claim = self.overlap[name]["claim"]
            self.claims.append(dataclasses.replace(claim, id=f"overlap_above_null[{name}:{self.kind}]",
                                                   statement=f"{self.kind}, {WHAT[name]}: {claim.statement}"))
        self.report.claim(*self.claims)
        self.report.print_claims(self.claims)
        return self.claims

    @property
    def n_boot(self) -> int:
        """Resamples of the evaluation documents behind each selectivity claim (localisers.n_boot, at least
        evidence.n_boot): cheap sums, and enough that a Holm family of every localiser's claims can reach 0.05."""
        return max(self.params["localisers"]["n_boot"], self.params["evidence"]["n_boot"])

    @property
    def n_null(self) -> int:
        """Pseudo-task resamples behind each overlap claim (localisers.n_null, at least evidence.n_null), for the
        same reason as n_boot."""
        return max(self.params["localisers"]["n_null"], self.params["evidence"]["n_null"])

    def _overlap(self, inputs: tuple, pipeline: dict) -> dict:
        """overlap_evidence with its pseudo-task null drawn in two stages (Besag and Clifford's sequential Monte
        Carlo test): the first NULL_FIRST values; if STOP_AFTER or more of them already reach the observed overlap,
        the claim is not supported and keeps that (valid, large) Monte Carlo p; otherwise all n_null are drawn. A
        claim is only ever supported through the full null, so the test's size and floor 1/(1 + n_null) stay; the
        stop saves the LM's most expensive resamples where the answer is already clear."""
        ev, seed = self.params["evidence"], self.params["seed"]
        first = min(NULL_FIRST, self.n_null)
        out = overlap_evidence(*inputs, n_boot=ev["n_boot"], n_null=first, seed=seed, **pipeline)
        reached = int((~(out["null"]["median"] < out["median"])).sum())     # undefined (NaN) values count too
        if first == self.n_null:
            return out
        if reached < STOP_AFTER:            # it could still be supported: the rest of the null (the first values kept)
            return overlap_evidence(*inputs, n_boot=ev["n_boot"], n_null=self.n_null, seed=seed, extend=out, **pipeline)
        claim = dataclasses.replace(out["claim"], p_floor=1 / (1 + self.n_null),
                                    floor_n=f"{self.n_null} null values (stopped after {first}: {reached} reached "
                                            f"the observed)")
        return {**out, "claim": claim}

    def _null_inputs(self, source: str) -> tuple:
        """(the tasks' blocks, the null domain's blocks) for the overlap evidence. Statistics: this study's cached
        blocks, and its null domain read with these tasks' budget (Study.null_block_stats: for the LM's
        localisers.lm_tasks, those domains' worth, not all 8; pseudo-tasks only need these tasks'
        sizes). Attribution: its per-block pass, and one more over the same null domain with every task's
        attribution budget (printed: its seconds and passes)."""
        if source == "statistics":
            return self.study.block_stats(progress=False), self.study.null_block_stats(progress=False)
        n, domain = len(self.study.task_names), self.study.null_domain()
        run = self._attribution(domain, n * self.attribution_budget, n * self.params["evidence"]["n_blocks"])
        print(f"attribution's pseudo-task null: {domain} read with {n} x {self.attribution_budget} "
              f"{self.study.tasks.unit}, {run['seconds']:.1f} s, {run['batches']} forward and backward passes")
        return self.attribution_blocks, run["blocks"]

    def agreement(self) -> dict:
        """Overlap coefficient of two localisers' sets for the same task, averaged over tasks, against random sets
        with those counts per layer (layer-matched chance), with intervals over tasks (localiser_agreement), shown
        as a heatmap of overlap minus chance."""
        masks = {m: self.study.masks(self.frac, scores=self.all_scores[m]) for m in self.methods}
        self.agree = localiser_agreement(masks, self.params["evidence"]["n_boot"], self.params["seed"])
        agree, chance = self.agree["overlap"], self.agree["chance"]
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
        (interval); mean agreement with the other localisers (overlap, and layer-matched chance; the interval of
        their difference, over tasks); cost."""
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
                         "agreement_excess_ci": percentile_ci(self.agree["boot"][k, other].mean(0)) if other else None,
                         **{f"cost_{key}": v for key, v in self.cost[name].items()}})
        self.rows = rows
        print(markdown_table(rows, self.study.label))
        return rows

    def results(self) -> dict:
        return {"model": self.study.label, "tasks": self.study.task_names, "frac": self.frac,
                "table": self.rows, "agreement": self.agree,
                "cross_task": {m: f.matrix for m, f in self.fixed.items()},
                "cross_task_random": {m: f.random_matrix for m, f in self.fixed.items()}}


def localiser_agreement(masks: dict, n_boot: int, seed: int) -> dict:
    """How far localisers find the same neurons. masks: {localiser: {task: bool [L, d_mlp]}}, the same tasks for
    every localiser. Per pair of localisers and task: the overlap coefficient of their sets and its layer-matched
    chance (random sets with the same counts per layer). Returns {"names", "tasks", "per_task_overlap",
    "per_task_chance" [M, M, T], "overlap", "chance" [M, M] (means over tasks; 1 on the diagonal), "boot"
    [M, M, n_boot]: the mean over tasks of overlap minus chance under n_boot resamples of the tasks with
    replacement (seeded), "excess_ci" [M, M, 2]: its 95% percentile interval}.
    The bootstrap is over tasks, not documents: agreement is read as "on a task of this kind, do the two find the
    same neurons", whose spread is between tasks; and the localisers' sets come from different passes (the
    statistics, the attribution's smaller budget) with no common blocks of documents to resample jointly. With few
    tasks (the LM's localisers.lm_tasks) the interval is coarse: it cannot be narrower than the tasks' spread."""
    names = list(masks)
    tasks = list(masks[names[0]])
    m, t = len(names), len(tasks)
    per, chance = np.ones((m, m, t)), np.ones((m, m, t))
    for i in range(m):
        for j in range(i + 1, m):          # both measures are symmetric in the two sets
            for k, task in enumerate(tasks):
                a, b = masks[names[i]][task], masks[names[j]][task]
                per[i, j, k] = per[j, i, k] = float(overlap(a, b))
                chance[i, j, k] = chance[j, i, k] = layer_matched_chance(a, b)
    draws = np.random.default_rng(seed).integers(0, t, size=(n_boot, t))
    boot = (per - chance)[:, :, draws].mean(-1)                        # [M, M, n_boot]
    ci = np.array([[percentile_ci(boot[i, j]) for j in range(m)] for i in range(m)])
    return {"names": names, "tasks": tasks, "per_task_overlap": per, "per_task_chance": chance,
            "overlap": per.mean(-1), "chance": chance.mean(-1), "boot": boot, "excess_ci": ci}


def findings(params: dict, trials: list) -> str:
    """The notebook's findings: per model which localiser's sets are the most selective beyond matched random
    neurons and which spare the other tasks most, with their 95% intervals, then each model's table."""
    lines = [f"Every localiser at {params['pruning']['frac']:.1%} of the neurons ({params['pruning']['mode']} "
             f"selection), its sets pruned against {len(params['localisers']['random_seeds'])} matched random set(s) "
             f"per task.", ""]
    for trial in trials:
        top = max(trial.rows, key=lambda r: r["selectivity_beyond_random"])
        spare = max(trial.rows, key=lambda r: r["others"])
        lines.append(f"* {trial.study.describe()}: most selective beyond random: `{top['localiser']}` "
                     f"({_ci(top['selectivity_beyond_random'], top['selectivity_ci'])}, Holm p "
                     f"{_p(top['selectivity_p_adjusted'])}); least generic damage (others' relative accuracy kept): "
                     f"`{spare['localiser']}` ({_ci(spare['others'], spare['others_ci'])}).")
    lines += [""] + [markdown_table(t.rows, t.study.label) + "\n" for t in trials]
    lines.append("Intervals: 95% bootstrap over evaluation documents (own, others, selectivity), over statistics "
                 "blocks of documents (overlap; the attribution's from its own per-block gradient pass, against "
                 "pseudo-tasks of its null domain), and over tasks (agreement: its excess over layer-matched chance). "
                 "Agreement: mean overlap coefficient with the other localisers' sets for the same task, and in "
                 "brackets the same for random sets with those counts per layer.")
    return "\n".join(lines)


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_table(rows: list[dict], label: str) -> str:
    """The trial's table for one model, as markdown (the findings and the notebook print it)."""
    head = (f"**{label}**\n\n| localiser | own rel. accuracy | others' rel. accuracy | selectivity beyond random "
            f"| p (Holm) | overlap excess over pseudo-task null | agreement (chance): excess over chance "
            f"| seconds | passes fwd / bwd |\n"
            + "|---" * 9 + "|\n")
    lines = []
    for r in rows:
        p = _p(r["selectivity_p_adjusted"])
        agree = "n/a" if r["agreement"] is None else (
            f"{r['agreement']:.2f} ({r['agreement_chance']:.2f}): "
            f"{_ci(r['agreement'] - r['agreement_chance'], r['agreement_excess_ci'])}")
        lines.append(f"| {r['localiser']} | {_ci(r['own'], r['own_ci'])} | {_ci(r['others'], r['others_ci'])} | "
                     f"{_ci(r['selectivity_beyond_random'], r['selectivity_ci'])} | {p} | "
                     f"{_ci(r['overlap_excess'], r['overlap_ci'])} | {agree} | {r['cost_seconds']:.1f} | "
                     f"{r['cost_forward']} / {r['cost_backward']} |")
    return head + "\n".join(lines)
