"""Parameter sets (params/*.yaml), validated before any heavy work.

DEFAULTS is the schema: every key that exists, with its default value and therefore its type. A YAML
file overrides any part of it. An unknown key, a wrong type or an impossible value stops the run
with one error naming the key and what is allowed.
"""
from __future__ import annotations

import copy
import math
import os
import re
import reprlib
from pathlib import Path

import torch
import yaml

from .data import (EMBEDDED_TEXT_DOMAINS, PAPER_TEXT_DOMAINS, dataset_folder, image_folder_files, split_sizes,
                   task_documents)

NOTEBOOKS = {"01": "01_vit_pruning", "02": "02_mistral_pruning", "03": "03_moefication",
             "04": "04_random_init_control", "05": "05_layerwise_correspondence", "06": "06_training_dynamics",
             "07": "07_localisers"}

DEFAULTS: dict = {
    "run_name": "default",
    "description": "",
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N | sharded (device_map="auto": over GPUs, then CPU)
    # float32 | bfloat16 | float16 | auto (bfloat16 where the device computes it natively: a GPU with bf16, a CPU
    # with AMX or AVX512-BF16; float32 elsewhere). lm.dtype / vit.dtype override it for one section
    "dtype": "float32",
    # 07 (localisers) reads 01/02's cached statistics and has its own, cheaper budgets (the localisers section)
    "notebooks": ["01", "02", "03", "04", "05", "06", "07"],
    # statistics and splits; None: $MODSEP_CACHE or ~/.cache/modsep, where models converted or trained here always go.
    # Relative paths in a parameter file (cache_dir, data_dir, model folders, ...) are read from the file's folder
    "cache_dir": None,
    "lm": {
        "model": "smollm2-135m",
        "dtype": None,           # None: the top-level dtype
        "source": "embedded",    # embedded (local text domains) | hub (the paper's datasets)
        "data_dir": None,        # folder of save_to_disk copies for source: hub, offline
        # a list of domains of `source`, or {task: spec}: spec null (the domain of that name), {files: [glob, ...]}
        # or {dataset: hub id or save_to_disk folder, split, text_column, where: {column: value}, max_docs};
        # relative paths are read from the params file's folder (see README, "Your own tasks")
        "tasks": ["code", "docs", "licenses", "computers", "science", "medicine", "songs-poems", "law"],
        "stats_tokens": 4096,
        # budgets are read one ctx window per document per round, so 512 tokens at ctx 64 are >= 8 evaluation
        # documents per domain (the bootstrap's unit) and 4096 statistics tokens >= 64 documents; the cross-task
        # matrix costs T x T x (1 + random seeds) evaluations of eval_tokens: the default's largest cost on a CPU
        "eval_tokens": 512,
        "ctx": 64,
        # statistics (scores, neuron pages; not evaluation) leave out these positions of every window: 0 is where
        # a model's attention sink (and BOS) sits, whose neurons fire there whatever the text, so a domain of short
        # documents would look specific to them (issue #26); [] counts every token
        "skip_positions": [0],
        # weigh each counted position alike within a task (1 / windows reaching it), so the windows' lengths cannot
        # move a task's statistics; false: every token weighs 1
        "equal_positions": True,
        "batch_size": 8,
        "eval_frac": 0.3,
        "skip_top": 0,
        "max_frac": 0.1,         # bisection upper bound (paper: 0.128 for Mistral)
        # notebook 02's cross-task matrix at the fractions found by bisection (the paper's figure; no claim rests on
        # it): T x (1 + up to pruning.max_steps) + T x T evaluations, about 2 minutes of make run on 2 CPU cores, so
        # off in the embedded default (the claims use the fixed-fraction matrix); on in params/paper_mistral7b.yaml
        "bisection": False,
        # the selectivity claim's pseudo-task null (evidence.n_null_ablation ablations of T pseudo-tasks on T x
        # eval_tokens each: several times the cross-task matrix's cost); false: the null is 0 by exchangeability
        "selectivity_null": False,
        # notebook 02: each domain's top set from this share of its statistics documents against the set from all
        # of them (from the block sums: no extra pass)
        "stability_fractions": [0.125, 0.25, 0.5],
        # notebook 06: training checkpoints of `model` to follow, oldest first, the last being the final model:
        # hub revisions (e.g. Pythia's [step1000, ..., step143000], loaded with from_pretrained(revision=...)) or
        # local model folders; null: 06 follows the ViT only
        "revisions": None,
        # a mixture-of-experts model (hub id or local folder: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) for the MoE
        # section (modsep_nb.moe): router choices per task and task neurons inside experts; null: skipped
        "moe_model": None,
    },
    "vit": {
        "model": "fmnist-vit",
        "dtype": None,           # None: the top-level dtype
        # only for fmnist-vit (trained here): see modsep_nb/vit_training.py
        # checkpoints: weights saved at that many log-spaced steps from the initialisation to the end (06)
        "training": {"epochs": 2, "n_train": None, "hidden_size": 64, "num_hidden_layers": 6,
                     "intermediate_size": 256, "patch_size": 4, "lr": 2e-3, "checkpoints": 10},
        "dataset": "fashion-mnist",   # fashion-mnist | cifar100 | image-folder (data_dir: one subfolder per class)
        "data_dir": None,
        "tasks": "classes",      # classes | groups | {task: [class, ...]}
        "eval_frac": 0.3,        # image-folder without test/: each class's share of test images
        "stats_images": 500,     # per task, from the train split
        "eval_images": 2000,     # from the test split (all tasks together)
        "batch_size": 128,
        "cls_only": False,
        # bisection upper bound (paper: 0.05 for ViT-B/16; the small Fashion-MNIST ViT needs more: at 0.05, 9 of
        # its 10 classes stayed above the 80% target in the default run)
        "max_frac": 0.25,
        "bisection": True,       # as lm.bisection (notebook 01's: seconds here)
        "selectivity_null": True,       # as lm.selectivity_null (cheap here: one pass over the test images each)
    },
    "pruning": {
        "importance": "abs",
        "eps": 1e-3,
        # null: `eps` (absolute) is used; a number r: each layer's eps = r x the median retain importance of
        # that layer's neurons, the same relative size whatever the model's activation scale
        "eps_relative": 0.01,
        "retain": "rest",
        "mode": "global",
        "ablation": "zero",
        "frac": 0.02,
        "target": 0.8,
        "tol": 0.03,
        "max_steps": 6,
        # the fixed-fraction cross-task matrix also ablates, per task, as many random neurons with the same
        # count per layer, once per seed: the baseline for "damage beyond chance". Each seed costs T x T more
        # evaluation passes (the LM's default: 64 x 512 tokens, ~3.5 minutes on 2 CPU cores); one by default: with
        # three, the LM's random cells were 0.91-1.00 of unpruned and its mean random selectivity 0.00 (session 10)
        "random_seeds": [0],
    },
    "overlap": {
        "frac": 0.01,
        # the retain rule of 01/02's overlap claims and figures: general (an external corpus none of the tasks use,
        # as the paper's Pile: a neuron shared by a few tasks scores as high as a task's own) | rest (the other
        # tasks: a shared neuron scores at most ~T-1, so sharing can hardly be seen)
        "retain": "general",
        "sweep": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        # the pseudo-task nulls (overlap under retain: rest, the selectivity null) are pooled over this many domains
        # (the tasks with the most statistics data), so a verdict does not hinge on which one domain is split
        "null_domains": 3,
    },
    "moefication": {
        "lm_experts": 48,
        "vit_experts": 8,
        "n_init": None,          # k-means restarts; None: balanced_kmeans's "auto" (4, or 1 for a large layer)
        "refine": None,          # swap refinement of the best restart; None: "auto" (on, except for a large layer)
        "coactivation_tokens": 1024,
        "max_degree": None,      # co-activation graph: keep each neuron's heaviest edges (needed at Mistral scale)
        "keep_fracs": [0.125, 0.25, 0.5, 1.0],
        # routing curves and claims on the first this many tasks; None: every task. Not every task by default: each
        # costs (1 + 4 x kept fractions + n_seeds - 1) evaluations, and 8 LM domains would add minutes to 03
        "eval_tasks": 3,
        # the routing claims' outer loop (issue #26 item 8): the random split redrawn under this many seeds (the params'
        # seed first), and the parameter split too for the kinds in reseed_param (the LM's k-means takes ~7 minutes a
        # seed on 2 cores, the ViT's seconds); the interval resamples seeds and documents together
        "n_seeds": 10,
        "reseed_param": ["vit"],
        # the claims' kept fraction, fixed in advance (in keep_fracs); None: the mean over every kept fraction < 1,
        # which costs each further seed one evaluation per fraction instead of one
        "claim_frac": 0.25,
    },
    "random_init": {
        # one random-init model per seed (the paper: one). Each random SmolLM2 reads every task's statistics budget,
        # about 65 s on 2 CPU cores; pattern_persists tests every seed on its own (permutations, Holm over seeds)
        "seeds": [1, 2],
        "stats_tokens": None,    # None: the trained model's budget (same data, same budget); a number only on purpose
        "stats_images": None,
        "fracs": [0.01, 0.02, 0.05],   # fractions compared in notebook 04 (a description: the sweep figure)
        "frac": 0.01,            # the claims' fraction, fixed in advance (the paper's 1%); figures and findings use it
        "n_perm": 1000,          # permutations of the pattern-persistence test
    },
    "correspondence": {
        "fracs": [0.01, 0.02, 0.05, 0.1, 0.2],
        "n_null": 100,
        "band_sd": 2.0,          # figures: the null band is mean ± band_sd × sd of the random partitions
    },
    "evidence": {                # intervals, nulls and tests (docs/method.md §5.3); resamples reuse collected sums
        "n_boot": 200,           # bootstrap resamples over documents (images)
        "n_blocks": 32,          # statistics kept per block of documents, per task
        # each block batched alone: what `collect --shard I/N` computes, so that job arrays merged (`merge`) give
        # the notebooks' statistics bit for bit; off: blocks share batches (up to ~1.4-2.9x faster on 2 CPU cores)
        "blocks_alone": False,
        "n_null": 200,           # pseudo-task partitions of one domain (the pipeline's own null)
        # of those, how many also go through the cross-task ablation (forward passes); 80 so that its p floor
        # 1/81 times 01's family of 4 claims (Holm) stays below 0.05 (60 gave 4/61 = 0.066: never significant first)
        "n_null_ablation": 80,
        "n_perm": 1000,          # label permutations (related vs unrelated tasks)
    },
    "dynamics": {                # notebook 06: 01's pipeline and claims at every training checkpoint, kept cheap
        "stats_images": 100,     # per task and checkpoint: the first of the images 01 reads (at most vit.stats_images)
        # test images per checkpoint, the first of 01's (at most vit.eval_images): 500 leave ~50 per Fashion-MNIST class,
        # so a class right at all is rarely resampled to zero hits (200 left ~20 and dropped checkpoints, #26 item 9)
        "eval_images": 500,
        "frac": 0.05,            # top sets followed over training (overlap with the final set, pattern, W_in split)
        "n_boot": 100,           # bootstrap resamples at each checkpoint (documents or statistics blocks)
        "n_null": 100,           # pseudo-task partitions of the overlap null at each checkpoint
        "n_splits": 20,          # random balanced splits standing in for W_in's split (the correspondence null band)
        # sets_settle_before_accuracy's thresholds: a task's set has settled once its overlap with the final set stays
        # >= settled_overlap; accuracy has arrived once it stays >= accuracy_share x the final accuracy. The claim uses
        # these; 06 also shows the claim at every pair of the sweeps (a sensitivity table, not a second test)
        "settled_overlap": 0.5,
        "accuracy_share": 0.9,
        "settled_sweep": [0.4, 0.5, 0.6],
        "share_sweep": [0.8, 0.9, 0.95],
    },
    "localisers": {              # notebook 07: ways of finding task neurons, through one pipeline at pruning.frac
        # abs/rms/std/freq/sqrt: selective pruning with that importance; lape: activation-probability entropy;
        # ttest: Welch t of the task vs the rest (per token); auroc: AUROC of the task's statistics blocks (documents)
        # against the rest's; attribution: -activation x gradient of the task's loss (its own
        # forward and backward pass over the statistics data); attribution_contrast: that minus the other tasks' mean
        "methods": ["abs", "lape", "ttest", "auroc", "attribution", "attribution_contrast"],
        # the LM's localisers (null: methods): each costs SmolLM2 a cross-task matrix and 2 claims' resamples over
        # 30 x 1536 neurons, so the LM leaves out the per-token twin of auroc (ttest) and the attribution that
        # scores what every task needs (attribution): 07 then takes under 4 minutes of make run (BENCHMARKS.md)
        "lm_methods": ["abs", "lape", "auroc", "attribution_contrast"],
        # this many of lm.tasks, the first with at least 20 statistics and 20 evaluation documents
        # (localisers.localiser_tasks; the embedded default: code, docs, computers, not the licences' 10 and 4):
        # the cross-task matrix costs tasks^2 passes per localiser, and the claims rest on these tasks' documents
        "lm_tasks": 3,
        "random_seeds": [0],     # matched random ablations per localiser (pruning.random_seeds: 01 and 02)
        # the attribution's forward and backward pass reads the first this many of each task's statistics tokens
        # (images), and all tasks' worth of the null domain's; null: the statistics budget. 1,280 tokens are 20
        # windows: 20 blocks of documents even for long documents (docs), so its overlap claim rests on >= 20 units
        "attribution_tokens": 1280,
        "attribution_images": 200,
        # each localiser's cross-task matrix evaluates these many tokens (images) instead of lm.eval_tokens
        # (vit.eval_images); null: the section's
        "eval_tokens": None,
        "eval_images": 500,
        # bootstrap resamples of the evaluation documents behind each selectivity claim (at least evidence.n_boot):
        # every localiser makes 2 claims per model, and Holm over 24 claims needs p < 0.05 / 24 for the first
        "n_boot": 1000,
        # pseudo-task resamples behind each overlap claim (at least evidence.n_null): 2 claims per localiser and model
        # (6 on the ViT, 4 on the LM) make a Holm family of 20, whose first test needs p < 0.05 / 20, so at least 400
        # null values (floor 20/401 = 0.0499). Drawn in two stages: a claim whose first 50 already show it
        # unsupported stops there
        "n_null": 400,
    },
    "paper_scores": {
        "dir": None,             # None: $MODSEP_PAPER_SCORES or shared/paper_scores beside the repo (docs/method.md §13)
        "frac": 0.01,
    },
}

