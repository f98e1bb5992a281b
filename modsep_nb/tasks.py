"""Tasks, one seam per modality: what a task's statistics data are under a budget, and how a task's accuracy
is scored. `Study` (study.py) holds one of these and never asks which modality it has.

TextTasks: each task is a text domain split by document into statistics and evaluation parts (data.py);
the budget counts tokens; accuracy is next-token top-1 on the evaluation documents.
ImageTasks: each task is a class or a group of classes; statistics images come from the train split, the
budget counts images per task; accuracy is top-1 on the test split's images of the task's classes.
"""
from __future__ import annotations

import hashlib
import json
import math
from itertools import chain, zip_longest
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from . import data as D
from .evaluation import evaluate
from .modalities import IMAGE, TEXT
from .models import check_outputs
from .params import base_dir


def data_hash(obj) -> str:
    """A short content hash of a task's data (texts, a tensor) or of a JSON-able key."""
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


@runtime_checkable
class Tasks(Protocol):
    """What a Study asks of its tasks, whatever the modality (TextTasks, ImageTasks): the seam between them.
    A budget counts `unit` (tokens or images) per task; `section` is the params section the tasks come from.
    Each class also names its models' `modality` (modalities.TEXT, IMAGE); its class attributes, and the static
    methods plan.py asks (sample_read, batch_row, ...), need no tasks loaded."""
    unit: str                   # what a budget counts: "tokens" or "images"
    section: str                # the params section: "lm" or "vit"
    stats_key: str              # the params key of the statistics budget in that section (and in random_init)
    eval_key: str               # the params key of the evaluation budget in that section (and in localisers)
    experts_key: str            # the params key of MoEfication's number of experts (moefication section)

    @property
    def names(self) -> list[str]: ...
    def __getitem__(self, name: str): ...
    @property
    def groups(self) -> dict[str, list[str]] | None: ...
    def statistics_data(self, name: str, budget: int | None): ...
    def statistics_names(self, name: str, budget: int | None) -> list[str]: ...
    def labelled_data(self, name: str, budget: int | None): ...
    def general_data(self, seed: int, budget: int, used: int): ...
    def collect_options(self) -> dict: ...
    def check_model(self, handle) -> None: ...
    def sample_budget(self, n_tokens: int) -> int: ...
    def accuracy(self, handle, names=None) -> dict[str, float]: ...
    def document_hits(self, handle, names=None, *, scale: int = 1, budget: int | None = None) -> dict[str, dict]: ...
    def evaluators(self, handle): ...
    def describe(self) -> dict: ...
    def record(self, handle, budget: int) -> dict: ...
    def interleaved(self, per_task: int): ...


