"""Task data (SPEC §9): embedded text domains and Fashion-MNIST, the paper's hub datasets, and batching.

A *task* is a named set of examples. Text tasks are lists of documents, split by document into
disjoint collection and evaluation parts; image tasks are classes or groups of classes, collected
on the train split and evaluated on the test split, so statistics never see evaluation data.
"""
from __future__ import annotations

import gzip
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORTUNES_DIR = Path("/usr/share/games/fortunes")
LICENSES_DIR = Path("/usr/share/common-licenses")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_GROUPS = {"tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
                        "footwear": ["Sandal", "Sneaker", "Ankle boot"],
                        "Trouser": ["Trouser"], "Dress": ["Dress"], "Bag": ["Bag"]}
# mean and std of Fashion-MNIST train pixels in [0, 1]
FASHION_MNIST_NORM = (0.2860, 0.3530)

EMBEDDED_TEXT_DOMAINS = ("code", "docs", "licenses", "computers", "linux", "science", "medicine", "songs-poems",
                         "literature", "law", "politics", "sports", "food", "education")
# related pairs the overlap study looks for (SPEC §9)
EMBEDDED_TEXT_GROUPS = {"code": ["code", "docs", "computers", "linux"],
                        "law": ["licenses", "law", "politics"],
                        "arts": ["songs-poems", "literature"],
                        "science": ["science", "medicine", "education"],
                        "everyday": ["sports", "food"]}


class DataNotAvailableError(FileNotFoundError):
    """Data that is not on this machine; the message says how to get it."""


# -- embedded text domains ---------------------------------------------------------------------------
def _python_sources() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _licenses(piece_chars: int = 3000) -> list[str]:
    """License texts cut into pieces of about `piece_chars` at paragraph breaks (few files, long texts)."""
    if not LICENSES_DIR.is_dir():
        raise DataNotAvailableError(f"{LICENSES_DIR} is missing: it comes with Debian's base-files package")
    texts = {p.resolve(): p.read_text(errors="replace") for p in sorted(LICENSES_DIR.iterdir()) if p.is_file()}
    pieces = []
    for text in texts.values():
        current = ""
        for para in text.split("\n\n"):
            current += para + "\n\n"
            if len(current) >= piece_chars:
                pieces.append(current.strip())
                current = ""
        if current.strip():
            pieces.append(current.strip())
    return pieces


def _fortunes(category: str) -> list[str]:
    path = FORTUNES_DIR / category
    if not path.is_file():
        raise DataNotAvailableError(
            f"fortunes category {category!r} not found at {path}: install Debian's packages "
            f"`apt-get install fortunes fortunes-min` (make run does this when run as root)")
    docs = [d.strip() for d in path.read_text(errors="replace").split("\n%\n")]
    return [d for d in docs if d and d != "%"]


def embedded_text_domain(name: str) -> list[str]:
    """The documents of one embedded text domain (all real text shipped with Python or Debian)."""
    if name == "code":
        return _python_sources()
    if name == "docs":
        return _pydoc_topics()
    if name == "licenses":
        return _licenses()
    if name in EMBEDDED_TEXT_DOMAINS:
        return _fortunes(name)
    raise ValueError(f"unknown text domain {name!r}: embedded domains are {', '.join(EMBEDDED_TEXT_DOMAINS)}")