DTYPES = ("float32", "bfloat16", "float16", "auto")
LOCALISER_METHODS = ("abs", "rms", "std", "freq", "sqrt", "lape", "ttest", "auroc", "attribution",
                     "attribution_contrast")
CHOICES = {
    "device": None,   # checked by _check_device
    "dtype": DTYPES,
    "lm.dtype": DTYPES + (None,),
    "vit.dtype": DTYPES + (None,),
    "lm.source": ("embedded", "hub"),
    "vit.dataset": ("fashion-mnist", "cifar100", "image-folder"),
    "pruning.importance": ("abs", "rms", "std", "freq", "sqrt", "lape", "ttest"),
    "pruning.retain": ("rest", "general"),
    "overlap.retain": ("rest", "general"),
    "pruning.mode": ("global", "per_layer"),
    "pruning.ablation": ("zero", "mean"),
}
FRACTIONS = ("pruning.frac", "pruning.target", "overlap.frac", "dynamics.frac", "lm.eval_frac", "lm.max_frac",
             "vit.max_frac", "paper_scores.frac", "pruning.tol", "vit.eval_frac", "random_init.frac",
             "dynamics.settled_overlap", "dynamics.accuracy_share")
FRACTION_LISTS = ("overlap.sweep", "correspondence.fracs", "moefication.keep_fracs", "random_init.fracs",
                  "lm.stability_fractions", "dynamics.settled_sweep", "dynamics.share_sweep")
