"""Selective pruning of one model on its tasks: the steps notebooks 01 (a ViT on image classes) and 02 (a
language model on text domains) share, each step showing its figures, so that each notebook keeps only its
own question. The words differ by modality ("task"/"domain", "accuracy"/"top-1"); the method does not.

    sp = SelectivePruning(study, report, "01")
    stats = sp.statistics()            # per-task statistics, the activity-per-layer figure
    fixed = sp.cross_task_fixed()      # the cross-task matrix at a fixed fraction, with intervals
    target = sp.cross_task_target()    # ... and at the fractions found by bisection
    overlap = sp.overlaps()            # the tasks' top sets; then sp.overlap_sweep(), sp.layer_distribution()
    evidence = sp.evidence(groups)     # the claims: intervals, nulls, tests
    text = sp.findings()               # the findings in words, from the records above
    report.save(sp.results())          # and exports/: tables and masks other tools read
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from . import export, neurons, overlaps, paper_scores, plots
from .evaluation import CrossTaskResult, bisection_evaluations
from .evidence import (cross_task_intervals, excess_claim, matched_sizes, overlap_evidence, pseudo_cross_task,
                       pseudo_task_null, related_claim, selectivity_per_task)

# the neuron pages' contexts and histograms read the first this many statistics tokens (images) of each task: enough
# for the top 8 contexts and a histogram to show what a neuron fires on (the LM's whole 4,096 took ~70 s more on 2
# CPU cores); the scores that picked the neurons read all of them
CONTEXTS_BUDGET = 1024
WORDS = {"lm": {"unit": "domain", "measure": "top-1", "counted": "tokens"},
         "vit": {"unit": "task", "measure": "accuracy", "counted": "images"}}


class SelectivePruning:
    def __init__(self, study, report, prefix: str):
        self.study, self.report, self.prefix = study, report, prefix
        self.params, self.pr = study.params, study.params["pruning"]
        self.words = WORDS[study.kind]
        self.evidence_ = None          # set by evidence(groups): the findings and results use it when it is there

    # what the steps show, computed on demand, so that cells run in any order after the setup cell
    @cached_property
    def fixed(self):
        """The cross-task matrix at pruning.frac (keeps every ablation's per-document hits)."""
        return self.study.cross_task(frac=self.pr["frac"])

    @cached_property
    def intervals(self) -> dict:
        return cross_task_intervals(self.fixed, self.params["evidence"]["n_boot"], self.params["seed"])

    @cached_property
    def target(self) -> CrossTaskResult | None:
        """The cross-task matrix at the fractions found by bisection (reusing the fixed matrix's base); None where the
        section's `bisection` is off (lm.bisection: the LM's costs minutes, and no claim rests on it)."""
        if not self.study.settings["bisection"]:
            return None
        return self.study.cross_task(target=self.pr["target"], base=self.fixed.base)

    @cached_property
    def masks(self) -> dict:
        """Each task's top-overlap.frac set under overlap.retain."""
        return self.study.masks(self.params["overlap"]["frac"], scores=self.overlap_scores())

    @cached_property
    def overlap(self) -> dict:
        return overlaps.summary(self.masks)

    @cached_property
    def sweep(self) -> dict:
        return overlaps.overlap_sweep(self.overlap_scores(), self.params["overlap"]["sweep"], mode=self.pr["mode"],
                                      metric="overlap")

    def _show(self, fig, name: str, caption: str):
        return self.report.show(fig, f"{self.prefix}_{name}", caption)

    def statistics(self) -> dict:
        """Per-task statistics (cached) and the mean |activation| per layer."""
        stats = self.study.stats()
        self._show(plots.mean_abs_per_layer(stats, self.study.label), "mean_abs_per_layer",
                   f"Modular {self.words['unit']}s would separate here only weakly: this is overall activity per layer, "
                   f"the baseline for the scores.")
        return stats

    def cross_task_fixed(self):
        """The cross-task matrix at pruning.frac, with matched random ablations and 95% intervals over evaluation
        documents: the heatmap and the selectivity bars."""
        unit, measure = self.words["unit"], self.words["measure"]
        print(f"unpruned {measure} per {unit}:", {t: round(a, 3) for t, a in self.fixed.base.items()})
        self._show(plots.cross_task(self.fixed, measure=measure, intervals=self.intervals), "cross_task_fixed",
                   f"Modular: a dark diagonal (pruning A's neurons hurts A) on a bright background (the other {unit}s "
                   f"are spared).")
        self._show(plots.selectivity(self.fixed, measure=measure, intervals=self.intervals), "selectivity",
                   f"Modular: red bars (the pruned {unit}) far below blue (the others) for the selected neurons, and not "
                   f"for as many random neurons in the same layers (pale bars).")
        return self.fixed

    def cross_task_target(self):
        """The fraction that brings each task to pruning.target × its unpruned accuracy (bisection), and the
        matrix at those fractions. Off (None, and says so) where the section's `bisection` is false."""
        if self.target is None:
            print(f"bisection skipped: {self.study.kind}.bisection is false in these parameters (the claims use the "
                  f"fixed-fraction matrix above); set it to true for this figure ({self._bisection_cost()})")
            return None
        self._show(plots.cross_task(self.target, measure=self.words["measure"]), "cross_task_target",
                   f"Modular: small fractions bring each {self.words['unit']} down to the target while the off-diagonal "
                   f"entries stay near 1.")
        return self.target

    def _bisection_cost(self) -> str:
        n = bisection_evaluations(len(self.study.task_names), self.pr["max_steps"])
        return f"at most {n} evaluations of {self.study.settings[self.study.tasks.eval_key]} {self.study.tasks.unit}"

    def overlap_scores(self) -> dict:
        """The scores behind the overlap sets, figures and claims: under overlap.retain (default the general
        corpus, so that neurons several tasks share can be selected and seen)."""
        return self.study.scores(retain=self.params["overlap"]["retain"])

    def overlaps(self) -> dict:
        """The tasks' top-overlap.frac sets: overlap and Jaccard heatmaps. Returns overlaps.summary of the sets."""
        frac = self.params["overlap"]["frac"]
        for metric in ("overlap", "jaccard"):
            self._show(plots.overlap_heatmap(self.overlap, metric, frac), f"overlap_{metric}",
                       f"Modular: off-diagonal entries near chance, except between related {self.words['unit']}s.")
        return self.overlap

    def overlap_sweep(self) -> dict:
        """min / median / max pairwise overlap over overlap.sweep, against uniform and layer-matched chance."""
        self._show(plots.overlap_sweep(self.sweep, what=f"{self.words['unit']} pairs"), "overlap_sweep",
                   "Modular: the band stays close to the chance line at small fractions and rises only as the sets grow.")
        return self.sweep

    def layer_distribution(self):
        """Where each task's top-overlap.frac neurons sit across layers."""
        unit = self.words["unit"]
        self._show(plots.layer_distribution(self.masks, title=f"Share of each {unit}'s top-{self.params['overlap']['frac']:.1%} "
                                                              f"neurons per layer ({self.pr['mode']} selection)"),
                   "layer_distribution", f"{unit.capitalize()}-specific neurons can sit anywhere; {unit}s that share "
                   f"layers are not thereby sharing neurons.")

    def describe_tasks(self) -> None:
        """Each task's documents (images) for statistics and for evaluation, a line each."""
        for t, parts in self.study.tasks.describe().items():
            print(f"{t:12s}", ", ".join(f"{k}: {v}" for k, v in parts.items()))

    def budget_stability(self) -> dict:
        """Is the statistics budget enough? stability() at the fractions `stability_fractions` of the study's params
        section (lm), with the figure and a line per fraction. {q: {task: overlap}}."""
        fractions, frac = self.params[self.study.tasks.section]["stability_fractions"], self.params["overlap"]["frac"]
        result = stability(self.study, fractions, frac)
        median = [float(np.median(list(result[q].values()))) for q in fractions]
        worst = [min(result[q].values()) for q in fractions]
        self._show(plots.sweep(fractions, {f"median over {self.words['unit']}s": median, f"worst {self.words['unit']}": worst},
                               title=f"Top-{frac:.0%} set from part of the documents vs from all "
                                     f"({self.study.stats_budget} {self.words['counted']})",
                               ylabel="overlap coefficient with the full-budget set",
                               xlabel="share of the statistics documents read"),
                   "budget_stability", "Settled: both lines near 1 at a half; still rising steeply means more data "
                                       "would change the sets.")
        for q, m, w in zip(fractions, median, worst):
            print(f"{q:.3f} of the documents: overlap with the full-budget set — median {m:.2f}, worst {w:.2f}")
        return result

    def neurons(self, n: int = 3, k: int = 8, ablate: int = 1):
        """Neurons to look at: each task's `n` top-scored selected neurons (of the overlap sets), their direct
        effect on the outputs, their top-`k` contexts (or images) and activation distributions on the first
        CONTEXTS_BUDGET statistics tokens (images) of each task, and for the first
        `ablate` of each task every task's accuracy with that neuron zeroed, on the evaluation documents (one
        evaluation pass of every task per neuron: the default 1 keeps that to one pass per task); saved as
        neurons/<kind>-<task>.html in the run's folder; in JupyterLab an explorer (neurons.explorer) picks task,
        layer and neuron."""
        # one more pass, only these neurons; then one evaluation pass per ablated neuron
        computed = self.__dict__.get("fixed")       # reuse its base hits if the matrix is there; never run it for them
        base = computed.documents["base"] if computed is not None and computed.documents else None
        shown = self.study.neuron_examples(self.masks, scores=self.overlap_scores(), n=n, k=k, ablate=ablate,
                                           budget=CONTEXTS_BUDGET, ablation_base=base)
        neurons.export(shown, self.report.out_dir, self.study.kind)
        return shown

    def evidence(self, groups: dict | None) -> dict:
        """The notebook's claims (`claims`, reusing the fixed matrix's hits), recorded in the report, with the
        pairwise-overlap figure against the pseudo-task null and the forest plot; printed one per line."""
        unit = self.words["unit"]
        self.evidence_ = ev = claims(self.study, self.pr["frac"], groups, fixed=self.fixed)
        self.report.claim(*ev["claims"])
        ov = ev["overlap"]
        self._show(plots.overlap_pairs(ov, what=f"{unit} pairs"), "overlap_pairs",
                   "Modular: related pairs to the right of the grey null band; the rest inside it or near chance.")
        self.report.claims_figure(f"{self.prefix}_claims", ev["claims"])
        self.report.print_claims(ev["claims"])          # p adjusted with the notebook's other claims
        print(f"median pairwise overlap {ov['median']:.3f} (95% CI {ov['median_ci'][0]:.3f}–{ov['median_ci'][1]:.3f}); "
              f"{ov.get('null_label', 'pseudo-task null')} {ov['null_median']:.3f} (95% of null {ov['null_band'][0]:.3f}–{ov['null_band'][1]:.3f}); "
              f"chance: uniform {ov['uniform_chance']:.3f}, layer-matched {ov['layer_matched_chance']:.3f}")
        return ev

    def findings(self, related_words: str = "the same group") -> str:
        """The findings in words, every number from this run's records; verdicts only through the claims."""
        unit, measure, pr = self.words["unit"], self.words["measure"], self.pr
        sel, target, overlap = self.fixed.selectivity(), self.target, self.overlap
        max_frac = self.study.settings["max_frac"]
        assert np.isfinite(self.fixed.matrix).all() and (self.fixed.matrix >= 0).all()
        assert target is None or all(0 < f <= max_frac for f in target.fracs.values())
        null = self.evidence_["selectivity"]["null"] if self.evidence_ else None
        text = f"""
Model: {self.study.describe()}.

* Pruning {pr['frac']:.1%} of the neurons selected for a {unit} leaves that {unit} at {sel['own'].mean():.2f} of its
  unpruned {measure} on average (min {sel['own'].min():.2f}), and the other {unit}s at {sel['others'].mean():.2f}.
  Pruning as many random neurons with the same count per layer ({len(pr['random_seeds'])} seeds) leaves the {unit}
  at {np.nanmean(sel['random_own']):.2f} and the others at {np.nanmean(sel['random_others']):.2f}: selectivity (others − own)
  {np.nanmean(sel['selectivity']):.2f} for the selected neurons vs {np.nanmean(sel['random_selectivity']):.2f} for random ones.
"""
        text += _every_other_below(self.fixed, unit, measure)
        if null is not None:
            text += (f"  Same-distribution pseudo-tasks put through the same pipeline reach a selectivity of "
                     f"{np.mean(null):.2f} on average ({len(null)} partitions): the null of the claim `selectivity`.\n")
        per_task = self._per_task()
        if per_task:
            values = {t: r["estimate"] for t, r in per_task.items() if np.isfinite(r["estimate"])}
            selective = [t for t, r in per_task.items() if r["selective"]]
            few = [f"{t} (n = {r['n']})" for t, r in per_task.items() if r.get("verdict")]
            text += (f"* Each {unit} on its own (selected minus random, others − own; Holm across {unit}s): "
                     f"{len(selective)} of {len(per_task)} selective{': ' + ', '.join(selective) if selective else ''}"
                     + (f" (insufficient data, fewer than 20 evaluation units: {', '.join(few)})" if few else "")
                     + (f"; median {np.median(list(values.values())):.3f}, largest {max(values.values()):.3f} "
                        f"({max(values, key=values.get)})" if values else "") + ": the claim `selectivity_per_task`.\n")
        text += self._bisection_findings(max_frac)
        against = {"general": "an external general corpus none of the tasks use",
                   "rest": "the other tasks"}[self.params["overlap"]["retain"]]
        text += (f"* At {self.params['overlap']['frac']:.1%} (each {unit}'s neurons scored against {against}) the "
                 f"median pairwise overlap coefficient is {overlap['median']:.3f}; chance is "
                 f"{overlap['chance']['overlap']:.3f} (uniform) and "
                 f"{overlap['layer_chance']['overlap']:.3f} (random sets with the same count per layer).\n")
        related = self.evidence_["related"] if self.evidence_ else None
        if related:
            text += (f"* Mean overlap of related {unit}s ({related_words}) {related['within']:.3f}, of unrelated ones "
                     f"{related['across']:.3f}; whether that difference is more than chance is the claim "
                     f"`related_share_more` above.\n")
        return text

    def _bisection_findings(self, max_frac: float) -> str:
        """The findings' line on the fractions found by bisection (or that none were searched)."""
        unit, measure, goal, target = self.words["unit"], self.words["measure"], self.pr["target"], self.target
        if target is None:
            return (f"* The fractions that bring each {unit} to {goal:.0%} of its {measure} (bisection) were not "
                    f"searched in this run ({self.study.kind}.bisection: false).\n")
        reached = [t for t in target.tasks if target.converged.get(t)]
        if not reached:
            return (f"* No {unit} came down to {goal:.0%} of its {measure} within {max_frac:.1%} of the neurons "
                    f"(at that fraction they kept {np.mean(list(target.reached.values())):.2f} of it on average).\n")
        fracs, missed = [target.fracs[t] for t in reached], target.not_converged()
        return (f"* Bringing a {unit} to {goal:.0%} of its {measure} took between {min(fracs):.2%} and "
                f"{max(fracs):.2%} of the neurons ({len(reached)} of {len(target.tasks)} {unit}s reached it); the "
                f"other {unit}s then kept {target.selectivity()['others'].mean():.2f} of theirs on average. "
                + (f"Never reached the target within {max_frac:.1%}: {', '.join(missed)}.\n" if missed else "\n"))

    def _per_task(self) -> dict | None:
        """Each task's own selectivity test (the `selectivity_per_task` claim's), or None before evidence()."""
        claim = next((c for c in (self.evidence_ or {}).get("claims", []) if c.id == "selectivity_per_task"), None)
        return None if claim is None else claim.per_task

    def results(self) -> dict:
        """The numbers of this run for the results JSON. Also writes exports/<notebook>_neurons.parquet and
        _masks.json (export.write_exports: scores, statistics and the sets at pruning.frac, for other tools)."""
        export.write_exports(self.study, self.report.out_dir, self.report.notebook, self.pr["frac"])
        fixed, target, overlap = self.fixed, self.target, self.overlap
        bisection = {"cross_task_target": None, "target_fracs": None, "target_converged": None, "target_reached": None}
        if target is not None:
            bisection = {"cross_task_target": target.matrix, "target_fracs": target.fracs,
                         "target_converged": target.converged, "target_reached": target.reached}
        return {"model": self.study.label, "tasks": fixed.tasks, "unpruned_top1": fixed.base,
                "cross_task_fixed": fixed.matrix, "cross_task_fixed_ci": self.intervals["selected"]["ci"],
                "cross_task_random": fixed.random_matrix, "selectivity": fixed.selectivity(),
                "selectivity_null": self.evidence_["selectivity"]["null"] if self.evidence_ else None,
                "selectivity_per_task": self._per_task(),
                **bisection, "overlap": overlap["overlap"],
                "overlap_chance": {"uniform": overlap["chance"], "layer_matched": overlap["layer_chance"]},
                "overlap_sweep": self.sweep, "params": self.params}


def stability(study, fractions, frac: float) -> dict:
    """Is the statistics budget enough? For each q in `fractions`, each task's top-`frac` set from the first q of its
    statistics documents (the first round(q × n_blocks) blocks: about q × the budget) against the set from all of
    them: its overlap coefficient. Near 1 at q = 1/2 means doubling the data would change the sets little. From the
    block sums already collected: no extra forward pass. {q: {task: overlap}}."""
    blocks = study.block_stats(progress=False)
    full = study.masks(frac, scores=study.scores(stats={t: b.merged() for t, b in blocks.items()}))
    out = {}
    for q in fractions:
        part = {t: b.subset(list(range(max(1, round(q * b.n_blocks))))).merged() for t, b in blocks.items()}
        now = study.masks(frac, scores=study.scores(stats=part))
        out[q] = {t: float(overlaps.overlap(now[t], full[t])) for t in study.task_names}
    return out


BROKEN = 0.5        # a relative accuracy below this: the ablation wrecks that task, whatever it was selected for


def _every_other_below(result, unit: str, measure: str) -> str:
    """The findings' sentence naming the tasks whose ablation leaves every other task below BROKEN of its unpruned
    accuracy (such rows make "others at 0.8 on average" a mean of intact and wrecked tasks); "" if none."""
    m = np.asarray(result.matrix, dtype=np.float64)
    rows = [i for i in range(len(m)) if np.all(np.delete(m[i], i) < BROKEN)]
    if not rows:
        return ""
    others = np.concatenate([np.delete(m[i], i) for i in rows])
    return (f"  Pruning the neurons of {', '.join(result.tasks[i] for i in rows)} leaves every other {unit} below "
            f"{BROKEN:.2f} of its unpruned {measure} ({others.min():.2f}–{others.max():.2f}).\n")


def claims(study, frac: float, groups: dict | None = None, *, seed: int | None = None,
           fixed: CrossTaskResult | None = None, selectivity_null: bool | None = None) -> dict:
    """The evidence behind notebook 01/02's headline claims (issue #15) for `study`, from per-document evaluation
    and per-block statistics, so intervals and nulls are resamples of sums already collected:

    selectivity: (others' − own relative accuracy) after pruning each task's top-`frac` neurons, minus the
        same after pruning as many random neurons with the same count per layer (mean over
        pruning.random_seeds); bootstrap over evaluation documents (the same resampled documents for
        both); against the selectivity of same-distribution pseudo-tasks (evidence.n_null_ablation of
        them, pseudo_selectivity) where the params' <kind>.selectivity_null says so, else against 0
        (exchangeability).
    selectivity_per_task: beside that mean, each task's own test, Holm across tasks, and the median task
        (evidence.selectivity_per_task), so one task cannot carry the verdict unseen.
    overlap_above_null: the median pairwise overlap of the top-overlap.frac sets (scored under overlap.retain)
        minus that of same-distribution pseudo-tasks (the pipeline's own null), or under `general` minus
        layer-matched chance pair by pair, bootstrap over statistics blocks.
    related_share_more: within-group minus across-group overlap, group labels permuted over tasks (only
        when `groups` put at least two tasks together).
    fixed: the study's cross_task(frac=frac) result, whose per-document hits are reused (no second pass).
    selectivity_null: whether to ablate pseudo-tasks for the selectivity null (default: <kind>.selectivity_null).
    Returns {"claims": [Claim], "selectivity": {"selected", "random", "null"}, "overlap": ..., "related": ...}."""
    params, ev = study.params, study.params["evidence"]
    seed = params["seed"] if seed is None else seed
    if fixed is None or fixed.documents is None or fixed.settings.get("frac") != frac:
        fixed = study.cross_task(frac=frac, progress=False)
    boot = cross_task_intervals(fixed, ev["n_boot"], seed)
    selected, matched = boot["selected"], boot["random"]
    if matched is None:
        raise ValueError("the selectivity claim compares with matched random ablations: set pruning.random_seeds "
                         "(e.g. [0, 1, 2])")
    beyond = selected["selectivity_samples"] - matched["selectivity_samples"]     # the same documents
    documents = f"evaluation {'images' if study.tasks.unit == 'images' else 'documents'}"     # what n counts
    pseudo = (pseudo_selectivity(study, frac, ev["n_null_ablation"], seed=seed + 2)
              if (study.settings["selectivity_null"] if selectivity_null is None else selectivity_null) else None)
    found = [excess_claim("selectivity", "pruning a task's selected neurons hurts it more than the other tasks, "
                          "beyond what as many random neurons in the same layers do (others' minus own relative "
                          "accuracy, selected minus random" + (", excess over same-distribution pseudo-tasks)"
                                                               if pseudo is not None else ")"),
                          selected["selectivity"] - matched["selectivity"], beyond, pseudo,
                          n=int(sum(selected["n_documents"].values())), seed=seed, unit=documents),
             selectivity_per_task(selected, matched, documents=documents)]     # beside the mean: each task's own test
    # the overlap claims under overlap.retain: against the general corpus a shared neuron can be selected
    retain = params["overlap"]["retain"]
    overlap_ev = overlap_evidence(study.block_stats(progress=False),
                                  None if retain == "general" else
                                  [study.null_block_stats(d, progress=False) for d in study.null_domains()],
                                  n_boot=ev["n_boot"], n_null=ev["n_null"], seed=seed,
                                  **study.pipeline(params["overlap"]["frac"], retain=retain))
    found.append(overlap_ev["claim"])
    related = None
    if groups and any(len([t for t in ts if t in study.task_names]) > 1 for ts in groups.values()):
        related, claim = related_claim(overlap_ev, groups, ev["n_perm"], seed)
        found.append(claim)
    return {"claims": found, "selectivity": {"selected": selected, "random": matched, "null": pseudo},
            "overlap": overlap_ev, "related": related}


def pseudo_selectivity(study, frac: float, n_null: int, *, seed: int | None = None) -> np.ndarray:
    """The selectivity of same-distribution pseudo-tasks (the null of the `selectivity` claim): n_null times,
    a null domain's statistics blocks are split into pseudo-tasks of the real tasks' sizes in tokens and documents
    (pooled over study.null_domains()), put through the same scores and selection, and each pseudo-task's neurons
    are ablated on its domain's evaluation documents (read with all tasks' budget together, split at random into
    one part per pseudo-task). Random ablation of as many neurons has selectivity 0 on exchangeable parts, so these
    values are directly comparable with the claim's selected-minus-random estimate. Returns [n_null]."""
    seed = study.params["seed"] if seed is None else seed
    n, ablation, domains = len(study.task_names), study.params["pruning"]["ablation"], study.null_domains()
    blocks = [study.null_block_stats(d, progress=False) for d in domains]
    tasks = study.block_stats(progress=False)
    null = pseudo_task_null(blocks, [matched_sizes(tasks, b) for b in blocks], n_null, seed, keep_masks=True,
                            **study.pipeline(frac))
    out = np.full(n_null, np.nan)
    for k, (domain, b) in enumerate(zip(domains, blocks)):    # each domain's pseudo-tasks on its own documents
        at = null["domain"] == k
        if not at.any():
            continue

        def hits(domain=domain):
            return study.tasks.document_hits(study.handle, [domain], scale=n)[domain]["top1"]
        out[at] = pseudo_cross_task(study.handle, [m for m, a in zip(null["masks"], at) if a], hits, len(hits()),
                                    seed + k, ablation=ablation, means=b.merged().mean if ablation == "mean" else None)
    return out


class PaperReplays:
    """Notebook 02's replay of the authors' released 7B neuron scores (paper_scores.replay_overlap, docs/method.md
    §13): per model the overlap heatmap, the overlap sweep and where the selections sit, a findings section, and the
    paper's own related-vs-unrelated test as claims of the notebook (the paper's scale, beside ours). A model whose
    scores are absent is skipped with one line saying where to put them."""
    MODELS = ("mistral-7b", "llama-7b")

    def __init__(self, report):
        self.report, self.params = report, report.params
        self.replays = {}
        for name in self.MODELS:
            try:
                self.replays[name] = paper_scores.replay_overlap(
                    name, frac=self.params["paper_scores"]["frac"], sweep=self.params["overlap"]["sweep"],
                    root=self.params["paper_scores"]["dir"])
            except paper_scores.PaperScoresUnavailable as err:
                print(f"{name}: skipped — {err}")

    def figures(self) -> None:
        show = self.report.show
        for name, r in self.replays.items():
            show(plots.heatmap(r["matrix"], r["tasks"], title=f"{r['model']}: overlap of top-{r['frac']:.0%} neurons "
                               f"(global; chance {r['chance']:.3f})", cbar_label="overlap coefficient", vmax=1.0,
                               annotate=False), f"02_paper_{name}_overlap",
                 "Modular: bright blocks along the diagonal (task families) on a dark background.")
            show(plots.overlap_sweep(r["sweep"], title=f"{r['model']}: overlap over task pairs"),
                 f"02_paper_{name}_sweep", "Modular: the band stays close to the chance line at small fractions.")
            show(plots.layer_lines({f: np.mean([r["layers_global"][t] for t in ts], 0)
                                    for f, ts in r["families"].items() if ts},
                                   title=f"{r['model']}: where global top-{r['frac']:.0%} neurons sit (mean per family)",
                                   ylabel="share of selected neurons"), f"02_paper_{name}_layers",
                 "Where the selections pile up: overlaps under global selection partly reflect shared layers, not "
                 "shared neurons.")

    def _text(self) -> str:
        text = ""
        for r in self.replays.values():
            t, related, ties = r["tasks"], r["related"], list(r["ties_global"].values())
            text += (f"* {r['model']} ({len(t)} tasks, top {r['frac']:.0%} global): pairs within a family overlap "
                     f"{related['within']:.3f} on average vs {related['across']:.3f} across families (chance "
                     f"{r['chance']:.3f}); code vs pile_Github {paper_scores.pair_overlap(r, 'code', 'pile_Github'):.2f}, "
                     f"PubMed Abstracts vs Central "
                     f"{paper_scores.pair_overlap(r, 'pile_PubMed_Abstracts', 'pile_PubMed_Central'):.2f}. Neurons tied "
                     f"at the threshold: median {int(np.median(ties))}, max {max(ties)} per task.\n")
        return text

    def text(self) -> str:
        """A line per replayed model, or where the scores are not there, a line saying so."""
        return self._text() or "paper scores not available: see the message above for how to get them"

    def section(self) -> str:
        """The findings' section on the replayed models ("" without them)."""
        text = self._text()
        return "\n**The paper's 7B models, replayed:**\n\n" + text if text else ""

    def claims(self) -> None:
        """related_share_more[<model>]: the paper's test on its own scores (the Pile as retain set), recorded as
        claims of this notebook and printed; nothing where the scores are absent."""
        for r in self.replays.values():
            self.report.claim(paper_scores.related_claim(r, self.params["evidence"]["n_perm"], self.params["seed"]))
        if self.replays:
            self.report.print_claims()

    def results(self) -> dict:
        return {"paper": {n: {k: r[k] for k in ("tasks", "matrix", "related", "ties_global", "ties_per_layer", "sweep")}
                          for n, r in self.replays.items()}}