class TextTasks:
    """Text domains (docs/method.md §9). settings: the params' `lm` section. tokenizer: the model's, which turns a
    token budget into the documents it reads."""
    unit, section, stats_key, eval_key, experts_key = "tokens", "lm", "stats_tokens", "eval_tokens", "lm_experts"
    modality = TEXT

    def __init__(self, tasks: dict[str, D.TextTask], settings: dict, tokenizer=None):
        self.tasks, self.settings, self.tokenizer = tasks, settings, tokenizer

    @classmethod
    def from_params(cls, params: dict, processor=None, tokenizer=None) -> "TextTasks":
        p = params["lm"]
        return cls(D.text_tasks(p["tasks"], eval_frac=p["eval_frac"], seed=params["seed"], source=p["source"],
                                data_dir=p["data_dir"], root=base_dir(params)), p, tokenizer)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def __getitem__(self, name: str) -> D.TextTask:
        return self.tasks[name]

    @property
    def groups(self) -> dict[str, list[str]] | None:
        """Related domains for the `related_share_more` claim: the embedded domains' groups (data.EMBEDDED_TEXT_GROUPS)
        among this study's tasks; a task of one's own (lm.tasks maps it to a path) is in no group, whatever its name.
        None for text that is not the embedded source."""
        if self.settings.get("source") != "embedded":
            return None
        specs = self.settings.get("tasks") or {}
        specs = specs if isinstance(specs, dict) else dict.fromkeys(specs)
        return {g: [t for t in ts if t in specs and specs[t] is None] for g, ts in D.EMBEDDED_TEXT_GROUPS.items()}

    def statistics_data(self, name: str, budget: int | None) -> list[str]:
        """The task's statistics documents that `budget` tokens read (collect_stats' windows; None: all)."""
        return self._read(self.tasks[name].collect, budget)

    def statistics_names(self, name: str, budget: int | None) -> list[str]:
        """The name of each statistics document read, as tasks.json names it (file name, fortune id, topic)."""
        return list(self.tasks[name].collect_ids)[:len(self.statistics_data(name, budget))]

    def labelled_data(self, name: str, budget: int | None) -> list[str]:
        """The statistics data with what a loss needs (a text is its own target): statistics_data."""
        return self.statistics_data(name, budget)

    def general_data(self, seed: int, budget: int, used: int) -> list[str]:
        """The external general corpus (data.general_corpus) without any of the study's documents (so `used`, what
        each task's statistics read, is excluded whatever it is), in a seeded order, as far as `budget` tokens
        read: the retain set of `retain: general`."""
        study_texts = [text for task in self.tasks.values() for text in (*task.collect, *task.evaluate)]
        return self._read(D.general_corpus(seed, exclude=study_texts), budget)

    def _read(self, texts: list[str], budget: int | None) -> list[str]:
        """The first documents of `texts`, up to the last one a budget of `budget` tokens reads (the collector
        visits documents in order, so it reads the same windows from these as from all of them)."""
        if budget is None:
            return texts
        if self.tokenizer is None:
            raise ValueError("a token budget needs the model's tokenizer: build TextTasks with tokenizer=")
        used = D.used_documents(self.tokenizer, texts, ctx=self.settings["ctx"], max_tokens=budget)
        return texts[:max(used) + 1] if used else []

    def collect_options(self) -> dict:
        """Keyword arguments of collect_stats for this modality, besides the budget (positions: params
        lm.skip_positions, lm.equal_positions)."""
        p = self.settings
        return {"ctx": p["ctx"], "skip_positions": tuple(p.get("skip_positions", ())),
                "equal_positions": p.get("equal_positions", False)}

    def check_model(self, handle) -> None:
        """Any language model reads text: nothing to check."""

    def sample_budget(self, n_tokens: int) -> int:
        """Budget that yields about n_tokens activation rows (one row per token)."""
        return n_tokens

    @staticmethod
    def sample_read(n_tokens: int, n_tasks: int) -> int:
        """Tokens statistics.activation_sample reads for about n_tokens rows over n_tasks tasks: about n_tokens."""
        return n_tokens

    @staticmethod
    def batch_row(settings: dict) -> int:
        """Tokens in one batch row: a window of ctx."""
        return settings["ctx"]

    @staticmethod
    def evaluation_units(settings: dict, n_tasks: int) -> tuple[int, bool]:
        """(tokens one task's evaluation reads, exactly so): eval_tokens each."""
        return settings["eval_tokens"], True

    @staticmethod
    def checkpoints(params: dict) -> int:
        """How many training checkpoints notebook 06 follows: lm.revisions (none: 06 skips the LM)."""
        return len(params["lm"].get("revisions") or [])

    def accuracy(self, handle, names=None) -> dict[str, float]:
        """Next-token top-1 per task on its evaluation documents, for the model as it is now."""
        p = self.settings
        return {t: evaluate(handle, self.tasks[t].evaluate, max_tokens=p["eval_tokens"], ctx=p["ctx"],
                            batch_size=p["batch_size"], skip_top=p["skip_top"], task=t, top1_only=True)["top1"]
                for t in (names or self.names)}

    def document_hits(self, handle, names=None, *, scale: int = 1, budget: int | None = None) -> dict[str, dict]:
        """Per task {"n", "top1"}: counted targets and top-1 hits of each evaluation document read (`scale` ×
        the evaluation budget: the pseudo-task null reads one domain for all tasks; or `budget` tokens)."""
        p = self.settings
        tokens = budget or scale * p["eval_tokens"]
        return {t: evaluate(handle, self.tasks[t].evaluate, max_tokens=tokens, ctx=p["ctx"],
                            batch_size=p["batch_size"], skip_top=p["skip_top"], per_document=True, task=t,
                            top1_only=True)["documents"]
                for t in (names or self.names)}

    def evaluators(self, handle):
        """For cross_task_matrix: one callable per task (each task is its own evaluation pass), giving its
        per-document hits (so the result keeps them for intervals)."""
        return {t: (lambda t=t: self.document_hits(handle, [t])[t]) for t in self.names}

    def describe(self) -> dict:
        return {t: {"statistics documents": len(task.collect), "evaluation documents": len(task.evaluate)}
                for t, task in self.tasks.items()}

    def record(self, handle, budget: int) -> dict:
        """{task: {"source", "statistics": [doc ids], "evaluation": [doc ids]}}: exactly the documents whose
        tokens statistics (`budget` tokens) and evaluation read."""
        p = self.settings
        return D.tasks_record(self.tasks, handle.tokenizer, budget, p["eval_tokens"], p["ctx"])

    def interleaved(self, per_task: int) -> list[str]:
        """Every task's statistics documents, alternating between tasks (a pooled sample for fitting, read up to
        the number of tasks × per_task tokens in all). Not cut at per_task tokens per task: that would change the
        documents 03's router is fitted on (measured on the default params: 23 windows instead of 22)."""
        lists = [task.collect for task in self.tasks.values()]
        return [doc for doc in chain.from_iterable(zip_longest(*lists)) if doc is not None]


