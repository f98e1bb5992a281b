"""The random-initialisation control's steps (notebook 04): the same pipeline on freshly initialised models of
the same architecture (one per random_init.seeds), compared with the trained model. Every step computes what it
needs on demand, so the notebook's cells run in any order after the setup cell.

    ri = RandomInit(report)              # the params' lm and vit models, trained and random (loaded on first use)
    ri.models()                          # each model, its label and seed
    ri.comparison()                      # overlaps.random_init_comparison at every fraction: CDFs, sweep, layers
    ri.evidence()                        # the claims (random_init_claims), their forest plot and p
    ri.selection_modes()                 # global vs per-layer selection, each against layer-matched chance
    ri.paper()                           # the same on the released 7B score sets, where present
    text = ri.findings()                 # the findings in words
    report.save(ri.results())
"""
from __future__ import annotations

from dataclasses import asdict
from functools import cached_property

import numpy as np

from . import overlaps, paper_scores, plots
from .claims import Claim, resample_p
from .evidence import bootstrap_overlap, combine_seeds, percentile_ci, pipeline_masks
from .overlaps import RandomInitComparison, layer_matched_chance_matrix, overlap_matrix
from .study import Study

MODES = ("global", "per_layer")
PAPER_MODELS = ("mistral-7b", "llama-7b")


def random_init_claims(kind: str, trained: Study, randoms: list[Study], persistence: list, frac: float, *,
                       mode: str | None = None) -> list[Claim]:
    """Notebook 04's claims for one model (`kind` names it in the ids), at `frac` fixed in advance
    (random_init.frac, the paper's 1%; issue #26 item 10):
    trained_overlap_differs_from_random: the median over task pairs of the overlap of the top-`frac` sets minus
        the same pair's layer-matched chance (random sets with the same count per layer), trained minus random
        init (all seeds pooled): a random model that piles its selection into a few layers overlaps more for that
        reason alone. Bootstrap over statistics blocks, the same draw for every model (they read the same
        documents, so the comparison is paired), two-sided, against 0; n: the blocks of documents resampled;
    pattern_persists: every seed's pattern-persistence rho combined (median rho, interval over seeds, the
        largest Holm-adjusted permutation p: the pattern must persist in every seed); n: the seeds."""
    ev, seed = trained.params["evidence"], trained.params["seed"]
    pipeline = trained.pipeline(frac, mode)
    observed_trained = float(np.median(_excess_of(trained, pipeline)))
    observed_random = float(np.median(np.concatenate([_excess_of(r, pipeline) for r in randoms])))

    def boot_excess(study):             # [n_boot, pairs]: each pair's overlap minus its chance, per resample
        b = bootstrap_overlap(study.block_stats(progress=False), ev["n_boot"], seed, **pipeline)
        return b["pairs"] - b["chance"]
    boot_trained = np.median(boot_excess(trained), axis=1)
    boot_random = np.median(np.concatenate([boot_excess(r) for r in randoms], axis=1), axis=1)
    diff = boot_trained - boot_random
    observed = observed_trained - observed_random          # two-sided; an undefined resample counts against
    p = float(np.minimum(1.0, 2 * min(resample_p(diff, diff <= 0, observed), resample_p(diff, diff >= 0, observed))))
    n_blocks = sum(b.n_blocks for b in trained.block_stats(progress=False).values())
    claims = [Claim(f"trained_overlap_differs_from_random[{kind}]", f"{kind}: the trained model's tasks overlap "
                    f"differently from the random-init model's beyond layer-matched chance (median over task pairs "
                    f"of overlap minus layer-matched chance, trained minus random, top {frac:.1%}, {pipeline['mode']} "
                    f"selection)", observed, percentile_ci(diff), 0.0, p=p, n=n_blocks, direction="two-sided",
                    p_floor=min(1.0, 2 / (1 + ev["n_boot"])), floor_n=f"{ev['n_boot']} bootstrap resamples",
                    unit="blocks of documents (statistics)", test="two-sided bootstrap p", bootstrap=True)]
    usable = [r for r in persistence if r]
    if usable:
        combined = combine_seeds(usable, ev["n_boot"], seed)
        claims.append(Claim(f"pattern_persists[{kind}]", f"{kind}: the trained task x task overlap pattern persists "
                            f"at random init in every seed (median Spearman rho over {combined['n']} seeds, "
                            f"largest Holm-adjusted permutation p)", combined["median_rho"], combined["ci"], 0.0,
                            p=combined["p_combined"], n=combined["n"], correction="holm",
                            p_floor=combined["p_floor"], floor_n=combined["floor_n"], unit="random-init seeds"))
    return claims


