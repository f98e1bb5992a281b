"""A study: one model, its tasks, and what is derived from them (statistics, scores, the cross-task result,
splits), with statistics and splits cached on disk. What one notebook alone derives (01/02's claims, 03's routing
curves, 04's claims) lives in that notebook's steps module (selective.py, routing.py, random_init.py).

The glue the notebooks use, so that none of them re-implements loading, caching or evaluation:
`Study.from_params(params, "lm")` (the params' `lm` section: a language model on text domains) or `"vit"`
(an image model on classes), then `.stats()`, `.scores()`, `.cross_task(...)`. What differs between text
and images lives in the task objects of tasks.py; a Study never asks which modality it has.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluation import CrossTaskResult, cross_task_matrix
from .files import cache_dir, cached, file_name
from .models import ModelHandle, load_model
from .moefication import check_n_experts, split_layers
from .neuron_collection import NeuronExamples, add_ablations, collect_examples, histogram_edges, pick_neurons
from .params import device_of, dtype_of
from .pruning import Selection
from .shards import collect_blocks
from .statistics import BlockStats, NeuronStats, activation_sample, collect_block_stats, weighted_pool
from .tasks import ImageTasks, TextTasks, data_hash

# bump when the way statistics or splits are computed changes, so no cache from older code is reused
CACHE_VERSION = 4      # 3: statistics files carry a checksum; 4: session 8 (LM position settings, blocks_alone)
GENERAL = "<general corpus>"   # the general corpus among the block statistics (block_entry reads its data)
SECTIONS = {tasks.section: tasks for tasks in (TextTasks, ImageTasks)}      # params section -> its tasks


@dataclass
class Study:
    handle: ModelHandle
    params: dict
    kind: str                      # the params section: "lm" (text domains) or "vit" (image classes)
    tasks: TextTasks | ImageTasks
    _stats: dict = field(default_factory=dict)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict, kind: str, *, random_seed: int | None = None,
                    handle: ModelHandle | None = None) -> "Study":
        """Load the model and tasks that `params[kind]` names. random_seed: a freshly initialised model of
        the same architecture (docs/method.md §6). A handle can be passed to reuse a loaded model."""
        if kind not in SECTIONS:
            raise ValueError(f"kind must be one of {', '.join(SECTIONS)} (a section of the params), got {kind!r}")
        p = params[kind]
        if handle is None:
            options = training_options(params, kind)
            device = device_of(params)
            placement = {"device_map": "auto"} if device == "sharded" else {"device": device}
            handle = load_model(p["model"], dtype=dtype_of(params, kind), **placement, **options)
        if random_seed is not None:
            handle = load_random(handle, random_seed)
        # an image folder without a processor is resized to what the model takes
        shape = {"image_shape": handle.image_shape} if p.get("dataset") == "image-folder" else {}
        tasks = SECTIONS[kind].from_params(params, processor=handle.processor, tokenizer=handle.tokenizer, **shape)
        tasks.check_model(handle)           # e.g. an image model's output i must be class i, before any statistics
        return cls(handle, params, kind, tasks)

    def with_random_init(self, seed: int) -> "Study":
        """The same tasks (the same documents and images) on a freshly initialised model."""
        return Study(load_random(self.handle, seed), self.params, self.kind, self.tasks)

    @property
    def settings(self) -> dict:
        return self.params[self.kind]

    @property
    def task_names(self) -> list[str]:
        return self.tasks.names

    @property
    def label(self) -> str:
        return self.handle.label

    @property
    def dtype(self) -> str:
        """The dtype the model runs in, e.g. "float32" (params: <kind>.dtype, or dtype)."""
        return str(self.handle.dtype).removeprefix("torch.")

    # -- statistics ----------------------------------------------------------------------------------
    @property
    def stats_budget(self) -> int:
        """Statistics budget per task (tokens or images): random-init models read their own from
        params.random_init when it is set."""
        key = self.tasks.stats_key
        if self.handle.random_init and self.params["random_init"][key] is not None:
            return self.params["random_init"][key]
        return self.settings[key]

    def stats(self, *, budget: int | None = None, progress: bool = True) -> dict[str, NeuronStats]:
        """Per-task statistics: each task's block statistics merged (the same sums, docs/method.md §2), so one forward pass
        serves the statistics and their intervals; computed once per (model, data, settings), cached on disk."""
        budget = self.stats_budget if budget is None else budget
        if budget not in self._stats:
            self._stats[budget] = {t: b.merged() for t, b in self.block_stats(budget=budget, progress=progress).items()}
        return self._stats[budget]

    def block_stats(self, *, budget: int | None = None, progress: bool = True) -> dict[str, BlockStats]:
        """Per-task statistics kept per block of documents (images) for intervals (evidence.py), cached on disk;
        `.merged()` of a task's blocks is its statistics."""
        budget = self.stats_budget if budget is None else budget
        n_blocks = self.params["evidence"]["n_blocks"]
        return {name: self._block_stats(name, budget, n_blocks, progress) for name in self.task_names}

    def null_block_stats(self, domain: str | None = None, *, progress: bool = True) -> BlockStats:
        """The null domain of the pseudo-task null (evidence.pseudo_task_null): `domain` (default: the task
        with the most statistics documents or images) read with the budget and blocks of all tasks together, so
        pseudo-tasks of one task's number of blocks have the real tasks' size where the domain is large enough."""
        domain = domain or self.null_domain()
        n = len(self.task_names)
        return self._block_stats(domain, n * self.stats_budget, n * self.params["evidence"]["n_blocks"], progress)

    def block_entry(self, name: str, budget: int, n_blocks: int) -> tuple:
        """(statistics data, collect options, cache key, cache file) of a task's block statistics (shards.py
        writes the same entries from job arrays)."""
        p = self.settings
        task_data = self.general_data(budget) if name == GENERAL else self.tasks.statistics_data(name, budget)
        key = {"version": CACHE_VERSION, "model": self.handle.identity()["fingerprint"], "task": name,
               "data": data_hash(task_data), "budget": budget, "blocks": n_blocks, "ctx": p.get("ctx"),
               "cls_only": p.get("cls_only", False), "dtype": self.dtype,
               **({"blocks_alone": True} if self.params["evidence"]["blocks_alone"] else {}),
               # which positions count and how they weigh (LM only, so the image caches keep their keys)
               **{k: p[k] for k in ("skip_positions", "equal_positions") if k in p}}
        expect = data_hash(key)
        path = Path(self.params.get("cache_dir") or cache_dir()) / "stats" / f"{self.kind}-{expect}.safetensors"
        options = {"batch_size": p["batch_size"], "max_tokens": budget, **self.tasks.collect_options()}
        return task_data, options, expect, path

    def _block_stats(self, name: str, budget: int, n_blocks: int, progress: bool) -> BlockStats:
        task_data, options, expect, path = self.block_entry(name, budget, n_blocks)

        def load(path):
            blocks = BlockStats.load(path)
            if blocks.meta.get("cache_key") != expect:
                raise LookupError("made with other settings")
            return blocks

        def compute():      # blocks_alone: each block batched alone, the same bits as `collect`'s shards merged
            collect = collect_blocks if self.params["evidence"]["blocks_alone"] else collect_block_stats
            blocks = collect(self.handle, task_data, n_blocks, task=name, progress=progress, **options)
            blocks.meta["cache_key"] = expect
            return blocks
        return cached(path, compute, load=load, save=lambda blocks, tmp: blocks.save(tmp), what="block statistics")

    def document_hits(self, tasks=None) -> dict[str, dict]:
        """Per task the top-1 hits per evaluation document (image) of the model as it is now: {"n", "top1"}
        arrays, so accuracies and relative accuracies over resampled documents are ratios of sums."""
        return self.tasks.document_hits(self.handle, list(tasks or self.task_names))

    def save_stats(self, out_dir) -> Path:
        """Write each task's statistics into out_dir/statistics/<kind>-<file name>.safetensors (a run's record;
        files.file_name: one file per task whatever its name)."""
        folder = Path(out_dir) / "statistics"
        # "." never occurs in a plain task's file name, so a task named "code-random-seed1" keeps a file of its own
        suffix = f".random-seed{self.handle.seed}" if self.handle.random_init else ""
        for name, st in self.stats(progress=False).items():
            st.save(folder / f"{self.kind}-{file_name(name)}{suffix}.safetensors")
        if not self.handle.random_init and "general" in (self.params["overlap"]["retain"], self.params["pruning"]["retain"]):
            self.general_stats().save(folder / f"{self.kind}.general-corpus.safetensors")     # the retain set read
        return folder

    def general_data(self, budget: int):
        """The external general corpus (tasks' general_data): text none of the tasks use, or train images no
        task's statistics read, seeded by the params' seed."""
        used = max(self.settings[self.tasks.stats_key], self.stats_budget)     # what any task's statistics read
        return self.tasks.general_data(self.params["seed"], budget, used)

    def general_stats(self, *, progress: bool = False) -> NeuronStats:
        """Statistics of the general corpus, the retain set of `retain: general` (docs/method.md §3): read with
        the budget of all tasks together (as the null domain), on this model, cached on disk like a task's."""
        n = len(self.task_names)
        return self._block_stats(GENERAL, n * self.stats_budget, self.params["evidence"]["n_blocks"], progress).merged()

    def retain_stats(self, stats=None) -> dict[str, NeuronStats]:
        """Per task the retain set's statistics (docs/method.md §3): 'rest' = the other tasks pooled with equal weight;
        'general' = the external general corpus (general_stats), which holds none of the tasks, so a neuron shared
        by some tasks scores as high as one of a single task."""
        stats = stats or self.stats()
        if self.params["pruning"]["retain"] == "general":
            general = self.general_stats()
            return {t: general for t in stats}
        return {t: weighted_pool([s for n, s in stats.items() if n != t]) for t in stats}

    def selection(self, frac: float | None = None, mode: str | None = None, retain: str | None = None) -> Selection:
        """The params' selection (pruning.*) at `frac`, by `mode` and against `retain` where given; 'general'
        brings this model's general-corpus statistics."""
        pr = self.params["pruning"]
        retain = retain or pr["retain"]
        return Selection(frac, mode or pr["mode"], pr["importance"], pr["eps"], pr["eps_relative"], retain,
                         self.general_stats() if retain == "general" else None)

    def scores(self, *, stats=None, retain: str | None = None) -> dict[str, torch.Tensor]:
        """Each task's selective-pruning scores under `retain` (default pruning.retain)."""
        return self.selection(retain=retain).scores(stats or self.stats())

    def masks(self, frac: float, *, mode: str | None = None, scores=None) -> dict[str, torch.Tensor]:
        """Each task's top-`frac` neurons (bool [L, d_mlp]) by the params' selection mode unless `mode`."""
        # selecting from scores reads no statistics: the general corpus is not loaded for it
        pr = self.params["pruning"]
        return Selection(frac, mode or pr["mode"]).select(scores or self.scores())

    def neuron_examples(self, masks: dict, *, scores=None, n: int = 4, k: int = 8, window: int = 8,
                        bins: int = 200, progress: bool = True, ablate: int = 0, budget: int | None = None,
                        ablation_budget: int | None = None, ablation_base: dict | None = None) -> NeuronExamples:
        """Neurons to look at (neurons.py): each task's `n` selected neurons (masks) with the highest scores,
        and for them only, one more pass over the first `budget` tokens (images) of every task's statistics data
        (default and at most: all of it) keeping the top-`k` positions per
        task (`window` tokens either side, or the image) and a histogram of `bins` bins per task; documents
        named as in tasks.json, and each neuron's direct effect on the outputs. ablate: also zero each task's
        first `ablate` of them, one at a time, and measure every task's accuracy on `ablation_budget`
        evaluation tokens (images) per task (default: the evaluation's): one evaluation pass per neuron;
        ablation_base: the intact model's document_hits on those documents, if known."""
        stats = self.stats(progress=False)
        picked = pick_neurons(scores or self.scores(stats=stats), masks, n)
        neurons = list(dict.fromkeys(nr for ns in picked.values() for nr in ns))
        budget = self.stats_budget if budget is None else min(budget, self.stats_budget)
        data = {t: self.tasks.statistics_data(t, budget) for t in self.task_names}
        options = {"max_tokens": budget, **self.tasks.collect_options()}
        options.pop("equal_positions", None)      # top-k and histograms count positions: weights do not apply
        ex = collect_examples(self.handle, data, neurons, picked=picked, k=k, window=window,
                              edges=histogram_edges(stats, neurons, bins), batch_size=self.settings["batch_size"],
                              progress=progress, names={t: self.tasks.statistics_names(t, budget) for t in data},
                              **options)
        if ablate:
            add_ablations(ex, self.handle, lambda: self.tasks.document_hits(self.handle, budget=ablation_budget),
                          ablate, n_boot=self.params["evidence"]["n_boot"], seed=self.params["seed"],
                          unit=self.tasks.unit, base=ablation_base)
        return ex

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate_tasks(self, tasks=None) -> dict[str, float]:
        """Top-1 accuracy per task of the model as it is now (inside any active ablation)."""
        return self.tasks.accuracy(self.handle, list(tasks or self.task_names))

    def evaluators(self):
        """For cross_task_matrix: per task a callable() -> top-1, or one callable() -> {task: top-1}."""
        return self.tasks.evaluators(self.handle)

    def cross_task(self, *, frac: float | None = None, target: float | None = None, scores=None,
                   base: dict | None = None, random_seeds=None, progress: bool = True) -> CrossTaskResult:
        """The cross-task matrix (docs/method.md §4) with the params' selection and ablation settings: a fixed `frac`,
        or the fraction found by bisection that brings each task to `target` × its unpruned accuracy. A
        fixed-`frac` result keeps every ablation's per-document hits (evidence.cross_task_intervals, selective.claims
        reuses them). base: unpruned accuracies (e.g. an earlier result's `.base`) to skip that pass.
        random_seeds: the matched random ablations' seeds (default pruning.random_seeds)."""
        pr = self.params["pruning"]
        means = None
        if pr["ablation"] == "mean":          # each task's neurons are replaced by its retain set's mean
            means = {t: s.mean for t, s in self.retain_stats().items()}
        seeds = pr["random_seeds"] if random_seeds is None else random_seeds
        extra = ({"random_seeds": seeds} if target is None else
                 {"max_frac": self.settings["max_frac"], "tol": pr["tol"], "max_steps": pr["max_steps"]})
        return cross_task_matrix(self.handle, scores or self.scores(), self.evaluators(), frac=frac, target=target,
                                 mode=pr["mode"], ablation=pr["ablation"], means=means, base=base,
                                 progress=progress, **extra)

    def pipeline(self, frac: float, mode: str | None = None, retain: str | None = None) -> dict:
        """selection(...) as the keyword arguments evidence.pipeline_masks (bootstrap_masks, ...) takes."""
        return self.selection(frac, mode, retain).kwargs()

    def null_domain(self) -> str:
        """The task whose data the pseudo-task nulls split: the one with the most statistics documents (images)."""
        return max(self.task_names, key=lambda t: len(self.tasks.statistics_data(t, None)))

    def null_domains(self) -> list[str]:
        """The overlap.null_domains tasks with the most statistics documents (images), the first the null_domain:
        the pseudo-task nulls are pooled over them, so no verdict hinges on which one domain is split."""
        size = {t: len(self.tasks.statistics_data(t, None)) for t in self.task_names}
        return sorted(self.task_names, key=lambda t: -size[t])[:self.params["overlap"]["null_domains"]]

    def record(self) -> dict:
        """What each task is in this study: {task: {"source", "statistics": [ids], "evaluation": [ids]}}."""
        return self.tasks.record(self.handle, self.stats_budget)

    def describe(self) -> str:
        return (f"{self.label} ({self.dtype}): {self.handle.n_layers} layers x {self.handle.d_mlp} neurons; "
                f"{len(self.task_names)} tasks; statistics on {self.stats_budget} {self.tasks.unit} per task")

    # -- MoEfication ---------------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        n = self.params["moefication"][self.tasks.experts_key]
        check_n_experts(self.handle.d_mlp, n)
        return n

    def splits(self, method: str, *, seed: int | None = None, progress: bool = True) -> torch.Tensor:
        """Expert labels [n_layers, d_mlp] by `method` ("param", "coactivation", "random"), cached on disk.
        seed: None for the params' seed; another one re-runs the method's seeded steps on the same data (the
        co-activation sample is the same), to see how stable the split is."""
        mo = self.params["moefication"]
        seed = self.params["seed"] if seed is None else seed
        key = {"version": CACHE_VERSION, "model": self.handle.identity()["fingerprint"], "method": method,
               "n_experts": self.n_experts, "seed": seed, "n_init": mo["n_init"], "refine": mo["refine"],
               "tokens": mo["coactivation_tokens"] if method == "coactivation" else None,
               "max_degree": mo["max_degree"] if method == "coactivation" else None,
               "tasks": self.task_names if method == "coactivation" else None}
        path = Path(self.params.get("cache_dir") or cache_dir()) / "splits" / f"{self.kind}-{data_hash(key)}.pt"
        names = {"param": ("n_init", "refine"), "coactivation": ("max_degree",)}.get(method, ())
        kwargs = {k: mo[k] for k in names if mo[k] is not None}

        def compute():
            acts = (activation_sample(self.handle, self.tasks, mo["coactivation_tokens"], self.settings["batch_size"])
                    if method == "coactivation" else None)
            return split_layers(self.handle, method, self.n_experts, seed=seed, acts=acts,
                                progress=progress, **kwargs)
        return cached(path, compute, load=lambda p: torch.load(p, weights_only=True), save=torch.save,
                      what="split")