# keys whose default is null, and the type they take otherwise (moefication's are checked in validate)
NULLABLE = {"cache_dir": str, "lm.data_dir": str, "vit.data_dir": str, "paper_scores.dir": str,
            "vit.training.n_train": int, "random_init.stats_tokens": int, "random_init.stats_images": int,
            "lm.revisions": list, "lm.moe_model": str, "lm.dtype": str, "vit.dtype": str, "localisers.lm_tasks": int,
            "localisers.lm_methods": list,
            "localisers.attribution_tokens": int, "localisers.attribution_images": int,
            "localisers.eval_tokens": int, "localisers.eval_images": int, "moefication.eval_tasks": int,
            "moefication.claim_frac": float}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
POSITIVE = ("lm.stats_tokens", "lm.eval_tokens", "lm.ctx", "lm.batch_size", "vit.stats_images", "vit.eval_images",
            "vit.batch_size", "moefication.lm_experts", "moefication.vit_experts",
            "moefication.coactivation_tokens", "moefication.eval_tasks", "random_init.stats_tokens",
            "random_init.stats_images", "random_init.n_perm", "correspondence.n_null", "pruning.max_steps",
            "vit.training.epochs", "vit.training.checkpoints", "dynamics.stats_images", "dynamics.eval_images",
            "dynamics.n_boot", "dynamics.n_null", "dynamics.n_splits", "evidence.n_boot", "evidence.n_blocks", "evidence.n_null",
            "evidence.n_null_ablation", "evidence.n_perm", "vit.training.n_train", "vit.training.hidden_size",
            "vit.training.num_hidden_layers", "vit.training.intermediate_size", "vit.training.patch_size",
            "localisers.n_boot", "localisers.n_null", "moefication.n_seeds", "overlap.null_domains")