class ImageTasks:
    """Classes or groups of classes of an image dataset. settings: the params' `vit` section. seed: the params'
    seed, which draws each task's statistics images (a seeded sample, not the first in dataset order)."""
    unit, section, stats_key, eval_key, experts_key = "images", "vit", "stats_images", "eval_images", "vit_experts"
    modality = IMAGE

    def __init__(self, tasks: dict[str, list[str]], train: D.ImageDataset, test: D.ImageDataset, settings: dict,
                 seed: int = 0):
        self.tasks, self.train, self.test, self.settings, self.seed = tasks, train, test, settings, seed

    @classmethod
    def from_params(cls, params: dict, processor=None, image_shape=None, tokenizer=None) -> "ImageTasks":
        """image_shape (C, H, W): the size an image folder's images are resized to when there is no processor.
        tokenizer: unused (an image budget counts images), taken as TextTasks takes it."""
        p = params["vit"]
        if p["dataset"] == "fashion-mnist":
            train, test = D.fashion_mnist("train"), D.fashion_mnist("test")
        elif p["dataset"] == "image-folder":
            train, test = D.image_folder(base_dir(params) / p["data_dir"], seed=params["seed"],
                                         eval_frac=p["eval_frac"], processor=processor, image_shape=image_shape)
        else:
            train = D.cifar100("train", processor=processor, local_dir=p["data_dir"])
            test = D.cifar100("test", processor=processor, local_dir=p["data_dir"])
        n = p["eval_images"]
        test = D.ImageDataset(test.images[:n], test.labels[:n], test.class_names, test.name,
                              None if test.ids is None else test.ids[:n], test.groups)
        tasks = D.image_tasks(train, p["tasks"])
        for t, classes in tasks.items():     # an accuracy over no images is undefined, never 0
            if not bool(torch.isin(test.labels, torch.tensor([test.class_names.index(c) for c in classes])).any()):
                raise ValueError(f"task {t!r} has no test images among the first vit.eval_images = {n} of the test "
                                 f"split: raise vit.eval_images (or give its classes more test images)")
        return cls(tasks, train, test, p, seed=params["seed"])

    @property
    def groups(self) -> dict[str, list[str]] | None:
        """Related tasks for the `related_share_more` claim: the dataset's own groups of classes (Fashion-MNIST's
        natural groups, CIFAR-100's superclasses) when each task is one class; None otherwise."""
        groups = getattr(self.train, "groups", None)
        return dict(groups) if self.settings.get("tasks") == "classes" and groups else None

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def __getitem__(self, name: str) -> list[str]:
        return self.tasks[name]

    def statistics_data(self, name: str, budget: int | None) -> torch.Tensor:
        """Up to `budget` train images of the task's classes (None: all), a seeded sample (statistics_indices); the
        statistics' cache key hashes these images, so another seed or sample is another cache entry."""
        return self.train.images[torch.tensor(self.statistics_indices(name, budget), dtype=torch.long)]

    def labelled_data(self, name: str, budget: int | None) -> D.ImageDataset:
        """The statistics images (statistics_data's seeded sample) with their labels, which a loss needs."""
        index = torch.tensor(self.statistics_indices(name, budget), dtype=torch.long)
        t = self.train
        return D.ImageDataset(t.images[index], t.labels[index], t.class_names, t.name, None, None)

    def statistics_indices(self, name: str, budget: int | None) -> list[int]:
        """The train indices a task's statistics read, in dataset order: the first `budget` of a seeded permutation
        of its classes' images (seed and task name), so a smaller budget reads a subset of a larger one's."""
        indices = np.array(self._indices(self.train, self.tasks[name]), dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(data_hash(name), 16)])
        return sorted(indices[rng.permutation(len(indices))[:budget]].tolist())

    def statistics_names(self, name: str, budget: int | None) -> list[str]:
        """The name of each statistics image, as tasks.json names it ("train:i" or the dataset's id)."""
        return [self._id(self.train, "train", i) for i in self.statistics_indices(name, budget)]

    def general_data(self, seed: int, budget: int, used: int) -> torch.Tensor:
        """The general corpus of `retain: general` for images (no class is left out of the tasks to play the
        paper's ImageNet): `budget` train images of every class drawn at random (seeded), none of them among the
        `used` images of any task its statistics read (at any budget up to `used`); evaluation reads the test split."""
        taken = {i for t in self.tasks for i in self.statistics_indices(t, used)}
        free = np.array([i for i in range(len(self.train)) if i not in taken])
        if len(free) < budget:
            raise ValueError(f"the general corpus needs {budget} train images that no task's statistics read, but "
                             f"only {len(free)} are left: lower vit.stats_images")
        pick = np.sort(np.random.default_rng(seed).choice(free, size=budget, replace=False))
        return self.train.images[torch.from_numpy(pick)]

    def collect_options(self) -> dict:
        """Keyword arguments of collect_stats for this modality, besides the budget."""
        return {"cls_only": self.settings["cls_only"]}

    def check_model(self, handle) -> None:
        """Refuse a model whose output i is not class i (models.check_outputs)."""
        check_outputs(handle, self.test.class_names)

    def sample_budget(self, n_tokens: int) -> int:
        """Images that yield at least ~n_tokens activation rows (each image has many tokens)."""
        return max(1, n_tokens // 8)

    @staticmethod
    def sample_read(n_tokens: int, n_tasks: int) -> int:
        """Images statistics.activation_sample reads for about n_tokens rows over n_tasks tasks (sample_budget each)."""
        return n_tasks * max(1, n_tokens // n_tasks // 8)

    @staticmethod
    def batch_row(settings: dict) -> int:
        """Images in one batch row: one."""
        return 1

    @staticmethod
    def evaluation_units(settings: dict, n_tasks: int) -> tuple[int, bool]:
        """(images one task's evaluation reads, exactly so): the test images split evenly over the tasks, roughly."""
        return math.ceil(settings["eval_images"] / n_tasks), False

    @staticmethod
    def checkpoints(params: dict) -> int:
        """How many training checkpoints notebook 06 follows: those saved while training the ViT here."""
        return params["vit"]["training"]["checkpoints"]

    def accuracy(self, handle, names=None) -> dict[str, float]:
        """Top-1 per task over the test images of its classes; one pass serves every task."""
        per_class = evaluate(handle, self.test, batch_size=self.settings["batch_size"])["per_class"]
        counts = {c: int((self.test.labels == i).sum()) for i, c in enumerate(self.test.class_names)}
        out = {}
        for t in (names or self.names):
            classes = self.tasks[t]
            n = sum(counts[c] for c in classes)
            if n == 0:
                raise ValueError(f"task {t!r} has no test images: its accuracy is undefined (raise vit.eval_images)")
            out[t] = sum(per_class[c] * counts[c] for c in classes if counts[c]) / n
        return out

    def document_hits(self, handle, names=None, *, scale: int = 1, budget: int | None = None) -> dict[str, dict]:
        """Per task {"n", "top1"}: 1 and the top-1 hit of each test image of its classes, from one pass over the
        test images of the tasks asked for only (every test image of a task is read, whatever `scale`; with a
        `budget`, the hits of its first `budget` images are returned)."""
        names = list(names or self.names)
        wanted = {c for t in names for c in self.tasks[t]}
        classes = [c for c in self.test.class_names if c in wanted]
        docs = evaluate(handle, self.test, batch_size=self.settings["batch_size"], per_document=True,
                        classes=None if len(classes) == len(self.test.class_names) else classes,
                        task=names[0] if len(names) == 1 else None)["documents"]
        out = {}
        for t in names:
            ids = [self.test.class_names.index(c) for c in self.tasks[t]]
            keep = np.isin(docs["labels"], ids)
            out[t] = {"n": docs["n"][keep][:budget], "top1": docs["top1"][keep][:budget]}
        return out

    def evaluators(self, handle):
        """For cross_task_matrix: one callable per task giving its per-image hits from a pass over its own test
        images (a bisection step then reads one task's images, not all)."""
        return {t: (lambda t=t: self.document_hits(handle, [t])[t]) for t in self.names}

    def describe(self) -> dict:
        return {t: {"classes": classes} for t, classes in self.tasks.items()}

    def record(self, handle, budget: int) -> dict:
        """{task: {"source", "statistics": ["train:i", ...], "evaluation": ["test:i", ...]}}: the images used."""
        out = {}
        for t, classes in self.tasks.items():
            used = self.statistics_indices(t, budget)
            out[t] = {"source": self.train.name.split("/")[0],
                      "statistics": [self._id(self.train, "train", i) for i in used],
                      "evaluation": [self._id(self.test, "test", i) for i in self._indices(self.test, classes)]}
        return out

    @staticmethod
    def _id(dataset, split: str, i: int) -> str:
        return f"{split}:{i}" if dataset.ids is None else dataset.ids[i]

    @staticmethod
    def _indices(dataset, classes) -> list[int]:
        ids = torch.tensor([dataset.class_names.index(c) for c in classes])
        return torch.nonzero(torch.isin(dataset.labels, ids)).flatten().tolist()

    def interleaved(self, per_task: int) -> torch.Tensor:
        """`per_task` statistics images of every task (a pooled sample for fitting)."""
        return torch.cat([self.statistics_data(t, per_task) for t in self.names])