def cache_entries(params: dict, kinds=None):
    """Yield (study, task, budget, n_blocks) for the block statistics that notebooks 01-05 of `params` read (each
    section's tasks, the null domain of 01/02's claims, the random-init models of 04/05), in a fixed order, one model
    loaded at a time. Notebook 06's checkpoints are not among them (it computes its own, at its own budgets)."""
    notebooks = set(params["notebooks"])
    uses = {"vit": {"01", "03", "04", "05"}, "lm": {"02", "03", "04", "05"}}
    n_blocks = params["evidence"]["n_blocks"]
    for kind in kinds or ("lm", "vit"):
        if not uses[kind] & notebooks:
            continue
        study = Study.from_params(params, kind)
        yield from ((study, t, study.stats_budget, n_blocks) for t in study.task_names)
        if {"vit": "01", "lm": "02"}[kind] in notebooks:
            n = len(study.task_names)
            if params["overlap"]["retain"] != "general" or params[kind]["selectivity_null"]:   # pseudo-task nulls
                yield from ((study, d, n * study.stats_budget, n * n_blocks) for d in study.null_domains())
            if "general" in (params["overlap"]["retain"], params["pruning"]["retain"]):
                yield study, GENERAL, n * study.stats_budget, n_blocks       # the general corpus (general_stats)
        if {"04", "05"} & notebooks:        # 05 reads the first seed's model only
            for seed in params["random_init"]["seeds"][:None if "04" in notebooks else 1]:
                random = study.with_random_init(seed)
                yield from ((random, t, random.stats_budget, n_blocks) for t in random.task_names)


def training_options(params: dict, kind: str) -> dict:
    """The options load_model passes to the trainer of the model trained here (fmnist-vit: its training settings
    and the run's seed); {} for any other model."""
    p = params[kind]
    if p["model"] != "fmnist-vit":             # training settings apply to the model trained here only
        return {}
    return {**{k: v for k, v in p["training"].items() if v is not None}, "seed": params["seed"]}


def load_random(handle: ModelHandle, seed: int) -> ModelHandle:
    """A freshly initialised model of `handle`'s architecture (seeded), keeping its name for labels."""
    random = load_model(handle.model, tokenizer=handle.tokenizer, processor=handle.processor,
                        random_init=True, seed=seed)
    random.name = handle.name
    return random