def split_documents(docs: list[str], eval_frac: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (collect, evaluate) parts, split by document with a seeded shuffle.

    Exact duplicate documents are kept once (first occurrence), so no text can land in both parts."""
    docs = list(dict.fromkeys(docs))
    if not docs:
        raise ValueError("cannot split an empty domain: it has no documents")
    if not 0.0 < eval_frac < 1.0:
        raise ValueError(f"eval_frac must be strictly between 0 and 1, got {eval_frac}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(eval_frac * len(docs))))
    if n_eval >= len(docs):
        raise ValueError(f"a domain with {len(docs)} document(s) cannot be split into collect and evaluate parts")
    eval_idx = set(order[:n_eval])
    return ([d for i, d in enumerate(docs) if i not in eval_idx], [d for i, d in enumerate(docs) if i in eval_idx])


@dataclass
class TextTask:
    name: str
    collect: list[str]     # documents for statistics
    evaluate: list[str]    # disjoint documents for evaluation
    source: str


def text_tasks(names, *, eval_frac: float = 0.3, seed: int = 0, source: str = "embedded",
               data_dir: str | None = None) -> dict[str, TextTask]:
    """Text tasks by name, each split into disjoint collection/evaluation documents.
    source="hub": the paper's domains through datasets.load_dataset, or, offline, from data_dir/<name>
    (a `save_to_disk` copy per domain)."""
    if source not in ("embedded", "hub"):
        raise ValueError(f"source must be 'embedded' or 'hub', got {source!r}")
    tasks = {}
    for name in names:
        local = str(Path(data_dir) / name) if data_dir else None
        docs = embedded_text_domain(name) if source == "embedded" else hub_text_domain(name, local_dir=local)
        if not docs:
            raise ValueError(f"text domain {name!r} is empty: it has no documents")
        collect, evaluate = split_documents(docs, eval_frac, seed)
        tasks[name] = TextTask(name, collect, evaluate, source)
    return tasks


# -- the paper's text domains, through datasets.load_dataset -------------------------------------------
PAPER_TEXT_DOMAINS = {
    "biology": dict(path="camel-ai/biology", field="message_2"),
    "chemistry": dict(path="camel-ai/chemistry", field="message_2"),
    "physics": dict(path="camel-ai/physics", field="message_2"),
    "math": dict(path="camel-ai/math", field="message_2"),
    "code": dict(path="codeparrot/github-code-clean", name="Python-all", field="code"),
    "civil": dict(path="google/civil_comments", field="text", where=("toxicity", "<=", 0.2)),
    "toxic": dict(path="google/civil_comments", field="text", where=("toxicity", ">=", 0.8)),
    "emotion": dict(path="dair-ai/emotion", field="text"),
    **{f"pile_{key}": dict(path="monology/pile-uncopyrighted", field="text", pile_set=value)
       for key, value in {"ArXiv": "ArXiv", "Enron_Emails": "Enron Emails", "EuroParl": "EuroParl",
                          "FreeLaw": "FreeLaw", "Github": "Github", "Gutenberg": "Gutenberg (PG-19)",
                          "HackerNews": "HackerNews", "NIH_ExPorter": "NIH ExPorter", "PhilPapers": "PhilPapers",
                          "PubMed_Abstracts": "PubMed Abstracts", "PubMed_Central": "PubMed Central",
                          "StackExchange": "StackExchange", "USPTO_Backgrounds": "USPTO Backgrounds",
                          "Ubuntu_IRC": "Ubuntu IRC", "Wikipedia": "Wikipedia (en)"}.items()},
}


def hub_text_domain(name: str, *, max_docs: int = 2000, local_dir: str | None = None) -> list[str]:
    """Documents of a paper text domain, streamed from the hub (or a `save_to_disk` copy in local_dir)."""
    if name not in PAPER_TEXT_DOMAINS:
        raise ValueError(f"unknown paper text domain {name!r}: known are {', '.join(PAPER_TEXT_DOMAINS)}")
    spec = PAPER_TEXT_DOMAINS[name]
    rows = _load_hub_rows(spec["path"], spec.get("name"), "train", local_dir)
    docs = []
    for row in rows:
        if "pile_set" in spec and row.get("meta", {}).get("pile_set_name") != spec["pile_set"]:
            continue
        if "where" in spec:
            key, op, value = spec["where"]
            if not (row[key] <= value if op == "<=" else row[key] >= value):
                continue
        docs.append(row[spec["field"]])
        if len(docs) >= max_docs:
            break
    return docs


def _load_hub_rows(path: str, name: str | None, split: str, local_dir: str | None):
    import datasets
    try:
        if local_dir is not None:
            ds = datasets.load_from_disk(local_dir)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(path, name, split=split, streaming=True)
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        raise DataNotAvailableError(
            f"dataset {path!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
            f"Offline, load it on a machine with network (datasets.load_dataset({path!r}).save_to_disk(DIR)), "
            f"copy DIR here and pass it as local_dir / the params key data_dir") from err


# -- LM batching -------------------------------------------------------------------------------------
def lm_windows(tokenizer, texts: list[str], *, ctx: int = 256, max_tokens: int | None = None,
               with_documents: bool = False):
    """Each document cut into windows of at most `ctx` tokens, in order, stopping once `max_tokens` real
    tokens have been produced (exactly that many). with_documents=True returns (windows, the index in
    `texts` of each window's document)."""
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    windows, documents, total = [], [], 0
    for doc, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), ctx):
            window = ids[start:start + ctx]
            if len(window) < 2 and start > 0:
                continue
            if max_tokens is not None and total + len(window) > max_tokens:
                window = window[:max_tokens - total]
            windows.append(window)
            documents.append(doc)
            total += len(window)
            if max_tokens is not None and total >= max_tokens:
                return (windows, documents) if with_documents else windows
    return (windows, documents) if with_documents else windows


def lm_batches(tokenizer, texts: list[str], *, ctx: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               shard: tuple[int, int] = (0, 1), with_documents: bool = False):
    """Yield right-padded (input_ids, attention_mask) batches of the windows of `lm_windows`
    (with_documents=True: (input_ids, attention_mask, document index of each row [batch])).
    shard=(rank, world_size) takes every world_size-th window, so the shards' union is the whole set."""
    rank, world = shard
    windows, documents = lm_windows(tokenizer, texts, ctx=ctx, max_tokens=max_tokens, with_documents=True)
    windows, documents = windows[rank::world], documents[rank::world]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(windows), batch_size):
        ids, mask = _pad(windows[start:start + batch_size], pad_id)
        if with_documents:
            yield ids, mask, torch.tensor(documents[start:start + batch_size], dtype=torch.long)
        else:
            yield ids, mask


def _pad(windows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, :len(w)] = 1
    return ids, mask