OPTIONAL = ("random_init.stats_tokens", "random_init.stats_images",      # None: the trained model's value
            "vit.training.n_train", "moefication.eval_tasks")                                     # None: the whole training split
MAX_SEED = 2**32 - 1        # numpy's legacy seeding, torch and random all take it
# resamples cost memory as well as time (bootstrap weights are n_boot x documents; 1e9 resamples needed ~300 GB);
# each statistics block holds a copy of the per-neuron sums (5 x layers x neurons, float64) for every task
MAX_RESAMPLES = 10_000
UPPER = {**dict.fromkeys(("evidence.n_boot", "evidence.n_null", "evidence.n_perm", "dynamics.n_boot",
                          "dynamics.n_null", "dynamics.n_splits", "random_init.n_perm", "correspondence.n_null",
                          "localisers.n_boot", "localisers.n_null"),
                         MAX_RESAMPLES), "evidence.n_blocks": 256, "moefication.n_seeds": 100}


class ParamsError(ValueError):
    """A parameter set that cannot run; the message names the key and what is allowed. A message is cut to
    MAX_MESSAGE characters: one line, whatever value it quotes."""

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE - 40]}... ({len(message) - MAX_MESSAGE + 40} more characters)"
        super().__init__(message)


MAX_MESSAGE = 600
_SHORT = reprlib.Repr()        # a bounded repr: never walks or prints more than a few items of a huge value
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 80, 80, 3, 8, 8


