"""Layerwise correspondence's steps (notebook 05): do a task's most specific neurons fall into few of
MoEfication's parameter-split experts, layer by layer, against random balanced partitions; in the trained model
and in a randomly initialised one. Every step computes what it needs on demand, so the notebook's cells run in
any order after the setup cell.

    lw = Layerwise(report)               # the params' lm and vit models, trained and random (loaded on first use)
    lw.models()                          # each model and its expert count
    lw.per_layer()                       # concentration AUC and z per layer against the random partitions' null
    lw.ends_vs_middle()                  # early and late thirds of the layers against the middle one
    lw.evidence()                        # the claims (correspondence_claims, with the activation-only control)
    text = lw.findings()                 # the findings in words
    report.save(lw.results())
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from . import plots
from .claims import Claim
from .correspondence import (LayerCorrespondence, correspondence_claims, ends_vs_middle, layer_correspondence,
                             mean_z_against, task_correspondence)
from .evidence import resampled_stats, child_seeds, activation_control_mask
from .pruning import select_neurons
from .statistics import bootstrap_weights
from .study import Study

WHICH = ("trained", "random init")


def resampled_correspondence_z(study: Study, by_frac: dict, control_by_frac: dict, n_boot: int) -> dict:
    """The tasks' and the activation-only control's mean z (over layers and fractions) under n_boot resamples of the
    statistics blocks (each task's blocks drawn as evidence.bootstrap_masks draws them): each resample's scores,
    per-layer selections and control selection, all from the same resampled statistics, read against the
    observed nulls (mean_z_against). {"task_z" [n_boot, T], "control_z" [n_boot]}: what correspondence_claims
    resamples so that the control's own sampling variability enters the test."""
    blocks, labels = study.block_stats(progress=False), study.splits("param", progress=False)
    names, importance = list(next(iter(by_frac.values()))), study.params["pruning"]["importance"]
    draws = {t: resampled_stats(blocks[t], bootstrap_weights(blocks[t].n_blocks, n_boot, s), importance)
             for t, s in zip(names, child_seeds(study.params["seed"], len(names)))}
    task_z, control_z = np.empty((n_boot, len(names))), np.empty(n_boot)
    for k in range(n_boot):
        stats = {t: next(draws[t]) for t in names}
        scores = study.scores(stats=stats)
        per_frac = [[mean_z_against(select_neurons(scores[t], f, "per_layer"), labels, by_frac[f][t]) for t in names]
                    for f in by_frac]
        task_z[k] = np.nanmean(per_frac, axis=0)
        control_z[k] = np.nanmean([mean_z_against(activation_control_mask(stats.values(), f), labels, control_by_frac[f])
                                   for f in by_frac])
    return {"task_z": task_z, "control_z": control_z}


class Layerwise:
    """Notebook 05's steps on the params' language model and image model (`kinds`)."""

    def __init__(self, report, kinds=("lm", "vit")):
        self.report, self.params, self.kinds = report, report.params, tuple(kinds)
        self.co = self.params["correspondence"]
        self.fracs = self.co["fracs"]
        self.frac_main = self.fracs[len(self.fracs) // 2]

    @cached_property
    def studies(self) -> dict[tuple, Study]:
        """{(kind, "trained" | "random init"): Study}; the random model is random_init.seeds' first."""
        out = {}
        for kind in self.kinds:
            trained = Study.from_params(self.params, kind)
            out[(kind, "trained")] = trained
            out[(kind, "random init")] = trained.with_random_init(self.params["random_init"]["seeds"][0])
            self.report.save_tasks(trained)
        return out

    def models(self) -> dict:
        for key, st in self.studies.items():
            print(key, "→", st.describe(), f"; {st.n_experts} experts")
        return self.studies

    @cached_property
    def correspondence(self) -> dict[tuple, dict[str, LayerCorrespondence]]:
        """{(kind, which, frac): {task: LayerCorrespondence}} of each task's per-layer top-frac selection in the
        model's parameter split (the split notebook 03 caches)."""
        return {(kind, which, frac): task_correspondence(st.scores(), st.splits("param", progress=False), frac,
                                                         n_null=self.co["n_null"], seed=self.params["seed"])
                for (kind, which), st in self.studies.items() for frac in self.fracs}

    def _stacked(self, kind: str, which: str, frac: float, what: str) -> np.ndarray:
        """[tasks, n_layers] of one LayerCorrespondence field."""
        return np.stack([getattr(x, what).numpy() for x in self.correspondence[(kind, which, frac)].values()])

    def per_layer(self) -> dict:
        """Per model: the concentration AUC per layer (mean over tasks) with the null band, and the z-scores at
        the smallest and largest fractions."""
        co, f = self.co, self.frac_main
        for kind in self.kinds:
            curves, bands = {}, {}
            for which in WHICH:
                null_mean = self._stacked(kind, which, f, "null_mean").mean(0)
                null_sd = self._stacked(kind, which, f, "null_std").mean(0)
                curves[f"{which}: mean over tasks"] = np.nanmean(self._stacked(kind, which, f, "auc"), 0)
                curves[f"{which}: null (random partitions)"] = null_mean
                bands[f"{which}: null (random partitions)"] = (null_mean - co["band_sd"] * null_sd,
                                                               null_mean + co["band_sd"] * null_sd)
            self.report.show(plots.layer_lines(curves, bands=bands, ylabel="concentration AUC (1 = perfectly packed)",
                                               title=f"Task neurons (top {f:.0%} per layer) in parameter-split "
                                                     f"experts — {kind}"),
                             f"05_{kind}_auc_per_layer", "Correspondence: the trained curve rises above the null "
                             "band, most in early and late layers.")
            z = {f"{which}, top {x:.0%}": np.nanmean(self._stacked(kind, which, x, "z"), 0)
                 for which in WHICH for x in (self.fracs[0], self.fracs[-1])}
            self.report.show(plots.layer_lines(z, title=f"Correspondence z-score against {co['n_null']} random "
                                                        f"partitions — {kind}", ylabel="z-score of concentration AUC",
                                               ylim=(min(-3, np.nanmin(list(z.values())) - 1),
                                                     np.nanmax(list(z.values())) + 1)),
                             f"05_{kind}_z_per_layer", "Correspondence: z well above 0 (the null's mean) in the "
                             "layers where it holds.")
        return self.correspondence

    def means(self) -> dict:
        """{(kind, which): (mean AUC over layers and tasks, mean share of significant experts)} at the middle
        fraction, rounded: a check."""
        return {(kind, which): (round(float(np.nanmean(self._stacked(kind, which, self.frac_main, "auc"))), 4),
                                round(float(np.nanmean(self._stacked(kind, which, self.frac_main,
                                                                     "share_significant"))), 4))
                for kind in self.kinds for which in WHICH}

    @cached_property
    def rows(self) -> list[tuple]:
        """(kind, which, frac, mean z of the early and late thirds, of the middle third, share of tasks whose
        ends beat the middle), one per model and fraction."""
        rows = []
        for (kind, which, frac), r in self.correspondence.items():
            ends, middle = zip(*[ends_vs_middle(x.z.numpy()) for x in r.values()])
            wins = float(np.mean(np.array(ends) > np.array(middle)))
            rows.append((kind, which, frac, float(np.nanmean(ends)), float(np.nanmean(middle)), wins))
        return rows

    def ends_vs_middle(self) -> list[tuple]:
        """The rows, one printed line each."""
        for row in self.rows:
            print("{:4s} {:12s} top {:5.1%}: z early+late {:6.2f}, middle {:6.2f}; tasks with ends > middle "
                  "{:4.0%}".format(*row))
        return self.rows

    @cached_property
    def claims(self) -> list[Claim]:
        """correspondence_claims of each trained model against the activation-only control, recorded."""
        claims = []
        for kind in self.kinds:
            st = self.studies[(kind, "trained")]
            labels = st.splits("param", progress=False)
            control = {f: layer_correspondence(activation_control_mask(st.stats(progress=False).values(), f), labels,
                                               n_null=self.co["n_null"], seed=self.params["seed"]) for f in self.fracs}
            by_frac = {f: self.correspondence[(kind, "trained", f)] for f in self.fracs}
            claims += correspondence_claims(kind, by_frac, control, n_boot=self.params["evidence"]["n_boot"],
                                            seed=self.params["seed"], n_perm=self.params["evidence"]["n_perm"],
                                            resampled=resampled_correspondence_z(st, by_frac, control,
                                                                                 self.params["evidence"]["n_boot"]))
        self.report.claim(*claims)
        return claims

    def evidence(self) -> list[Claim]:
        """The claims' forest plot and one line per claim (p adjusted over the notebook's claims)."""
        self.report.claims_figure("05_claims", self.claims)
        self.report.print_claims(self.claims)
        return self.claims

    def findings(self) -> str:
        """The findings in words, every number from this run's records; verdicts only through the claims."""
        self.claims             # noqa: B018 (recorded first: the findings and the results JSON refer to them)
        if not np.isfinite([r[3] for r in self.rows]).all():
            raise RuntimeError("a layer third without any selected neuron left the ends-vs-middle z undefined: "
                               "raise correspondence.fracs")
        text = ""
        for kind in self.kinds:
            for which in WHICH:
                sel = [r for r in self.rows if r[0] == kind and r[1] == which]
                ends, mid, wins = (np.mean([r[k] for r in sel]) for k in (3, 4, 5))
                allz = np.nanmean([np.nanmean(x.z.numpy()) for (k, w, f), rr in self.correspondence.items()
                                   if k == kind and w == which for x in rr.values()])
                text += (f"* {kind}, {self.studies[(kind, which)].label}: concentration of task neurons in "
                         f"parameter-split experts, mean z against random partitions {allz:.2f} (the control is in "
                         f"the claims above). Early and late layers: z {ends:.2f} vs middle layers {mid:.2f} (ends "
                         f"higher in {wins:.0%} of task × fraction cases; the test is the claim "
                         f"`ends_stronger_than_middle` above).\n")
        return text

    def results(self) -> dict:
        """The numbers of this run for the results JSON: every task's per-layer correspondence (the claims
        recorded first: report.save lists them)."""
        self.claims             # noqa: B018
        return {f"{k}|{w}|{f}": {t: x.as_dict() for t, x in r.items()} for (k, w, f), r in self.correspondence.items()}