# -- images ------------------------------------------------------------------------------------------
@dataclass
class ImageDataset:
    """Normalised images [N, C, H, W] float32 with integer labels, one split."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, classes, max_images: int | None = None) -> torch.Tensor:
        """Images whose label is in `classes` (names or ids), in dataset order."""
        ids = [self.class_names.index(c) if isinstance(c, str) else int(c) for c in classes]
        keep = torch.isin(self.labels, torch.tensor(ids))
        images = self.images[keep]
        return images if max_images is None else images[:max_images]


def images_and_labels(data) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(images [N, C, H, W], labels [N] or None, class names or None) from what image models take: a
    tensor, an ImageDataset, or a map-style dataset (a torch Dataset such as TensorDataset, or a
    `datasets.Dataset` in torch format) whose items are an image tensor, (image, label), or a dict with
    `pixel_values` (and `label` / `labels`). Items are stacked, so keep such datasets to what fits in memory."""
    if isinstance(data, torch.Tensor):
        return data, None, None
    if isinstance(data, ImageDataset):
        return data.images, data.labels, data.class_names
    if isinstance(data, (str, bytes)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"an image model takes a float tensor [N, C, H, W], an ImageDataset or a map-style "
                        f"dataset of images, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("the image data is empty")
    images, labels = [], []
    for i in range(len(data)):
        item = data[i]
        if isinstance(item, dict):
            if "pixel_values" not in item:
                raise TypeError(f"dataset items are dicts with keys {sorted(item)}, but no 'pixel_values': "
                                f"process the images first (e.g. with the model's processor, dataset.map) so "
                                f"each item holds a pixel_values tensor")
            image, label = item["pixel_values"], item.get("label", item.get("labels"))
        elif isinstance(item, (tuple, list)):
            image, label = item[0], (item[1] if len(item) > 1 else None)
        else:
            image, label = item, None
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"dataset item {i} holds a {type(image).__name__}, not an image tensor [C, H, W]: "
                            f"convert it first (e.g. torchvision.transforms.ToTensor or the model's processor)")
        images.append(image)
        labels.append(label)
    stacked = torch.stack(images)
    if any(label is None for label in labels):
        return stacked, None, None
    return stacked, torch.as_tensor([int(label) for label in labels], dtype=torch.long), None


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> ImageDataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist: 60k train / 10k test, normalised, [N, 1, 28, 28]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file() or not lbl_path.is_file():
        raise DataNotAvailableError(
            f"Fashion-MNIST not found in {root}: install Debian's package `apt-get install dataset-fashion-mnist` "
            f"(make run does this when run as root) or pass the folder holding {img_path.name}")
    images = torch.from_numpy(_read_idx(img_path).copy()).float().div_(255.0)
    mean, std = FASHION_MNIST_NORM
    images = ((images - mean) / std).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return ImageDataset(images, labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}")


def image_tasks(dataset: ImageDataset, tasks: str | dict = "classes") -> dict[str, list[str]]:
    """Task name -> class names: "classes" (one task per class), "groups" (Fashion-MNIST's natural groups),
    or an explicit dict."""
    if tasks == "classes":
        return {c: [c] for c in dataset.class_names}
    if tasks == "groups":
        if dataset.class_names != FASHION_MNIST_CLASSES:
            raise ValueError("tasks='groups' is defined for Fashion-MNIST only; pass an explicit dict of groups")
        return dict(FASHION_MNIST_GROUPS)
    if isinstance(tasks, dict):
        unknown = sorted({c for cs in tasks.values() for c in cs} - set(dataset.class_names))
        if unknown:
            raise ValueError(f"unknown classes {unknown} in image tasks; the dataset has {dataset.class_names}")
        return tasks
    raise ValueError(f"image tasks must be 'classes', 'groups' or a dict of task -> classes, got {tasks!r}")


def cifar100(split: str = "train", *, processor=None, local_dir: str | None = None,
             max_images: int | None = None) -> ImageDataset:
    """CIFAR-100 (`uoft-cs/cifar100`) labelled by its 20 coarse superclasses, as the paper uses it."""
    import datasets
    try:
        ds = (datasets.load_from_disk(local_dir) if local_dir else datasets.load_dataset("uoft-cs/cifar100"))
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        raise DataNotAvailableError(
            f"CIFAR-100 (uoft-cs/cifar100) could not be loaded ({type(err).__name__}). Offline, save it on a "
            f"machine with network with datasets.load_dataset('uoft-cs/cifar100').save_to_disk(DIR) and pass "
            f"data_dir: DIR") from err
    part = ds[split]
    if max_images is not None:
        part = part.select(range(min(max_images, len(part))))
    if "coarse_label" not in part.column_names:
        raise ValueError(f"dataset has no 'coarse_label' column (columns: {part.column_names}): it has no labels "
                         f"for the 20 superclasses")
    names = part.features["coarse_label"].names
    image_col = "img" if "img" in part.column_names else "image"
    pil = [im.convert("RGB") for im in part[image_col]]
    if processor is not None:
        images = processor(images=pil, return_tensors="pt")["pixel_values"]
    else:
        arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in pil])
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).sub(0.5).div(0.5)
    return ImageDataset(images.float(), torch.tensor(part["coarse_label"]), list(names), f"cifar100/{split}")