def show(value) -> str:
    """`value` as an error message quotes it: its repr, at most about 200 characters."""
    text = _SHORT.repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def load_params(path=None, overrides: dict | None = None) -> dict:
    """DEFAULTS, overridden by the YAML file at `path`, then by `overrides`; validated."""
    params = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"parameter file {str(path)!r} does not exist; the sets shipped are in params/")
        loaded = read_yaml(path)
        if loaded is None:
            raise ParamsError(f"{path} is empty: write the keys to change (e.g. run_name: mine); "
                              f"params/default.yaml is the full default set")
        if not isinstance(loaded, dict):
            raise ParamsError(f"{path} must hold a mapping of keys to values, not {type(loaded).__name__}")
        _merge(params, loaded, "")
        params["params_file"] = str(path)
    if overrides:
        _merge(params, overrides, "")
    _resolve_paths(params)
    validate(params)
    return params


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path):
    """The YAML document in `path`; a ParamsError naming the file and line when it is not valid UTF-8 YAML."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ParamsError(f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file "
                          f"as UTF-8") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, path)    # before building the values: aliases may repeat them a billion times
        return loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise ParamsError(f"{path}: the YAML is nested too deeply to be a parameter set") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ParamsError(f"{path}{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()


MAX_YAML_SIZE = 1_000_000     # values plus characters, aliases expanded: a parameter set needs a few thousand


def _check_expansion(root, path: Path) -> None:
    """Refuse a YAML document whose aliases (*name) expand it beyond MAX_YAML_SIZE (a "billion laughs" file of
    a few hundred bytes expands to gigabytes as soon as anything prints it) or into itself. Each node's
    expanded size is counted once (memo), so this costs one pass over the nodes as written."""
    sizes: dict[int, int | None] = {}

    def size(node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise ParamsError(f"{path}, line {node.start_mark.line + 1}: an alias (*name) refers to a value "
                                  f"that contains it; write the value out")
            return sizes[id(node)]
        sizes[id(node)] = None
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        else:
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        if total > MAX_YAML_SIZE:
            raise ParamsError(f"{path}, line {node.start_mark.line + 1}: with its aliases (*name) expanded, this "
                              f"value is larger than {MAX_YAML_SIZE:,} values and characters; a parameter set is "
                              f"far smaller: write the values out instead of repeating anchors")
        sizes[id(node)] = total
        return total

    size(root)


def _merge(into: dict, new: dict, prefix: str) -> None:
    for key, value in new.items():
        name = f"{prefix}{key}"
        if key == "params_file" and not prefix:
            into[key] = value
            continue
        if key not in into:
            known = ", ".join(sorted(k for k in into if k != "params_file"))
            raise ParamsError(f"unknown parameter {name!r}; known keys here: {known}")
        default = _default_at(name)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ParamsError(f"parameter {name!r} must be a mapping (of {', '.join(default)}), got {show(value)}")
            _merge(into[key], value, name + ".")
        else:
            into[key] = _typed(name, default, value)


def _default_at(name: str):
    node = DEFAULTS
    for part in name.split("."):
        node = node[part]
    return node


def _typed(name: str, default, value):
    if value is None:
        return value
    if default is None:
        kind = NULLABLE.get(name)
        ok = kind is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            what = {str: "a path (string)", int: "a whole number", bool: "true or false", list: "a list"}[kind]
            raise ParamsError(f"parameter {name!r} must be {what} or null, got {show(value)}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ParamsError(f"parameter {name!r} must be true or false, got {show(value)}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"parameter {name!r} must be a number, got {show(value)}")
        if not math.isfinite(value):
            raise ParamsError(f"parameter {name!r} must be a finite number, got {show(value)}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"parameter {name!r} must be a whole number, got {show(value)}")
        return value
    if isinstance(default, list):
        if name == "lm.tasks" and isinstance(value, dict):     # {task: spec}: checked in validate
            return value
        if not isinstance(value, list):
            raise ParamsError(f"parameter {name!r} must be a list, got {show(value)}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        # tasks may be a list (text) or a mapping / keyword (images)
        if name == "vit.tasks" and isinstance(value, dict):
            return value
        raise ParamsError(f"parameter {name!r} must be a string, got {show(value)}")
    return value


def _get(params: dict, name: str):
    node = params
    for part in name.split("."):
        node = node[part]
    return node


def validate(params: dict) -> None:
    run_name = params["run_name"]
    if not RUN_NAME.fullmatch(run_name) or ".." in run_name:
        raise ParamsError(f"parameter 'run_name' is {run_name!r}: it names the run folder under outputs/, so use "
                          f"letters, digits and - _ . only (e.g. my-run_2)")
    if not 0 <= params["seed"] <= MAX_SEED:
        raise ParamsError(f"parameter 'seed' must be a whole number >= 0 and at most {MAX_SEED} (the range every "
                          f"random generator here takes), got {show(params['seed'])}")
    for name in ("random_init.seeds", "pruning.random_seeds", "localisers.random_seeds"):
        seeds = _get(params, name)
        if (not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise ParamsError(f"parameter {name!r} must be a non-empty list of distinct whole numbers >= 0 and at "
                              f"most {MAX_SEED}, got {show(seeds)}")
    for name, choices in CHOICES.items():
        value = _get(params, name)
        if choices is not None and value not in choices:
            raise ParamsError(f"parameter {name!r} is {show(value)}; choose one of "
                              f"{', '.join('null' if c is None else c for c in choices)}")
    device = params["device"]
    if not (device in ("auto", "cpu", "cuda", "sharded") or str(device).startswith("cuda:")):
        raise ParamsError(f"parameter 'device' is {device!r}; use auto, cpu, cuda, cuda:N or sharded (a model "
                          f"larger than one GPU, spread over the GPUs and CPU by accelerate)")
    for name in FRACTIONS:
        value = _get(params, name)
        if not 0.0 < value < 1.0:
            raise ParamsError(f"parameter {name!r} must be strictly between 0 and 1, got {value}")
    for name in FRACTION_LISTS:
        values = _get(params, name)
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0]
        if bad or not values:
            raise ParamsError(f"parameter {name!r} must be a non-empty list of fractions in (0, 1], got {values}")
    for name in POSITIVE:
        value = _get(params, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParamsError(f"parameter {name!r} must be a whole number of at least 1, got {show(value)}")
    if params["lm"]["ctx"] < 2:
        raise ParamsError(f"parameter 'lm.ctx' must be at least 2 (a window needs a token and its next token), "
                          f"got {params['lm']['ctx']}")
    skip, ctx = params["lm"]["skip_positions"], params["lm"]["ctx"]
    if (any(isinstance(q, bool) or not isinstance(q, int) or not 0 <= q < ctx for q in skip)
            or len(set(skip)) != len(skip) or len(skip) >= ctx):
        raise ParamsError(f"parameter 'lm.skip_positions' must be a list of distinct positions 0 .. lm.ctx - 1 = "
                          f"{ctx - 1} that leaves some counted (e.g. [0], or [] to count every token), got "
                          f"{show(skip)}")
    # a neuron silent on the retain tasks has I(R) = 0: with eps 0 its score I(F) / (I(R) + eps) is 0/0 = NaN
    if params["pruning"]["eps"] <= 0:
        raise ParamsError(f"parameter 'pruning.eps' must be > 0 (it keeps the score I(F) / (I(R) + eps) finite for "
                          f"neurons silent on the retain tasks), e.g. 1e-3; got {params['pruning']['eps']}")
    eps_relative = params["pruning"]["eps_relative"]
    if eps_relative is not None and (isinstance(eps_relative, bool) or not isinstance(eps_relative, (int, float))
                                     or eps_relative <= 0):
        raise ParamsError(f"parameter 'pruning.eps_relative' must be null (use the absolute 'pruning.eps') or a "
                          f"number > 0 (a fraction of each layer's median importance, e.g. 0.01), got "
                          f"{show(eps_relative)}")
    if params["vit"]["training"]["lr"] <= 0:
        raise ParamsError(f"parameter 'vit.training.lr' must be > 0, e.g. 2e-3; got {params['vit']['training']['lr']}")
    if eps_relative is not None:
        params["pruning"]["eps_relative"] = float(eps_relative)
    unknown = [n for n in params["notebooks"] if str(n) not in NOTEBOOKS]
    if unknown:
        raise ParamsError(f"parameter 'notebooks' names {unknown}; available: {', '.join(NOTEBOOKS)}")
    params["notebooks"] = [str(n) for n in params["notebooks"]]
    tasks = params["lm"]["tasks"]
    if isinstance(tasks, dict):
        _check_task_names("lm.tasks", list(tasks))
        if len(tasks) < 2:
            raise ParamsError(f"parameter 'lm.tasks' must name at least two tasks, got {show(list(tasks))}")
        own = {name: _check_text_spec(name, spec, base_dir(params), params["lm"]["eval_frac"])
               for name, spec in tasks.items() if spec is not None}
        _check_disjoint(tasks, own, params["lm"]["source"])
        tasks = [t for t, spec in tasks.items() if spec is None]      # the domains of lm.source, checked below
    elif not isinstance(tasks, list) or len(tasks) < 2:
        raise ParamsError(f"parameter 'lm.tasks' must list at least two tasks by name, got {show(tasks)}")
    else:
        _check_task_names("lm.tasks", tasks)
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise ParamsError(f"parameter 'lm.tasks' names {repeated} more than once; list each task once")
    if params["lm"]["source"] == "embedded":
        unknown = [t for t in tasks if t not in EMBEDDED_TEXT_DOMAINS]
        if unknown:
            raise ParamsError(f"parameter 'lm.tasks' names unknown tasks {unknown}; embedded domains are "
                              f"{', '.join(EMBEDDED_TEXT_DOMAINS)}")
        _check_split(tasks, params["lm"]["eval_frac"])
    else:
        unknown = [t for t in tasks if t not in PAPER_TEXT_DOMAINS]
        if unknown:
            raise ParamsError(f"parameter 'lm.tasks' names unknown tasks {unknown}; paper domains are "
                              f"{', '.join(PAPER_TEXT_DOMAINS)}")
    _check_vit_tasks(params["vit"])
    n_classes = {"fashion-mnist": 10, "cifar100": 100}.get(params["vit"]["dataset"])    # cifar100: the fine classes
    if params["vit"]["dataset"] == "image-folder":
        n_classes = _check_image_folder(params["vit"], base_dir(params))
    _check_eval_images(params, n_classes)
    for key in ("n_boot", "n_null", "n_perm"):
        # a p-value of (1 + #) / (1 + n) or a 95% percentile interval needs at least ~20 resamples to go below 0.05
        if params["evidence"][key] < 20:
            raise ParamsError(f"parameter 'evidence.{key}' is {params['evidence'][key]}; use at least 20 (200 or more "
                              f"for stable 95% intervals), or no p-value can fall below 0.05")
    for key in ("n_boot", "n_null"):
        if params["dynamics"][key] < 20:
            raise ParamsError(f"parameter 'dynamics.{key}' is {params['dynamics'][key]}; use at least 20, or no "
                              f"interval or p-value at a checkpoint means anything")
    for name, most in UPPER.items():
        if _get(params, name) > most:
            raise ParamsError(f"parameter {name!r} is {_get(params, name)}; use at most {most} (memory and time grow "
                              f"with it; the default is {_get(DEFAULTS, name)})")
    if params["vit"]["training"]["checkpoints"] < 3:
        raise ParamsError(f"parameter 'vit.training.checkpoints' is {params['vit']['training']['checkpoints']}; use "
                          f"at least 3 (the initialisation, the end and one between; notebook 06 wants 8 or more)")
    revisions = params["lm"]["revisions"]
    if revisions is not None and (len(revisions) < 2 or not all(isinstance(r, str) and r for r in revisions)
                                  or len(set(revisions)) != len(revisions)):
        raise ParamsError(f"parameter 'lm.revisions' must be null or a list of at least two distinct revision names "
                          f"or model folders (oldest first, the final model last), got {revisions!r}")
    allowed = LOCALISER_METHODS
    for key in ("methods", "lm_methods"):
        methods = params["localisers"][key]
        if (key == "methods" or methods is not None) and (
                not methods or any(m not in allowed for m in methods) or len(set(methods)) != len(methods)):
            raise ParamsError(f"parameter 'localisers.{key}' must list distinct localisers of {', '.join(allowed)}"
                              f"{' (or be null: methods)' if key == 'lm_methods' else ''}, got {show(methods)}")
    lm_tasks = params["localisers"]["lm_tasks"]
    if lm_tasks is not None and (isinstance(lm_tasks, bool) or not isinstance(lm_tasks, int) or lm_tasks < 2):
        raise ParamsError(f"parameter 'localisers.lm_tasks' must be a whole number >= 2 (that many of lm.tasks) or "
                          f"null (all of them), got {show(lm_tasks)}")
    for key in ("attribution_tokens", "attribution_images", "eval_tokens", "eval_images"):
        value = params["localisers"][key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ParamsError(f"parameter 'localisers.{key}' must be a whole number >= 1 (per task) or null (the "
                              f"statistics budget), got {show(value)}")
    if params["evidence"]["n_null_ablation"] > params["evidence"]["n_null"]:
        raise ParamsError("parameter 'evidence.n_null_ablation' cannot exceed 'evidence.n_null' (the ablated "
                          "replicates are some of the null's partitions)")
    n_init, refine = params["moefication"]["n_init"], params["moefication"]["refine"]
    if n_init is not None and (isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1):
        raise ParamsError(f"parameter 'moefication.n_init' must be a whole number >= 1 or null (auto), got {n_init!r}")
    max_degree = params["moefication"]["max_degree"]
    if max_degree is not None and (isinstance(max_degree, bool) or not isinstance(max_degree, int) or max_degree < 1):
        raise ParamsError(f"parameter 'moefication.max_degree' must be a whole number >= 1 or null, got {max_degree!r}")
    if refine is not None and not isinstance(refine, bool):
        raise ParamsError(f"parameter 'moefication.refine' must be true, false or null (auto), got {refine!r}")
    mo = params["moefication"]
    if mo["claim_frac"] is not None and mo["claim_frac"] not in [f for f in mo["keep_fracs"] if f < 1]:
        raise ParamsError(f"parameter 'moefication.claim_frac' ({mo['claim_frac']}) must be one of "
                          f"moefication.keep_fracs below 1 ({show(mo['keep_fracs'])}), or null for their mean")
    if not isinstance(mo["reseed_param"], list) or any(k not in ("lm", "vit") for k in mo["reseed_param"]):
        raise ParamsError(f"parameter 'moefication.reseed_param' must list model kinds (lm, vit), got "
                          f"{show(mo['reseed_param'])}")
    for key in ("lm_experts", "vit_experts"):
        if params["moefication"][key] < 1:
            raise ParamsError(f"parameter 'moefication.{key}' must be at least 1")


def _check_split(tasks: list, eval_frac: float) -> None:
    """Every embedded domain keeps documents on both sides of its statistics / evaluation split. Up to
    eval_frac 0.5 any domain of two or more documents does, so the domains (~2 s to read) are read only above."""
    from .data import embedded_text_domain, split_sizes
    if eval_frac <= 0.5:
        return
    for name in tasks:
        n_docs = len(set(embedded_text_domain(name)))
        n_collect, n_eval = split_sizes(n_docs, eval_frac)
        if n_collect < 1:
            raise ParamsError(f"parameter 'lm.eval_frac' is {eval_frac}: domain {name!r} has {n_docs} documents, so "
                              f"none would be left for statistics; use a smaller eval_frac (e.g. 0.3)")


TEXT_SPECS = {"files": ("files",), "dataset": ("dataset", "split", "text_column", "where", "max_docs")}
TEXT_SPEC_HELP = ("null (the domain of that name), {files: [glob, ...]} or {dataset: hub id or save_to_disk folder, "
                  "split: train, text_column: text, where: {column: value}}")


def base_dir(params: dict) -> Path:
    """The folder relative paths are read from: the params file's, else the current one."""
    return Path(params["params_file"]).resolve().parent if params.get("params_file") else Path.cwd()


