"""Parameter sets (params/*.yaml), validated before any heavy work.

DEFAULTS is the schema: every key that exists, with its default value and therefore its type. A YAML
file overrides any part of it. An unknown key, a wrong type or an impossible value stops the run
with one error naming the key and what is allowed.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from .data import EMBEDDED_TEXT_DOMAINS, PAPER_TEXT_DOMAINS

NOTEBOOKS = {"01": "01_vit_pruning", "02": "02_mistral_pruning", "03": "03_moefication",
             "04": "04_random_init_control", "05": "05_layerwise_correspondence"}

DEFAULTS: dict = {
    "run_name": "default",
    "description": "",
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N | sharded (device_map="auto": over GPUs, then CPU)
    "dtype": "float32",          # float32 | bfloat16 | float16
    "notebooks": ["01", "02", "03", "04", "05"],
    "cache_dir": None,           # None: $MODSEP_CACHE or ~/.cache/modsep
    "lm": {
        "model": "smollm2-135m",
        "source": "embedded",    # embedded (local text domains) | hub (the paper's datasets)
        "data_dir": None,        # folder of save_to_disk copies for source: hub, offline
        "tasks": ["code", "docs", "licenses", "computers", "science", "medicine", "songs-poems", "law"],
        "stats_tokens": 2048,
        "eval_tokens": 512,
        "ctx": 128,
        "batch_size": 8,
        "eval_frac": 0.3,
        "skip_top": 0,
        "max_frac": 0.1,         # bisection upper bound (paper: 0.128 for Mistral)
    },
    "vit": {
        "model": "fmnist-vit",
        # only for fmnist-vit (trained here): see modsep_nb/vit_training.py
        "training": {"epochs": 2, "n_train": None, "hidden_size": 64, "num_hidden_layers": 6,
                     "intermediate_size": 256, "patch_size": 4, "lr": 2e-3},
        "dataset": "fashion-mnist",   # fashion-mnist | cifar100
        "data_dir": None,
        "tasks": "classes",      # classes | groups
        "stats_images": 500,     # per task, from the train split
        "eval_images": 2000,     # from the test split (all tasks together)
        "batch_size": 128,
        "cls_only": False,
        "max_frac": 0.05,        # bisection upper bound (paper: 0.05 for ViT)
    },
    "pruning": {
        "importance": "abs",
        "eps": 1e-3,
        "retain": "rest",
        "mode": "global",
        "ablation": "zero",
        "frac": 0.02,
        "target": 0.8,
        "tol": 0.03,
        "max_steps": 8,
    },
    "overlap": {
        "frac": 0.01,
        "sweep": [0.005, 0.01, 0.02, 0.05, 0.1, 0.2],
        "metric_modes": ["global", "per_layer"],
    },
    "moefication": {
        "lm_experts": 48,
        "vit_experts": 8,
        "n_init": None,          # k-means restarts; None: balanced_kmeans's "auto" (4, or 1 for a large layer)
        "refine": None,          # swap refinement of the best restart; None: "auto" (on, except for a large layer)
        "coactivation_tokens": 1024,
        "max_degree": None,      # co-activation graph: keep each neuron's heaviest edges (needed at Mistral scale)
        "keep_fracs": [0.125, 0.25, 0.5, 1.0],
        "eval_tasks": 3,
    },
    "random_init": {
        "seeds": [1, 2, 3],
        "stats_tokens": None,    # None: the trained model's budget (same data, same budget); a number only on purpose
        "stats_images": None,
        "fracs": [0.01, 0.02, 0.05],   # fractions compared in notebook 04 (figures and findings use the largest)
        "n_perm": 1000,          # permutations of the pattern-persistence test
    },
    "correspondence": {
        "fracs": [0.01, 0.02, 0.05, 0.1, 0.2],
        "n_null": 100,
        "band_sd": 2.0,          # figures: the null band is mean ± band_sd × sd of the random partitions
        "z_clear": 2.0,          # findings: mean z above this reads "clearly more", above z_some "somewhat more"
        "z_some": 0.5,
    },
    "evidence": {                # intervals, nulls and tests (SPEC §5 Evidence); resamples reuse collected sums
        "n_boot": 200,           # bootstrap resamples over documents (images)
        "n_blocks": 32,          # statistics kept per block of documents, per task
        "n_null": 200,           # pseudo-task partitions of one domain (the pipeline's own null)
        "n_null_ablation": 20,   # of those, how many also go through the cross-task ablation (forward passes)
        "n_perm": 1000,          # label permutations (related vs unrelated tasks)
    },
    "paper_scores": {
        "dir": None,             # None: ../shared/paper_scores if present, else $MODSEP_PAPER_SCORES
        "frac": 0.01,
    },
}

CHOICES = {
    "device": None,   # checked by _check_device
    "dtype": ("float32", "bfloat16", "float16"),
    "lm.source": ("embedded", "hub"),
    "vit.dataset": ("fashion-mnist", "cifar100"),
    "pruning.importance": ("abs", "rms", "std", "freq", "sqrt"),
    "pruning.retain": ("rest", "general"),
    "pruning.mode": ("global", "per_layer"),
    "pruning.ablation": ("zero", "mean"),
}
FRACTIONS = ("pruning.frac", "pruning.target", "overlap.frac", "lm.eval_frac", "lm.max_frac", "vit.max_frac",
             "paper_scores.frac", "pruning.tol")
FRACTION_LISTS = ("overlap.sweep", "correspondence.fracs", "moefication.keep_fracs", "random_init.fracs")
POSITIVE = ("lm.stats_tokens", "lm.eval_tokens", "lm.ctx", "lm.batch_size", "vit.stats_images", "vit.eval_images",
            "vit.batch_size", "moefication.lm_experts", "moefication.vit_experts",
            "moefication.coactivation_tokens", "moefication.eval_tasks", "random_init.stats_tokens",
            "random_init.stats_images", "random_init.n_perm", "correspondence.n_null", "pruning.max_steps",
            "vit.training.epochs", "evidence.n_boot", "evidence.n_blocks", "evidence.n_null",
            "evidence.n_null_ablation", "evidence.n_perm")
OPTIONAL = ("random_init.stats_tokens", "random_init.stats_images")     # None: the trained model's value


class ParamsError(ValueError):
    """A parameter set that cannot run; the message names the key and what is allowed."""


def load_params(path=None, overrides: dict | None = None) -> dict:
    """DEFAULTS, overridden by the YAML file at `path`, then by `overrides`; validated."""
    params = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamsError(f"parameter file {str(path)!r} does not exist; the sets shipped are in params/")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ParamsError(f"{path} must hold a mapping of keys to values, not {type(loaded).__name__}")
        _merge(params, loaded, "")
        params["params_file"] = str(path)
    if overrides:
        _merge(params, overrides, "")
    validate(params)
    return params


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
                raise ParamsError(f"parameter {name!r} must be a mapping (of {', '.join(default)}), got {value!r}")
            _merge(into[key], value, name + ".")
        else:
            into[key] = _typed(name, default, value)


def _default_at(name: str):
    node = DEFAULTS
    for part in name.split("."):
        node = node[part]
    return node


def _typed(name: str, default, value):
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ParamsError(f"parameter {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"parameter {name!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"parameter {name!r} must be a whole number, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ParamsError(f"parameter {name!r} must be a list, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        # tasks may be a list (text) or a mapping / keyword (images)
        if name == "vit.tasks" and isinstance(value, dict):
            return value
        raise ParamsError(f"parameter {name!r} must be a string, got {value!r}")
    return value


def _get(params: dict, name: str):
    node = params
    for part in name.split("."):
        node = node[part]
    return node


def validate(params: dict) -> None:
    for name, choices in CHOICES.items():
        value = _get(params, name)
        if choices is not None and value not in choices:
            raise ParamsError(f"parameter {name!r} is {value!r}; choose one of {', '.join(choices)}")
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
        bad = [v for v in values if not isinstance(v, (int, float)) or not 0.0 < v <= 1.0]
        if bad or not values:
            raise ParamsError(f"parameter {name!r} must be a non-empty list of fractions in (0, 1], got {values}")
    for name in POSITIVE:
        value = _get(params, name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParamsError(f"parameter {name!r} must be a whole number of at least 1, got {value!r}")
    if params["pruning"]["eps"] < 0:
        raise ParamsError(f"parameter 'pruning.eps' must be >= 0, got {params['pruning']['eps']}")
    unknown = [n for n in params["notebooks"] if str(n) not in NOTEBOOKS]
    if unknown:
        raise ParamsError(f"parameter 'notebooks' names {unknown}; available: {', '.join(NOTEBOOKS)}")
    params["notebooks"] = [str(n) for n in params["notebooks"]]
    tasks = params["lm"]["tasks"]
    if not isinstance(tasks, list) or len(tasks) < 2:
        raise ParamsError(f"parameter 'lm.tasks' must list at least two tasks, got {tasks!r}")
    if params["lm"]["source"] == "embedded":
        unknown = [t for t in tasks if t not in EMBEDDED_TEXT_DOMAINS]
        if unknown:
            raise ParamsError(f"parameter 'lm.tasks' names unknown tasks {unknown}; embedded domains are "
                              f"{', '.join(EMBEDDED_TEXT_DOMAINS)}")
    else:
        unknown = [t for t in tasks if t not in PAPER_TEXT_DOMAINS]
        if unknown:
            raise ParamsError(f"parameter 'lm.tasks' names unknown tasks {unknown}; paper domains are "
                              f"{', '.join(PAPER_TEXT_DOMAINS)}")
    vit_tasks = params["vit"]["tasks"]
    if isinstance(vit_tasks, str) and vit_tasks not in ("classes", "groups"):
        raise ParamsError(f"parameter 'vit.tasks' is {vit_tasks!r}; use classes, groups or a mapping "
                          f"of task -> list of class names")
    for key in ("n_boot", "n_null", "n_perm"):
        # a p-value of (1 + #) / (1 + n) or a 95% percentile interval needs at least ~20 resamples to go below 0.05
        if params["evidence"][key] < 20:
            raise ParamsError(f"parameter 'evidence.{key}' is {params['evidence'][key]}; use at least 20 (200 or more "
                              f"for stable 95% intervals), or no p-value can fall below 0.05")
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
    for key in ("lm_experts", "vit_experts"):
        if params["moefication"][key] < 1:
            raise ParamsError(f"parameter 'moefication.{key}' must be at least 1")


def device_of(params: dict) -> str:
    """Where the model goes; "sharded" means load_model(..., device_map="auto")."""
    if params["device"] == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return params["device"]