def _excess_of(study: Study, pipeline: dict) -> np.ndarray:
    """Each task pair's overlap of the pipeline's sets minus its layer-matched chance (upper triangle)."""
    masks = pipeline_masks(study.stats(progress=False), **pipeline)
    _, matrix = overlap_matrix(masks)
    _, chance = layer_matched_chance_matrix(masks, metric="overlap")
    i, j = np.triu_indices(len(matrix), 1)
    return matrix[i, j] - chance[i, j]


class RandomInit:
    """Notebook 04's steps on the params' language model and image model (`kinds`)."""

    def __init__(self, report, kinds=("lm", "vit")):
        self.report, self.params, self.kinds = report, report.params, tuple(kinds)
        ri = self.params["random_init"]
        self.seeds, self.n_perm = ri["seeds"], ri["n_perm"]
        # the claims' fraction is fixed in advance (random_init.frac), never picked from the sweep after the fact;
        # the sweep over random_init.fracs stays a description (the median-vs-fraction figure)
        self.f_show = ri["frac"]
        self.fracs = sorted(set(ri["fracs"]) | {self.f_show})

    @cached_property
    def studies(self) -> dict[str, dict]:
        """{kind: {"trained": Study, "randoms": [Study per seed]}}; the random models read the same documents."""
        out = {}
        for kind in self.kinds:
            trained = Study.from_params(self.params, kind)
            out[kind] = {"trained": trained, "randoms": [trained.with_random_init(s) for s in self.seeds]}
            self.report.save_tasks(trained)
        return out

    def models(self) -> dict:
        for kind, r in self.studies.items():
            for st in [r["trained"]] + r["randoms"]:
                print(f"{kind}: {st.describe()} (random_init={st.handle.random_init}, seed={st.handle.seed})")
        return self.studies

    @cached_property
    def summary(self) -> dict[tuple, RandomInitComparison]:
        """{(kind, frac): overlaps.random_init_comparison of the trained and random models' top-frac sets}."""
        return {(kind, frac): overlaps.random_init_comparison(r["trained"].masks(frac),
                                                              [st.masks(frac) for st in r["randoms"]],
                                                              n_perm=self.n_perm, seed=self.params["seed"])
                for kind, r in self.studies.items() for frac in self.fracs}

    def _random_label(self, kind: str) -> str:
        trained, budget = self.studies[kind]["trained"], self.studies[kind]["randoms"][0].stats_budget
        return f"random init, seeds {self.seeds}" + ("" if budget == trained.stats_budget else
                                                     f", {budget} {trained.tasks.unit} (trained: {trained.stats_budget})")

    def comparison(self) -> dict:
        """The overlap CDFs at the claims' fraction, the medians against the fraction, and where the sets sit."""
        f, show = self.f_show, self.report.show
        for kind, r in self.studies.items():
            s, random_label = self.summary[(kind, f)], self._random_label(kind)
            show(plots.cdfs({f"{r['trained'].label} (trained)": s.trained, random_label: s.random},
                            title=f"Pairwise overlap of top-{f:.1%} neuron sets — {kind}", xlabel="overlap coefficient"),
                 f"04_{kind}_overlap_cdf", "Learned structure: the trained curve lies apart from the random-init curve.")
            medians = {"trained (median)": [np.median(self.summary[(kind, x)].trained) for x in self.fracs],
                       f"{random_label} (median)": [np.median(self.summary[(kind, x)].random) for x in self.fracs]}
            show(plots.sweep(self.fracs, medians, chance=list(self.fracs), ylabel="overlap coefficient",
                             title=f"Median pairwise overlap vs fraction — {kind}"),
                 f"04_{kind}_overlap_sweep", "Learned structure: the trained and random medians differ at every fraction.")
            show(plots.layer_lines({"trained": s.layers_trained, "random init": s.layers_random},
                                   title=f"Where top-{f:.1%} neurons sit ({self.params['pruning']['mode']} selection) "
                                         f"— {kind}", ylabel="share of selected neurons"), f"04_{kind}_layers",
                 "If random init piles its selection into few layers, its global-selection overlaps come from that, "
                 "not from shared neurons.")
        return self.summary

    def medians(self) -> dict:
        """{"kind@frac": (median overlap trained, random, persistence rho per seed)}, rounded: a check."""
        return {f"{kind}@{frac}": (round(float(np.median(s.trained)), 3), round(float(np.median(s.random)), 3),
                                   [round(r, 3) for r in s.rhos]) for (kind, frac), s in self.summary.items()}

    @cached_property
    def claims(self) -> list[Claim]:
        """random_init_claims of every model at random_init.frac, recorded in the report."""
        claims = []
        for kind, r in self.studies.items():
            claims += random_init_claims(kind, r["trained"], r["randoms"], self.summary[(kind, self.f_show)].persistence,
                                         self.f_show)
        self.report.claim(*claims)
        return claims

    def evidence(self) -> list[Claim]:
        """The claims' forest plot and one line per claim (p adjusted over the notebook's claims)."""
        self.report.claims_figure("04_claims", self.claims)
        self.report.print_claims(self.claims)
        return self.claims

    @cached_property
    def modes(self) -> dict[tuple, dict]:
        """{(kind, mode): median pairwise overlap of the top-f_show sets, trained and random (seeds pooled), with
        each side's layer-matched chance and uniform chance} under global and per-layer selection."""
        out = {}
        for kind, r in self.studies.items():
            for mode in MODES:
                trained = overlaps.summary(r["trained"].masks(self.f_show, mode=mode))
                randoms = [overlaps.summary(st.masks(self.f_show, mode=mode)) for st in r["randoms"]]
                out[(kind, mode)] = {
                    "trained": trained.median, "random": float(np.median(np.concatenate([x.pairs for x in randoms]))),
                    "trained_layer_chance": trained.layer_chance["overlap"],
                    "random_layer_chance": float(np.mean([x.layer_chance["overlap"] for x in randoms])),
                    "uniform_chance": trained.chance["overlap"]}
        return out

    def selection_modes(self) -> dict:
        """The grouped bars of each model's medians by selection mode; returns them rounded (a check)."""
        for kind in self.studies:
            self.report.show(plots.grouped_bars({mode: self.modes[(kind, mode)] for mode in MODES},
                                                title=f"Median pairwise overlap of top-{self.f_show:.1%} sets by "
                                                      f"selection mode — {kind}", ylabel="overlap coefficient"),
                             f"04_{kind}_selection_modes",
                             "If random init overlaps more only under global selection, and only as much as its "
                             "layer-matched chance, the gap comes from where the selection lands, not from shared "
                             "neurons.")
        return {f"{kind}|{mode}": {k: round(v, 3) for k, v in m.items()} for (kind, mode), m in self.modes.items()}

    def between_seeds(self) -> dict:
        """{kind: (trained-vs-random rho per seed, rho between every two seeds)}, rounded: a check."""
        return {kind: ([round(r, 3) for r in self.summary[(kind, self.f_show)].rhos],
                       [round(r, 3) for r in self.summary[(kind, self.f_show)].between_rhos]) for kind in self.studies}

    @cached_property
    def paper_runs(self) -> dict:
        """{model: paper_scores.replay_random_control} for the released 7B score sets that are present; one line
        for each that is not, saying what is skipped and why."""
        ps, out = self.params["paper_scores"], {}
        for name in PAPER_MODELS:
            try:
                out[name] = paper_scores.replay_random_control(name, fracs=(ps["frac"], 0.05), root=ps["dir"],
                                                               seed=self.params["seed"])
            except paper_scores.PaperScoresUnavailable as err:
                print(f"{name}: skipped — {err}")
        return out

    def paper(self) -> dict:
        """The released score sets' overlap CDFs and layer shares, trained vs random init."""
        for name, r in self.paper_runs.items():
            f0 = r["fracs"][0]
            self.report.show(plots.cdfs({f"{r['model']} (trained)": r["pairs"][("trained", f0)],
                                         "random init": r["pairs"][("random", f0)]},
                                        title=f"{r['model']}: pairwise overlap of top-{f0:.0%} neurons "
                                              f"({len(r['tasks'])} tasks)", xlabel="overlap coefficient"),
                             f"04_paper_{name}_cdf", "Learned structure: the trained curve lies apart from the "
                             "random-init curve.")
            self.report.show(plots.layer_lines({"trained": r["layers"][("trained", f0)],
                                                "random init": r["layers"][("random", f0)]},
                                               title=f"{r['model']}: where the global top-{f0:.0%} neurons sit",
                                               ylabel="share of selected neurons"),
                             f"04_paper_{name}_layers", "A random model that piles its global selection into one layer "
                             "overlaps more for that reason alone.")
        return self.paper_runs

    def paper_text(self) -> str:
        """The released score sets' numbers in words ("" when none is present)."""
        text = ""
        for r in self.paper_runs.values():
            for f in r["fracs"]:
                p, ties = r["persistence"][f], r["ties"]
                text += (f"* {r['model']}, top {f:.0%} ({len(r['tasks'])} shared tasks): median pairwise overlap "
                         f"{np.median(r['pairs'][('trained', f)]):.3f} trained vs "
                         f"{np.median(r['pairs'][('random', f)]):.3f} random; pattern persistence Spearman "
                         f"{p['rho']:.2f} (permutation p = {p['p_value']:.2g}); neurons tied at the threshold (median "
                         f"over tasks): {int(np.median(list(ties[('trained', f)].values())))} trained, "
                         f"{int(np.median(list(ties[('random', f)].values())))} random.\n")
        return text

    def findings(self) -> str:
        """The findings in words, every number from this run's records; verdicts only through the claims."""
        self.claims             # noqa: B018 (recorded first: the findings and the results JSON refer to them)
        text = ""
        for kind, r in self.studies.items():
            s, modes = self.summary[(kind, self.f_show)], self.modes
            rhos, between = s.rhos, s.between_rhos
            ps_ = [p["p_value"] for p in s.persistence if p]
            text += (f"* {kind} ({r['trained'].label}, {len(self.seeds)} random seeds), top {self.f_show:.1%}: median "
                     f"pairwise overlap {np.median(s.trained):.3f} trained vs {np.median(s.random):.3f} random init. "
                     + (f"Pattern persistence per seed: Spearman {', '.join(f'{x:.2f}' for x in rhos)}, permutation p "
                        f"{', '.join(f'{p:.2g}' for p in ps_)} (all seeds combined: the claim `pattern_persists` above). "
                        if np.isfinite(rhos).any() else "Pattern persistence is undefined here: the overlaps do not "
                        "vary across task pairs (raise the statistics budget or frac). ")
                     + (f"Between random seeds the task × task pattern agrees at Spearman {np.nanmean(between):.2f} on "
                        f"average. " if between and np.isfinite(between).any() else "")
                     + "Median overlap by selection mode (trained / random; layer-matched chance trained / random): "
                     + "; ".join(f"{mode} {modes[(kind, mode)]['trained']:.3f} / {modes[(kind, mode)]['random']:.3f} "
                                 f"({modes[(kind, mode)]['trained_layer_chance']:.3f} / "
                                 f"{modes[(kind, mode)]['random_layer_chance']:.3f})" for mode in MODES) + ".\n")
        paper = self.paper_text()
        return text + ("\n**The paper's 7B models (released scores):**\n\n" + paper if paper else "")

    def save_stats(self, out_dir) -> None:
        """Each random model's statistics; file names carry the seed: never mistaken for the trained model's."""
        for r in self.studies.values():
            for st in r["randoms"]:
                st.save_stats(out_dir)

    def results(self) -> dict:
        """The numbers of this run for the results JSON (the claims recorded first: report.save lists them)."""
        self.claims             # noqa: B018
        return {"seeds": self.seeds, "summary": {f"{k}@{f}": asdict(v) for (k, f), v in self.summary.items()},
                "selection_modes": {f"{k}|{m}": v for (k, m), v in self.modes.items()},
                "paper": {n: {"tasks": r["tasks"], "persistence": r["persistence"]} for n, r in self.paper_runs.items()}}