FOLDERS = ("cache_dir", "lm.data_dir", "vit.data_dir", "paper_scores.dir")     # always paths
MODELS = ("lm.model", "vit.model", "lm.moe_model")          # paths or names (a hub id, smollm2-135m, timm:NAME)


def _resolve_paths(params: dict) -> None:
    """Make every relative path parameter absolute, read from base_dir: the notebooks run in notebooks/ and
    the runner wherever it was started, and both must mean the same folders. A model (or an lm.revisions
    entry) is a path when it looks like one (./, ../, ~, /, a .gguf file, deeper than org/name) or exists there;
    otherwise it stays a name (a hub id, a hub revision)."""
    root = base_dir(params)

    def absolute(value: str) -> str:
        return os.path.normpath(root / Path(value).expanduser())     # an absolute value stays as it is

    def names_path(value: str) -> bool:
        return (value.startswith(("./", "../", "~", ".\\")) or Path(value).is_absolute() or value.count("/") > 1
                or value.endswith(".gguf") or (root / value).exists())

    for name in FOLDERS + MODELS:
        section, _, key = name.rpartition(".")
        node = params[section] if section else params
        value = node[key]
        if isinstance(value, str) and value and (name in FOLDERS or names_path(value)):
            node[key] = absolute(value)
    revisions = params["lm"]["revisions"]
    if isinstance(revisions, list):
        params["lm"]["revisions"] = [absolute(r) if isinstance(r, str) and r and names_path(r) else r
                                     for r in revisions]


