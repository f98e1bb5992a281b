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

import numpy as np

from . import export, neurons, overlaps, plots
from .evidence import cross_task_intervals

WORDS = {"lm": {"unit": "domain", "measure": "top-1", "counted": "tokens"},
         "vit": {"unit": "task", "measure": "accuracy", "counted": "images"}}


class SelectivePruning:
    def __init__(self, study, report, prefix: str):
        self.study, self.report, self.prefix = study, report, prefix
        self.params, self.pr = study.params, study.params["pruning"]
        self.words = WORDS[study.kind]
        self.fixed = self.target = self.intervals = self.masks = self.overlap = self.sweep = self.evidence_ = None

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
        self.fixed = self.study.cross_task(frac=self.pr["frac"])       # keeps every ablation's per-document hits
        print(f"unpruned {measure} per {unit}:", {t: round(a, 3) for t, a in self.fixed.base.items()})
        self.intervals = cross_task_intervals(self.fixed, self.params["evidence"]["n_boot"], self.params["seed"])
        self._show(plots.cross_task(self.fixed, measure=measure, intervals=self.intervals), "cross_task_fixed",
                   f"Modular: a dark diagonal (pruning A's neurons hurts A) on a bright background (the other {unit}s "
                   f"are spared).")
        self._show(plots.selectivity(self.fixed, measure=measure, intervals=self.intervals), "selectivity",
                   f"Modular: red bars (the pruned {unit}) far below blue (the others) for the selected neurons, and not "
                   f"for as many random neurons in the same layers (pale bars).")
        return self.fixed

    def cross_task_target(self):
        """The fraction that brings each task to pruning.target × its unpruned accuracy (bisection), and the
        matrix at those fractions."""
        self.target = self.study.cross_task(target=self.pr["target"], base=self.fixed.base)
        self._show(plots.cross_task(self.target, measure=self.words["measure"]), "cross_task_target",
                   f"Modular: small fractions bring each {self.words['unit']} down to the target while the off-diagonal "
                   f"entries stay near 1.")
        return self.target

    def overlap_scores(self) -> dict:
        """The scores behind the overlap sets, figures and claims: under overlap.retain (default the general
        corpus, so that neurons several tasks share can be selected and seen)."""
        return self.study.scores(retain=self.params["overlap"]["retain"])

    def overlaps(self) -> dict:
        """The tasks' top-overlap.frac sets: overlap and Jaccard heatmaps. Returns overlaps.summary of the sets."""
        frac = self.params["overlap"]["frac"]
        self.masks = self.study.masks(frac, scores=self.overlap_scores())
        self.overlap = overlaps.summary(self.masks)
        for metric in ("overlap", "jaccard"):
            self._show(plots.overlap_heatmap(self.overlap, metric, frac), f"overlap_{metric}",
                       f"Modular: off-diagonal entries near chance, except between related {self.words['unit']}s.")
        return self.overlap

    def overlap_sweep(self) -> dict:
        """min / median / max pairwise overlap over overlap.sweep, against uniform and layer-matched chance."""
        self.sweep = overlaps.overlap_sweep(self.overlap_scores(), self.params["overlap"]["sweep"], mode=self.pr["mode"],
                                            metric="overlap")
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

    def neurons(self, n: int = 3, k: int = 8, ablate: int = 1):
        """Neurons to look at: each task's `n` top-scored selected neurons (of the overlap sets), their direct
        effect on the outputs, their top-`k` contexts (or images) and activation distributions, and for the first
        `ablate` of each task every task's accuracy with that neuron zeroed, on the evaluation documents (one
        evaluation pass of every task per neuron: the default 1 keeps that to one pass per task); saved as
        neurons/<kind>-<task>.html in the run's folder; in JupyterLab an explorer (neurons.explorer) picks task,
        layer and neuron."""
        # one more pass, only these neurons; then one evaluation pass per ablated neuron
        base = self.fixed.documents["base"] if self.fixed is not None and self.fixed.documents else None
        shown = self.study.neuron_examples(self.masks, scores=self.overlap_scores(), n=n, k=k, ablate=ablate,
                                           ablation_base=base)
        neurons.export(shown, self.report.out_dir, self.study.kind)
        return shown

    def evidence(self, groups: dict | None) -> dict:
        """The notebook's claims (Study.claims, reusing the fixed matrix's hits), recorded in the report, with the
        pairwise-overlap figure against the pseudo-task null and the forest plot; printed one per line."""
        unit = self.words["unit"]
        self.evidence_ = ev = self.study.claims(self.pr["frac"], groups, fixed=self.fixed)
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
        assert all(0 < f <= max_frac for f in target.fracs.values())
        missed = target.not_converged()
        null = self.evidence_["selectivity"]["null"] if self.evidence_ else None
        text = f"""
Model: {self.study.describe()}.

* Pruning {pr['frac']:.1%} of the neurons selected for a {unit} leaves that {unit} at {sel['own'].mean():.2f} of its
  unpruned {measure} on average (min {sel['own'].min():.2f}), and the other {unit}s at {sel['others'].mean():.2f}.
  Pruning as many random neurons with the same count per layer ({len(pr['random_seeds'])} seeds) leaves the {unit}
  at {np.nanmean(sel['random_own']):.2f} and the others at {np.nanmean(sel['random_others']):.2f}: selectivity (others − own)
  {np.nanmean(sel['selectivity']):.2f} for the selected neurons vs {np.nanmean(sel['random_selectivity']):.2f} for random ones.
"""
        if null is not None:
            text += (f"  Same-distribution pseudo-tasks put through the same pipeline reach a selectivity of "
                     f"{np.mean(null):.2f} on average ({len(null)} partitions): the null of the claim `selectivity`.\n")
        per_task = self._per_task()
        if per_task:
            values = {t: r["estimate"] for t, r in per_task.items() if np.isfinite(r["estimate"])}
            selective = [t for t, r in per_task.items() if r["selective"]]
            text += (f"* Each {unit} on its own (selected minus random, others − own; Holm across {unit}s): "
                     f"{len(selective)} of {len(per_task)} selective{': ' + ', '.join(selective) if selective else ''}"
                     + (f"; median {np.median(list(values.values())):.3f}, largest {max(values.values()):.3f} "
                        f"({max(values, key=values.get)})" if values else "") + ": the claim `selectivity_per_task`.\n")
        reached = [t for t in target.tasks if target.converged.get(t)]
        if reached:
            fracs = [target.fracs[t] for t in reached]
            text += (f"* Bringing a {unit} to {pr['target']:.0%} of its {measure} took between {min(fracs):.2%} and "
                     f"{max(fracs):.2%} of the neurons ({len(reached)} of {len(target.tasks)} {unit}s reached it); the "
                     f"other {unit}s then kept {target.selectivity()['others'].mean():.2f} of theirs on average. "
                     + (f"Never reached the target within {max_frac:.1%}: {', '.join(missed)}.\n" if missed else "\n"))
        else:
            text += (f"* No {unit} came down to {pr['target']:.0%} of its {measure} within {max_frac:.1%} of the neurons "
                     f"(at that fraction they kept {np.mean(list(target.reached.values())):.2f} of it on average).\n")
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

    def _per_task(self) -> dict | None:
        """Each task's own selectivity test (the `selectivity_per_task` claim's), or None before evidence()."""
        claim = next((c for c in (self.evidence_ or {}).get("claims", []) if c.id == "selectivity_per_task"), None)
        return None if claim is None else claim.per_task

    def results(self) -> dict:
        """The numbers of this run for the results JSON. Also writes exports/<notebook>_neurons.parquet and
        _masks.json (export.write_exports: scores, statistics and the sets at pruning.frac, for other tools)."""
        export.write_exports(self.study, self.report.out_dir, self.report.notebook, self.pr["frac"])
        fixed, target, overlap = self.fixed, self.target, self.overlap
        return {"model": self.study.label, "tasks": fixed.tasks, "unpruned_top1": fixed.base,
                "cross_task_fixed": fixed.matrix, "cross_task_fixed_ci": self.intervals["selected"]["ci"],
                "cross_task_random": fixed.random_matrix, "selectivity": fixed.selectivity(),
                "selectivity_null": self.evidence_["selectivity"]["null"] if self.evidence_ else None,
                "selectivity_per_task": self._per_task(),
                "cross_task_target": target.matrix, "target_fracs": target.fracs, "target_converged": target.converged,
                "target_reached": target.reached, "overlap": overlap["overlap"],
                "overlap_chance": {"uniform": overlap["chance"], "layer_matched": overlap["layer_chance"]},
                "overlap_sweep": self.sweep, "params": self.params}
