"""A study: one model, its tasks, and what is derived from them (statistics cached on disk).

This is the glue the notebooks use so that none of them re-implements loading, caching or evaluation:
`Study.from_params(params, "lm")` or `"vit"`, then `.stats()`, `.scores()`, `.evaluate_tasks()`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as D
from .evaluation import evaluate, task_scores
from .files import atomic_file
from .models import ModelHandle, cache_dir, load_model
from .params import device_of
from .statistics import NeuronStats, collect_stats


# bump when the way statistics or splits are computed changes, so no cache from older code is reused
CACHE_VERSION = 1


def _hash(obj) -> str:
    h = hashlib.sha256()
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], str):
        for s in obj:
            h.update(s.encode("utf-8", "replace"))
            h.update(b"\0")
    elif isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached_stats(path: Path, compute, *, expect: dict | None = None) -> NeuronStats:
    """Load statistics from `path`, or compute and save them (atomically). A file that cannot be read,
    or whose recorded key differs, is recomputed with a warning, never used."""
    path = Path(path)
    if path.is_file():
        try:
            stats = NeuronStats.load(path)
            if expect is None or all(stats.meta.get(k) == v for k, v in expect.items()):
                return stats
            warnings.warn(f"cached statistics {path} were made with other settings; recomputing")
        except Exception as err:  # a truncated or corrupted file: never trust it
            warnings.warn(f"cached statistics {path} are unreadable ({type(err).__name__}: {err}); recomputing")
    stats = compute()
    stats.meta.update(expect or {})
    stats.save(path)
    return stats


@dataclass
class Study:
    handle: ModelHandle
    params: dict
    kind: str                      # "lm" | "vit"
    tasks: dict                    # lm: name -> TextTask; vit: name -> list of class names
    train: D.ImageDataset | None = None
    test: D.ImageDataset | None = None
    _stats: dict = field(default_factory=dict)
    _eval_cache: dict = field(default_factory=dict)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict, kind: str, *, random_seed: int | None = None,
                    handle: ModelHandle | None = None) -> "Study":
        """Load the model and tasks that `params[kind]` names. random_seed: a freshly initialised model of
        the same architecture (SPEC §6). A handle can be passed to reuse a loaded model."""
        if kind not in ("lm", "vit"):
            raise ValueError(f"kind must be 'lm' or 'vit', got {kind!r}")
        p = params[kind]
        device, dtype = device_of(params), params["dtype"]
        if handle is None:
            options = {}
            if p["model"] == "fmnist-vit":      # training settings apply to the model trained here only
                options = {k: v for k, v in p["training"].items() if v is not None}
                options["seed"] = params["seed"]
            placement = {"device_map": "auto"} if device == "sharded" else {"device": device}
            handle = load_model(p["model"], dtype=dtype, **placement, **options)
        if random_seed is not None:
            handle = load_model(handle.model, tokenizer=handle.tokenizer, processor=handle.processor,
                                random_init=True, seed=random_seed)
            handle.name = p["model"]
        if kind == "lm":
            tasks = D.text_tasks(p["tasks"], eval_frac=p["eval_frac"], seed=params["seed"], source=p["source"],
                                 data_dir=p["data_dir"])
            return cls(handle, params, kind, tasks)
        if p["dataset"] == "fashion-mnist":
            train, test = D.fashion_mnist("train"), D.fashion_mnist("test")
        else:
            train = D.cifar100("train", processor=handle.processor, local_dir=p["data_dir"])
            test = D.cifar100("test", processor=handle.processor, local_dir=p["data_dir"])
        test = D.ImageDataset(test.images[: p["eval_images"]], test.labels[: p["eval_images"]],
                              test.class_names, test.name)
        return cls(handle, params, kind, D.image_tasks(train, p["tasks"]), train, test)

    def with_random_init(self, seed: int) -> "Study":
        return Study.from_params(self.params, self.kind, random_seed=seed, handle=self.handle)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def label(self) -> str:
        return self.handle.label

    # -- statistics ----------------------------------------------------------------------------------
    def _task_data(self, name: str, budget: int):
        if self.kind == "lm":
            return self.tasks[name].collect
        return self.train.subset(self.tasks[name], max_images=budget)

    def stats(self, *, budget: int | None = None, progress: bool = True) -> dict[str, NeuronStats]:
        """Per-task statistics, computed once per (model, data, settings) and cached on disk."""
        p = self.params[self.kind]
        if budget is None:
            if self.handle.random_init:
                budget = self.params["random_init"]["stats_tokens" if self.kind == "lm" else "stats_images"]
            else:
                budget = p["stats_tokens" if self.kind == "lm" else "stats_images"]
        if budget in self._stats:
            return self._stats[budget]
        root = Path(self.params.get("cache_dir") or cache_dir()) / "stats"
        identity = self.handle.identity()
        result = {}
        for name in self.task_names:
            task_data = self._task_data(name, budget)
            key = {"version": CACHE_VERSION, "model": identity["fingerprint"], "model_label": self.handle.label, "task": name,
                   "data": _hash(task_data), "budget": budget, "ctx": p.get("ctx"),
                   "cls_only": p.get("cls_only", False), "dtype": self.params["dtype"]}
            path = root / f"{self.kind}-{_hash(key)}.safetensors"
            result[name] = cached_stats(path, lambda: collect_stats(
                self.handle, task_data, max_tokens=budget if self.kind == "lm" else None,
                batch_size=p["batch_size"], ctx=p.get("ctx", 256), cls_only=p.get("cls_only", False),
                task=name, progress=progress), expect={"cache_key": _hash(key)})
        self._stats[budget] = result
        return result

    def save_stats(self, out_dir) -> Path:
        """Write each task's statistics into out_dir/statistics/<kind>-<task>.safetensors (a run's record)."""
        folder = Path(out_dir) / "statistics"
        for name, st in self.stats(progress=False).items():
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
            st.save(folder / f"{self.kind}-{safe}{'-random-seed' + str(self.handle.seed) if self.handle.random_init else ''}.safetensors")
        return folder

    def scores(self, *, stats=None) -> dict[str, torch.Tensor]:
        pr = self.params["pruning"]
        return task_scores(stats or self.stats(), importance=pr["importance"], eps=pr["eps"], retain=pr["retain"])

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate_tasks(self, tasks=None) -> dict[str, float]:
        """Top-1 accuracy per task of the model as it is now (inside any active ablation)."""
        tasks = list(tasks or self.task_names)
        if self.kind == "lm":
            p = self.params["lm"]
            return {t: evaluate(self.handle, self.tasks[t].evaluate, max_tokens=p["eval_tokens"], ctx=p["ctx"],
                                batch_size=p["batch_size"], skip_top=p["skip_top"])["top1"] for t in tasks}
        result = evaluate(self.handle, self.test, batch_size=self.params["vit"]["batch_size"])
        per_class = result["per_class"]
        counts = {c: int((self.test.labels == i).sum()) for i, c in enumerate(self.test.class_names)}
        out = {}
        for t in tasks:
            classes = self.tasks[t]
            n = sum(counts[c] for c in classes)
            out[t] = sum(per_class.get(c, 0.0) * counts[c] for c in classes) / max(n, 1)
        return out

    def evaluators(self):
        """For cross_task_matrix: LM, task -> callable() -> top-1; images, one callable() -> {task: top-1}
        (one pass over the test images serves every task)."""
        if self.kind == "vit":
            return self.evaluate_tasks
        return {t: (lambda t=t: self.evaluate_tasks([t])[t]) for t in self.task_names}

    def describe(self) -> str:
        what = "tokens" if self.kind == "lm" else "images"
        p = self.params[self.kind]
        budget = p["stats_tokens"] if self.kind == "lm" else p["stats_images"]
        return (f"{self.label}: {self.handle.n_layers} layers x {self.handle.d_mlp} neurons; "
                f"{len(self.tasks)} tasks; statistics on {budget} {what} per task")

    # -- MoEfication ---------------------------------------------------------------------------------
    @property
    def n_experts(self) -> int:
        from .moefication import check_n_experts
        n = self.params["moefication"]["lm_experts" if self.kind == "lm" else "vit_experts"]
        check_n_experts(self.handle.d_mlp, n)
        return n

    def activation_sample(self, n_tokens: int | None = None) -> list[torch.Tensor]:
        """A bounded sample of activations per layer ([n_tokens, d_mlp]), drawn evenly from every task's
        statistics data (for the co-activation split)."""
        from .statistics import StatsCollector, run_batches
        n_tokens = n_tokens or self.params["moefication"]["coactivation_tokens"]
        per_task = max(1, n_tokens // len(self.tasks))
        p = self.params[self.kind]
        samples = None
        for name in self.task_names:
            with StatsCollector(self.handle, sample_tokens=per_task) as collector:
                data = self._task_data(name, per_task if self.kind == "lm" else max(1, per_task // 8))
                run_batches(self.handle, data, collector, max_tokens=per_task if self.kind == "lm" else None,
                            batch_size=p["batch_size"], ctx=p.get("ctx", 256), progress=False)
            layer_samples = [collector.sample(layer) for layer in range(self.handle.n_layers)]
            samples = layer_samples if samples is None else [torch.cat([a, b]) for a, b in zip(samples, layer_samples)]
        return samples

    def splits(self, method: str, *, progress: bool = True) -> torch.Tensor:
        """Expert labels [n_layers, d_mlp] by `method` ("param", "coactivation", "random"), cached on disk."""
        from .moefication import split_layers
        mo = self.params["moefication"]
        key = {"version": CACHE_VERSION, "model": self.handle.identity()["fingerprint"], "method": method, "n_experts": self.n_experts,
               "seed": self.params["seed"], "n_init": mo["n_init"], "refine": mo["refine"],
               "tokens": mo["coactivation_tokens"] if method == "coactivation" else None,
               "max_degree": mo["max_degree"] if method == "coactivation" else None,
               "tasks": self.task_names if method == "coactivation" else None}
        path = Path(self.params.get("cache_dir") or cache_dir()) / "splits" / f"{self.kind}-{_hash(key)}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception as err:
                warnings.warn(f"cached split {path} is unreadable ({type(err).__name__}); recomputing")
        names = {"param": ("n_init", "refine"), "coactivation": ("max_degree",)}.get(method, ())
        kwargs = {k: mo[k] for k in names if mo[k] is not None}
        acts = self.activation_sample() if method == "coactivation" else None
        labels = split_layers(self.handle, method, self.n_experts, seed=self.params["seed"], acts=acts,
                              progress=progress, **kwargs)
        with atomic_file(path) as tmp:
            torch.save(labels, tmp)
        return labels

    def routing_curve(self, labels: torch.Tensor, keep_fracs, tasks=None) -> dict:
        """Accuracy relative to the dense model, per task, when each token keeps only its top-k experts
        (k = keep_frac × n_experts; MoEfication's ground-truth routing)."""
        from .moefication import expert_routing
        tasks = list(tasks or self.task_names)
        dense = self.evaluate_tasks(tasks)
        curve = {}
        for frac in keep_fracs:
            k = max(1, int(round(frac * self.n_experts)))
            if k >= self.n_experts:
                curve[frac] = {t: 1.0 for t in tasks}
                continue
            with expert_routing(self.handle, labels, k):
                acc = self.evaluate_tasks(tasks)
            curve[frac] = {t: acc[t] / dense[t] if dense[t] > 0 else float("nan") for t in tasks}
        return curve