def task_sources(params: dict) -> list[str]:
    """For `check`: the files and folders each own task reads (lm.tasks files and dataset folders, an image
    folder), with a warning for those outside the project and the params folder: a glob reads any file the
    user can read, and what a task reads is quoted in the run's neuron pages and named in tasks.json."""
    root = base_dir(params)
    allowed = (root, Path(__file__).resolve().parent.parent)

    def inside(path: Path) -> bool:
        real = path.resolve()             # a symlink counts where it points
        return any(real == folder or folder in real.parents for folder in allowed)

    sources = {}
    tasks = params["lm"]["tasks"]
    for name, spec in (tasks.items() if isinstance(tasks, dict) else ()):
        if spec is not None and "files" in spec:
            docs, _ = task_documents(name, spec, root=root)
            sources[f"lm.tasks.{name}"] = [Path(os.path.normpath(root / d.id)) for d in docs]
        elif spec is not None and dataset_folder(spec["dataset"], root) is not None:
            sources[f"lm.tasks.{name}"] = [Path(os.path.normpath(dataset_folder(spec["dataset"], root)))]
    if params["vit"]["dataset"] == "image-folder":
        sources["vit.data_dir"] = [Path(params["vit"]["data_dir"])]

    def listed(paths: list) -> str:
        return ", ".join(map(str, paths[:5])) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    lines = []
    for key, paths in sources.items():
        lines.append(f"{key} reads {listed(paths)}")
        outside = [p for p in paths if not inside(p)]
        if outside:
            lines.append(f"warning: {key} reads {len(outside)} path(s) outside the project ({allowed[1]}) and the "
                         f"params folder ({root}): {listed(outside)}; their contents are quoted in the run's neuron "
                         f"pages (neurons/*.html) and their paths in tasks.json, so make sure they may be shown")
    return lines


def _check_disjoint(tasks: dict, own: dict, source: str) -> None:
    """No document in two tasks (data.disjoint_tasks): the own tasks read, with the embedded domains beside them."""
    from .data import disjoint_tasks, embedded_documents
    docs = {t: own[t] if spec is not None else embedded_documents(t) for t, spec in tasks.items()
            if own.get(t) is not None or (spec is None and source == "embedded" and t in EMBEDDED_TEXT_DOMAINS)}
    try:
        disjoint_tasks(docs, own=set(own))
    except ValueError as err:
        raise ParamsError(f"parameter 'lm.tasks': {err}") from None


def _check_text_spec(name: str, spec, root: Path, eval_frac: float) -> list | None:
    """One own text task: its keys and their types, then its documents (files read, a local dataset opened;
    a hub id is only opened by the run), at least two distinct ones with some for statistics; returns them
    (None for a hub id)."""
    key = f"lm.tasks.{name}"
    kinds = [k for k in TEXT_SPECS if k in spec] if isinstance(spec, dict) else []
    if len(kinds) != 1:
        raise ParamsError(f"parameter {key!r} must be {TEXT_SPEC_HELP}; got {show(spec)}")
    unknown = sorted(set(spec) - set(TEXT_SPECS[kinds[0]]))
    if unknown:
        raise ParamsError(f"parameter {key!r} has unknown keys {unknown}; a {kinds[0]} task takes "
                          f"{', '.join(TEXT_SPECS[kinds[0]])}")
    files = spec.get("files")
    if kinds[0] == "files" and not (isinstance(files, str) or (isinstance(files, list) and files and
                                                               all(isinstance(f, str) for f in files))):
        raise ParamsError(f"parameter '{key}.files' must be a glob or a non-empty list of globs, got {show(files)}")
    for option in ("dataset", "split", "text_column"):
        if option in spec and not isinstance(spec[option], str):
            raise ParamsError(f"parameter '{key}.{option}' must be a string, got {spec[option]!r}")
    where = spec.get("where")
    scalar = (str, int, float, bool)
    if where is not None and not (isinstance(where, dict) and all(
            isinstance(k, str) and (isinstance(v, scalar) or (isinstance(v, list) and v and
                                                              all(isinstance(x, scalar) for x in v)))
            for k, v in where.items())):
        raise ParamsError(f"parameter '{key}.where' must map column names to a value or a list of values, "
                          f"got {where!r}")
    max_docs = spec.get("max_docs")
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise ParamsError(f"parameter '{key}.max_docs' must be a whole number >= 1, got {max_docs!r}")
    if kinds[0] == "dataset" and dataset_folder(spec["dataset"], root) is None:
        return              # a hub id: opening it needs the network, so the run reports what is missing
    try:
        docs, _ = task_documents(name, spec, root=root)
    except ValueError as err:
        raise ParamsError(f"parameter {key!r}: {err}") from None
    n_docs = len({d.text for d in docs})
    if split_sizes(n_docs, eval_frac)[0] < 1 or n_docs < 2:
        raise ParamsError(f"parameter {key!r}: the task has {n_docs} distinct document(s), too few to split into "
                          f"statistics and evaluation documents at eval_frac {eval_frac}: give more "
                          f"{'files' if kinds[0] == 'files' else 'rows'}")
    return docs


def _check_task_names(key: str, names: list) -> None:
    """Task names are strings. YAML 1.1 reads an unquoted on/off/yes/no/true/false as a boolean and 1 as a
    number, which would reach the run as True or 1 (and fail late, e.g. when the neuron pages are named)."""
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise ParamsError(f"parameter {key!r} has task names {show(odd)} that YAML read as "
                          f"{' and '.join(sorted({type(n).__name__ for n in odd}))}: quote them (e.g. 'on':, '1':)")
    if any(not n.strip() for n in names):
        raise ParamsError(f"parameter {key!r} has an empty task name; give every task a name")


def _check_vit_tasks(vit: dict) -> None:
    tasks = vit["tasks"]
    if isinstance(tasks, str):
        if tasks not in ("classes", "groups"):
            raise ParamsError(f"parameter 'vit.tasks' is {show(tasks)}; use classes, groups or a mapping "
                              f"of task -> list of class names")
        if tasks == "groups" and vit["dataset"] not in ("fashion-mnist", "cifar100"):
            raise ParamsError("parameter 'vit.tasks' is 'groups', which is defined for fashion-mnist (its natural "
                              "groups) and cifar100 (its 20 superclasses) only; use classes or a mapping of task -> "
                              "list of class names")
        return
    _check_task_names("vit.tasks", list(tasks))
    if not tasks or not all(isinstance(v, list) and v and all(isinstance(c, str) for c in v) for v in tasks.values()):
        raise ParamsError(f"parameter 'vit.tasks' must map each task to a non-empty list of class names, got {tasks!r}")
    from .data import shared_classes
    if shared_classes(tasks):
        raise ParamsError(f"parameter 'vit.tasks': {shared_classes(tasks)}")
    if vit["dataset"] == "fashion-mnist":
        from .data import FASHION_MNIST_CLASSES
        unknown = sorted({c for v in tasks.values() for c in v} - set(FASHION_MNIST_CLASSES))
        if unknown:
            raise ParamsError(f"parameter 'vit.tasks' names unknown classes {unknown}; Fashion-MNIST's classes are "
                              f"{', '.join(FASHION_MNIST_CLASSES)}")


def _check_image_folder(vit: dict, root: Path) -> int:
    """An image folder's layout (image_folder_files), and the classes vit.tasks names; returns its number of classes."""
    if vit["data_dir"] is None:
        raise ParamsError("parameter 'vit.dataset' is 'image-folder', so 'vit.data_dir' must name the folder "
                          "(train/<class>/<image> and test/<class>/<image>, or <class>/<image>)")
    try:
        files = image_folder_files(root / vit["data_dir"])
    except ValueError as err:
        raise ParamsError(f"parameter 'vit.data_dir': {err}") from None
    classes = sorted(files.get("train") or files["all"])
    tasks = vit["tasks"]
    if isinstance(tasks, dict):
        unknown = sorted({c for v in tasks.values() for c in v} - set(classes))
        if unknown:
            raise ParamsError(f"parameter 'vit.tasks' names unknown classes {unknown}; the image folder's classes "
                              f"(its subfolders) are {', '.join(classes)}")
    elif tasks == "classes" and len(classes) < 2:
        raise ParamsError(f"parameter 'vit.data_dir': the image folder has {len(classes)} class; tasks are its "
                          f"classes, so it needs at least two class subfolders")
    return len(classes)


MIN_EVAL_IMAGES_PER_CLASS = 5     # the test split's first eval_images images are shared by all its classes


def _check_eval_images(params: dict, n_classes: int) -> None:
    """Enough test images for every class to have some: an accuracy over none is undefined (it read as 0.0)."""
    used = [("vit.eval_images", params["vit"]["eval_images"])]
    if "06" in params["notebooks"]:            # only notebook 06 reads dynamics.eval_images
        used.append(("dynamics.eval_images", min(params["dynamics"]["eval_images"], params["vit"]["eval_images"])))
    for key, n in used:
        if n < MIN_EVAL_IMAGES_PER_CLASS * n_classes:
            raise ParamsError(f"parameter {key!r} is {n}: the test split has {n_classes} classes, so use at least "
                              f"{MIN_EVAL_IMAGES_PER_CLASS * n_classes} ({MIN_EVAL_IMAGES_PER_CLASS} per class)")


def dtype_of(params: dict, kind: str) -> str:
    """The dtype a section's model runs in: `<kind>.dtype`, else the top-level dtype; "auto" resolved for the
    params' device (bfloat16 where it is computed natively, e.g. 2-4x faster than float32 on a CPU with AMX)."""
    dtype = params[kind]["dtype"] or params["dtype"]
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bfloat16(device_of(params)) else "float32"


def native_bfloat16(device: str) -> bool:
    """Does `device` compute bfloat16 natively? A GPU that supports it, or a CPU with AMX tiles or AVX512-BF16
    (elsewhere bfloat16 is emulated on the CPU, slower than float32)."""
    if device.startswith("cuda") or device == "sharded":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")      # private: absent in some builds
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def device_of(params: dict) -> str:
    """Where the model goes; "sharded" means load_model(..., device_map="auto")."""
    if params["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return params["device"]
