"""Task data (docs/method.md §9): embedded text domains and Fashion-MNIST, the paper's hub datasets, your own text files,
datasets and image folders, and batching.

A *task* is a named set of examples. Text tasks are lists of documents, split by document into
disjoint collection and evaluation parts; image tasks are classes or groups of classes, collected
on the train split and evaluated on the test split, so statistics never see evaluation data.
"""
from __future__ import annotations

import collections
import fnmatch
import gzip
import os
import random
import re
import sysconfig
import warnings
import weakref
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
# related pairs the overlap study looks for (docs/method.md §9)
EMBEDDED_TEXT_GROUPS = {"code": ["code", "docs", "computers", "linux"],
                        "law": ["licenses", "law", "politics"],
                        "arts": ["songs-poems", "literature"],
                        "science": ["science", "medicine", "education"],
                        "everyday": ["sports", "food"]}


class DataNotAvailableError(FileNotFoundError):
    """Data that is not on this machine; the message says how to get it."""


# -- embedded text domains ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One top-level document of a domain. `id` names it there: a file name relative to the domain's root,
    `CATEGORY:N` for the Nth fortune entry (0-based, file order), a pydoc topic key, or the position of a
    hub domain's document (0-based, in the order read). Documents with the same `family` (None: their own)
    always land on the same side of a split."""
    id: str
    text: str
    family: str | None = None


# Licence files that quote one another are one family (a normalised name: the file name without its version).
# Measured on Debian's common-licenses: GPL, LGPL and GFDL share passages of 200+ characters across families.
LICENSE_FAMILIES = {"GPL": "GNU", "LGPL": "GNU", "GFDL": "GNU"}


def license_family(file_name: str) -> str:
    """The family of a licence file: its name without a version (GPL-2, GPL-3, GPL -> GPL), then
    LICENSE_FAMILIES (GPL, LGPL, GFDL -> GNU)."""
    base = re.sub(r"-v?\d+(\.\d+)*$", "", file_name)
    return LICENSE_FAMILIES.get(base, base)


def _python_sources() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [Document(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(stdlib.glob("*.py"))]


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics
    return [Document(k, topics[k]) for k in sorted(topics)]


def _licenses() -> list[Document]:
    """Whole licence files (a link such as GPL -> GPL-3 is read once, under its target's name)."""
    if not LICENSES_DIR.is_dir():
        raise DataNotAvailableError(f"{LICENSES_DIR} is missing: it comes with Debian's base-files package")
    root = LICENSES_DIR.resolve()
    files = {}
    for p in sorted(LICENSES_DIR.iterdir()):
        target = p.resolve()
        if target.is_file():
            files.setdefault(target, target.relative_to(root).as_posix() if target.is_relative_to(root) else p.name)
    return [Document(name, path.read_text(encoding="utf-8", errors="replace"), license_family(name))
            for path, name in sorted(files.items(), key=lambda item: item[1])]


def _fortunes(category: str) -> list[Document]:
    path = FORTUNES_DIR / category
    if not path.is_file():
        raise DataNotAvailableError(
            f"fortunes category {category!r} not found at {path}: install Debian's packages "
            f"`apt-get install fortunes fortunes-min` (make run does this when run as root)")
    entries = [d.strip() for d in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    entries = [d for d in entries if d and d != "%"]
    return [Document(f"{category}:{i}", d) for i, d in enumerate(entries)]


def embedded_documents(name: str) -> list[Document]:
    """The documents of one embedded text domain with their ids (all real text shipped with Python or Debian),
    in the order of their ids (files and topics sorted, fortunes in file order)."""
    if name == "code":
        return _python_sources()
    if name == "docs":
        return _pydoc_topics()
    if name == "licenses":
        return _licenses()
    if name in EMBEDDED_TEXT_DOMAINS:
        return _fortunes(name)
    raise ValueError(f"unknown text domain {name!r}: embedded domains are {', '.join(EMBEDDED_TEXT_DOMAINS)}")


def embedded_text_domain(name: str) -> list[str]:
    """The texts of one embedded text domain (see embedded_documents)."""
    return [d.text for d in embedded_documents(name)]


def general_corpus(seed: int = 0, exclude=()) -> list[str]:
    """The external general corpus of `retain: general` (docs/method.md §3), a stand-in for the paper's Pile that
    holds none of the tasks: every fortune of Debian's categories that are not embedded domains (art, cookie,
    debian, definitions, people, wisdom, zippy, ...), each text once, less any entry of an embedded domain and
    any text in `exclude` (the study's own documents), in a seeded shuffled order, so that any budget reads a
    sample of the whole source."""
    if not FORTUNES_DIR.is_dir():
        raise DataNotAvailableError(f"the general corpus reads {FORTUNES_DIR}: install Debian's packages "
                                    f"`apt-get install fortunes fortunes-min` (make run does this when run as root)")
    categories = sorted(p.name for p in FORTUNES_DIR.iterdir()
                        if p.is_file() and not p.suffix and p.name not in EMBEDDED_TEXT_DOMAINS)
    # some entries are in several categories: none of an embedded domain's may be in the corpus
    excluded = set(exclude) | {d.text for c in EMBEDDED_TEXT_DOMAINS if (FORTUNES_DIR / c).is_file() for d in _fortunes(c)}
    texts = list(dict.fromkeys(d.text for c in categories for d in _fortunes(c) if d.text not in excluded))
    if not texts:
        raise DataNotAvailableError(f"no fortunes outside the embedded domains in {FORTUNES_DIR}: install Debian's "
                                    f"package `fortunes` for the general corpus")
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order]


def document_groups(docs: list[Document], n_chars: int = 200) -> list[int]:
    """A group label per document: documents of one family, and documents that share a passage of `n_chars`
    characters (directly or through others), get the same label.

    Exact: every n_chars-character window of every text is hashed; windows of different documents with equal
    hashes are compared as strings. Memory: about 10 bytes a character of the domain (one pass keeps only the
    hashes, a second only the windows whose hash is in two documents), plus ~30 of the longest document."""
    if n_chars < 2:
        raise ValueError(f"n_chars must be at least 2, got {n_chars}")
    parent = list(range(len(docs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    first = {}
    for i, d in enumerate(docs):
        if d.family is not None:
            parent[root(i)] = root(first.setdefault(d.family, i))
    # pass 1: the hashes found in two or more documents (each document's distinct hashes, sorted in place)
    every = np.empty(sum(max(0, len(d.text) - n_chars + 1) for d in docs), dtype=np.uint64)
    filled = 0
    for d in docs:
        h = np.unique(_window_hashes(d.text, n_chars))
        every[filled:filled + len(h)] = h
        filled += len(h)
    every = every[:filled]
    every.sort()
    shared = np.unique(every[1:][every[1:] == every[:-1]])
    del every
    # pass 2: where those hashes are, once per document
    hashes, owners, starts = [np.zeros(0, dtype=np.uint64)], [np.zeros(0, dtype=np.int32)], [np.zeros(0, np.int64)]
    for i, d in enumerate(docs):
        if not len(shared):
            break
        h = _window_hashes(d.text, n_chars)
        keep = np.flatnonzero(shared[np.minimum(np.searchsorted(shared, h), len(shared) - 1)] == h)
        h, first = np.unique(h[keep], return_index=True)
        hashes.append(h)
        owners.append(np.full(len(h), i, dtype=np.int32))
        starts.append(keep[first])
    hashes, owners, starts = np.concatenate(hashes), np.concatenate(owners), np.concatenate(starts)
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    run_start = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    run_len = np.diff(np.r_[run_start, len(hashes)])
    for start, length in zip(run_start[run_len > 1].tolist(), run_len[run_len > 1].tolist()):
        members = order[start:start + length]
        if len({root(int(owners[m])) for m in members}) == 1:
            continue
        seen: dict[str, int] = {}                          # equal hashes, but only equal strings count
        for m in members:
            i, at = int(owners[m]), int(starts[m])
            j = seen.setdefault(docs[i].text[at:at + n_chars], i)
            parent[root(i)] = root(j)
    return [root(i) for i in range(len(docs))]


_HASH_BASE = 1_000_003          # odd, so it has an inverse modulo 2**64


_HASH_CHUNK = 1 << 20          # windows hashed at once: bounds the temporaries (~80 bytes a window)


def _window_hashes(text: str, n: int) -> np.ndarray:
    """A polynomial hash (mod 2**64) of every n-character window of `text`, by its offset."""
    count = len(text) - n + 1
    out = np.empty(max(0, count), dtype=np.uint64)
    for start in range(0, count, _HASH_CHUNK):          # a window's hash does not depend on where a chunk starts
        stop = min(start + _HASH_CHUNK, count)
        out[start:stop] = _chunk_hashes(text[start:stop + n - 1], n)
    return out


def _chunk_hashes(text: str, n: int) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(codes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):          # arithmetic modulo 2**64 on purpose
        base = np.full(len(codes) - 1, _HASH_BASE, dtype=np.uint64)
        inverse = np.full(count - 1, pow(_HASH_BASE, -1, 1 << 64), dtype=np.uint64)
        powers = np.r_[np.uint64(1), np.cumprod(base, dtype=np.uint64)]
        inverses = np.r_[np.uint64(1), np.cumprod(inverse, dtype=np.uint64)]
        prefix = np.r_[np.uint64(0), np.cumsum(codes * powers, dtype=np.uint64)]
        return (prefix[n:] - prefix[:count]) * inverses           # sum of codes[s + j] * base**j


def split_documents(docs: list, eval_frac: float = 0.3, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Disjoint (collect, evaluate) parts of a domain's documents (Documents, or texts: ids "0", "1", ...),
    split by document with a seeded shuffle, each part in a seeded shuffled order.

    Exact duplicates are kept once (first occurrence). Documents of one family, and documents that share a
    200-character passage, always land on the same side, so no text of one part appears in the other.
    Families go to the evaluation part in shuffled order while they fit in round(eval_frac * n) documents."""
    docs = [d if isinstance(d, Document) else Document(str(i), d) for i, d in enumerate(docs)]
    unique: dict[str, Document] = {}
    for d in docs:
        unique.setdefault(d.text, d)
    docs = list(unique.values())
    if not docs:
        raise ValueError("cannot split an empty domain: it has no documents")
    if not 0.0 < eval_frac < 1.0:
        raise ValueError(f"eval_frac must be strictly between 0 and 1, got {eval_frac}")
    groups = document_groups(docs)
    labels = sorted(set(groups))
    if len(labels) < 2:
        raise ValueError(f"a domain with {len(docs)} document(s) in {len(labels)} family cannot be split into "
                         f"collect and evaluate parts")
    rng = random.Random(seed)
    rng.shuffle(labels)
    size = collections.Counter(groups)
    target = max(1, int(round(eval_frac * len(docs))))
    chosen, n_eval = set(), 0
    for g in labels:
        if n_eval + size[g] <= target:
            chosen.add(g)
            n_eval += size[g]
    if not chosen:          # every family is larger than the target: the first one, the rest still collect
        chosen.add(labels[0])
    order = list(range(len(docs)))
    rng.shuffle(order)
    return ([docs[i] for i in order if groups[i] not in chosen], [docs[i] for i in order if groups[i] in chosen])


def split_sizes(n_docs: int, eval_frac: float) -> tuple[int, int]:
    """(collect, evaluate) document counts of split_documents for n distinct documents."""
    n_eval = max(1, int(round(eval_frac * n_docs)))
    return n_docs - n_eval, n_eval


@dataclass
class TextTask:
    """A text task: texts for statistics and disjoint texts for evaluation, each in a seeded shuffled order,
    with the id of every text in its domain (see Document)."""
    name: str
    collect: list[str]     # documents for statistics
    evaluate: list[str]    # disjoint documents for evaluation
    source: str
    collect_ids: list[str] | None = None     # None: "0", "1", ...
    evaluate_ids: list[str] | None = None

    def __post_init__(self):
        for part in ("collect", "evaluate"):
            texts, ids = getattr(self, part), getattr(self, part + "_ids")
            if ids is None:
                setattr(self, part + "_ids", [str(i) for i in range(len(texts))])
            elif len(ids) != len(texts):
                raise ValueError(f"task {self.name!r}: {len(ids)} {part}_ids for {len(texts)} {part} texts; "
                                 f"give one id per text")


def text_tasks(names, *, eval_frac: float = 0.3, seed: int = 0, source: str = "embedded",
               data_dir: str | None = None, root: str | Path = ".") -> dict[str, TextTask]:
    """Text tasks, each split into disjoint collection/evaluation documents (split_documents).

    names: a list of domain names of `source`, or a mapping {task: spec} where a spec is None (the domain of
    that name), {"files": [glob, ...]} or {"dataset": ID or save_to_disk folder, "split", "text_column",
    "where", "max_docs"} (task_documents). Relative paths are read from `root`.
    source="hub": the paper's domains through datasets.load_dataset, or, offline, from data_dir/<name>
    (a `save_to_disk` copy per domain); their ids are positions in the order read (0-based)."""
    if source not in ("embedded", "hub"):
        raise ValueError(f"source must be 'embedded' or 'hub', got {source!r}")
    specs = names if isinstance(names, dict) else dict.fromkeys(names)
    read = {name: task_documents(name, spec, source=source, data_dir=data_dir, root=root)
            for name, spec in specs.items()}
    documents, dropped = disjoint_tasks({name: docs for name, (docs, _) in read.items()},
                                        own={name for name, spec in specs.items() if spec is not None})
    if dropped:
        warnings.warn(f"{len(dropped)} document(s) are in two domains and are kept in the first task only: "
                      f"{', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}", stacklevel=2)
    tasks = {}
    for name, (_, kind) in read.items():
        docs = documents[name]
        if not docs:
            raise ValueError(f"text domain {name!r} is empty: it has no documents")
        collect, evaluate = split_documents(docs, eval_frac, seed)
        tasks[name] = TextTask(name, [d.text for d in collect], [d.text for d in evaluate], kind,
                               [d.id for d in collect], [d.id for d in evaluate])
    return tasks


def disjoint_tasks(docs: dict[str, list[Document]], own=()) -> tuple[dict[str, list[Document]], list[str]]:
    """(documents of each task, "id in task = id in task" of each one dropped): every text in one task only, so
    no document is in one task's statistics and another's evaluation. A text in two tasks is a ValueError
    when either is in `own` (files or a dataset: the user's globs or filters overlap); otherwise (embedded or
    hub domains, a few of which share entries) it is kept in the first task and dropped from the later."""
    first: dict[str, tuple[str, str]] = {}
    shared: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
    kept = {}
    for name, task_docs in docs.items():
        kept[name] = []
        for d in task_docs:
            owner, owner_id = first.setdefault(d.text, (name, d.id))
            if owner == name:
                kept[name].append(d)
            else:
                shared[owner, name].append((owner_id, d.id))
    for (a, b), pairs in shared.items():
        if a in own or b in own:
            texts_a, texts_b = ({d.text for d in docs[t]} for t in (a, b))
            if texts_a == texts_b:
                raise ValueError(f"tasks {a!r} and {b!r} hold the same {len(texts_a)} documents, so they are one "
                                 f"task: remove one or give it other files")
            example = ", ".join(f"{x} in {a!r} is {y} in {b!r}" if x != y else f"{x} in both" for x, y in pairs[:3])
            raise ValueError(f"tasks {a!r} and {b!r} share {len(pairs)} document(s) ({example}), which would be "
                             f"in one task's statistics and the other's evaluation: change their files (or where) "
                             f"so that each document is in one task")
    dropped = [f"{y} in {b!r} = {x} in {a!r}" for (a, b), pairs in shared.items() for x, y in pairs]
    return kept, dropped


def task_documents(name: str, spec: dict | None, *, source: str = "embedded", data_dir: str | None = None,
                   root: str | Path = ".") -> tuple[list[Document], str]:
    """(documents, source label) of one text task: spec None is the domain `name` of `source`;
    {"files": [...]} reads files (file_documents); {"dataset": ...} reads rows (dataset_documents)."""
    if spec is None:
        if source == "embedded":
            return embedded_documents(name), source
        local = str(Path(data_dir) / name) if data_dir else None
        texts = hub_text_domain(name, local_dir=local)
        return [Document(str(i), t) for i, t in enumerate(texts)], source
    if "files" in spec:
        patterns = [spec["files"]] if isinstance(spec["files"], str) else spec["files"]
        return file_documents(patterns, root=root), "files"
    if "dataset" in spec:
        options = {k: spec[k] for k in ("split", "text_column", "where", "max_docs") if spec.get(k) is not None}
        return dataset_documents(spec["dataset"], root=root, **options), "dataset"
    raise ValueError(f"task {name!r}: a task is given by files (files: [glob, ...]) or a dataset (dataset: ID or "
                     f"folder), got keys {sorted(spec)}")


def file_documents(patterns, *, root: str | Path = ".") -> list[Document]:
    """One document per text file matching any of `patterns` (glob_files; `**` matches folders at any depth),
    relative patterns read from `root`. A document's id is its path as matched (relative to root for a
    relative pattern), documents in the order of their ids; files of only whitespace are left out. Files are
    read by read_text_file (binary ones refused); bytes that are not UTF-8 are reported in one warning."""
    root = Path(root)
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = glob_files(pattern, root)
        if not matches:
            where = "" if Path(pattern).is_absolute() else f" in {root}"
            raise ValueError(f"no file matches {pattern!r}{where}: check the pattern (relative patterns are read "
                             f"from the folder of the params file; ** matches subfolders)")
        for m in matches:
            found.setdefault(m, root / m)
    docs, damaged = [], []
    for name, path in sorted(found.items()):
        text, replaced = read_text_file(path, name)
        docs.append(Document(name, text))
        if replaced:
            damaged.append(f"{name} ({replaced} bytes)")
    if damaged:
        warnings.warn(f"{len(damaged)} file(s) are not all UTF-8; their undecodable bytes are read as U+FFFD: "
                      f"{', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}; convert them to UTF-8 "
                      f"(e.g. iconv -f latin1 -t utf-8) to read them as written", stacklevel=2)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"the {len(found)} file(s) matching {list(patterns)} hold no text: point the globs at text "
                         f"files")
    return docs


MAX_TEXT_FILE_BYTES = 32 << 20    # one document; splitting needs ~30 bytes a character of the longest one
BINARY_FRACTION = 0.1             # a file with more undecodable bytes than this is not text
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")    # what surrogateescape makes of a byte that is not UTF-8


def read_text_file(path: Path, name: str) -> tuple[str, int]:
    """(text, number of bytes that were not UTF-8, each read as U+FFFD) of a text file (a UTF-8 BOM is dropped).
    ValueError for a file that is binary (NUL bytes, or more than BINARY_FRACTION of it not UTF-8) or larger
    than MAX_TEXT_FILE_BYTES; `name` is how the message names it."""
    size = path.stat().st_size
    if size > MAX_TEXT_FILE_BYTES:
        raise ValueError(f"file {name!r} is {size / 2**20:.0f} MiB; a text task reads one document per file, of at "
                         f"most {MAX_TEXT_FILE_BYTES >> 20} MiB: split it into smaller files")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ValueError(f"file {name!r} holds NUL bytes, so it is binary (or UTF-16), not text: leave it out of the "
                         f"glob, or convert it to UTF-8 text")
    text, replaced = _ESCAPED_BYTE.subn("\ufffd", raw.decode("utf-8-sig", "surrogateescape"))
    if replaced > BINARY_FRACTION * len(raw):
        raise ValueError(f"file {name!r} is not UTF-8 text: {replaced} of its {len(raw)} bytes are not UTF-8; "
                         f"convert it (e.g. iconv -f latin1 -t utf-8) or leave it out of the glob")
    return text, replaced


GLOB_MAX_ENTRIES = 1_000_000      # files and folders one glob may look at
_GLOB_MAGIC = re.compile(r"[*?[]")


def glob_files(pattern: str, root: Path) -> list[str]:
    """The files `pattern` matches, named and sorted as glob.glob(pattern, root_dir=root, recursive=True) names
    them (`**`: any number of folders; wildcards skip hidden names), but walking no symlinked folder (so a link
    loop cannot make `**` endless) and at most GLOB_MAX_ENTRIES entries (ValueError beyond)."""
    parts = pattern.split("/")
    n_literal = next((i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part)), len(parts))
    if n_literal == len(parts):                                   # no wildcard: one file or none
        return [pattern] if (root / pattern).is_file() else []
    prefix = "/".join(parts[:n_literal]) or ("/" if pattern.startswith("/") else "")
    pats = []
    for part in parts[n_literal:]:
        if part and not (part == "**" and pats[-1:] == ["**"]):
            pats.append(part)
    base = root / prefix
    if not base.is_dir():
        return []
    max_depth = None if "**" in pats else len(pats) - 1
    hidden = any(p.startswith(".") for p in pats)
    found = []
    for folder, dirs, files in _walk(base, f"glob {pattern!r}", "narrow it (a folder nearer the files, fewer **)"):
        rel = Path(folder).relative_to(base).parts
        if max_depth is not None and len(rel) >= max_depth:
            dirs[:] = []
        elif not hidden:                                              # no part of the pattern can match them
            dirs[:] = [d for d in dirs if d[0] != "."]
        for f in files:
            if _glob_match([*rel, f], pats) and os.path.isfile(os.path.join(folder, f)):
                found.append("/".join([prefix.rstrip("/"), *rel, f]) if prefix else "/".join([*rel, f]))
    return sorted(found)


def _walk(base: Path, what: str, fix: str):
    """os.walk(base) that lists symlinked folders but never enters them (a link loop would never end), and stops
    with a ValueError naming `what` and `fix` after GLOB_MAX_ENTRIES files and folders. The caller may prune
    the folder lists it is given, as with os.walk."""
    seen = 0
    for folder, dirs, files in os.walk(base, followlinks=False):
        seen += len(dirs) + len(files)
        if seen > GLOB_MAX_ENTRIES:
            raise ValueError(f"{what} reaches more than {GLOB_MAX_ENTRIES} files and folders below {base}: {fix}")
        yield folder, dirs, files


def _glob_match(names: list[str], pats: list[str]) -> bool:
    """Do path parts `names` match glob parts `pats` (glob's rules: `**` any number of non-hidden folders,
    a wildcard part matches a hidden name only when it starts with '.')?"""
    if not pats:
        return not names
    if pats[0] == "**":
        first = 1 if len(pats) == 1 else 0          # a last ** names folders: a file is at least one name below
        return any(_glob_match(names[i:], pats[1:]) for i in range(first, len(names) + 1)
                   if all(n[0] != "." for n in names[:i]))
    return (bool(names) and (names[0][0] != "." or pats[0][0] == ".") and fnmatch.fnmatchcase(names[0], pats[0])
            and _glob_match(names[1:], pats[1:]))


def dataset_folder(source: str, root: str | Path = ".") -> Path | None:
    """The folder a dataset source names (relative to `root`), or None for a hub id: a source is a folder when
    it exists there or starts with . / or ~."""
    path = Path(source).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    return path if path.exists() or source.startswith((".", "/", "~")) else None


def open_dataset(source: str, *, split: str = "train", root: str | Path = "."):
    """One split of a dataset: a `save_to_disk` folder (relative to `root`) or, otherwise, a hub id streamed
    with datasets.load_dataset. ValueError / DataNotAvailableError say what is wrong and how to fix it."""
    import datasets
    path = dataset_folder(source, root)
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"dataset folder {str(path)!r} does not exist: give a folder written by "
                             f"Dataset.save_to_disk / DatasetDict.save_to_disk, or a hub id")
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, FileNotFoundError) as err:
            raise ValueError(f"dataset folder {str(path)!r} does not load ({type(err).__name__}): give a folder "
                             f"written by Dataset.save_to_disk / DatasetDict.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {str(path)!r} has no split {split!r}; its splits are {', '.join(ds)}")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(source, split=split, streaming=True)
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
        raise DataNotAvailableError(
            f"dataset {source!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
            f"Offline, save it on a machine with network (datasets.load_dataset({source!r}).save_to_disk(DIR)), "
            f"copy DIR here and give its path as dataset") from err


def dataset_columns(ds) -> list[str]:
    """Column names of a dataset (for a streamed one without known features: the keys of its first row)."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds), {}))


def dataset_documents(source: str, *, split: str = "train", text_column: str = "text", where: dict | None = None,
                      max_docs: int = 2000, root: str | Path = ".") -> list[Document]:
    """One document per row of a dataset split (open_dataset) whose `where` columns hold the given values
    (a list: any of them; a class label by name or id), from `text_column`, up to `max_docs` rows in the
    order read. A document's id is "<split>:<row number in the split>"; empty texts are left out."""
    ds = open_dataset(source, split=split, root=root)
    where = dict(where or {})
    columns = dataset_columns(ds)
    for column in (text_column, *where):
        if column not in columns:
            key = "text_column" if column == text_column else "where"
            raise ValueError(f"dataset {source!r} ({split}) has no column {column!r}; its columns are "
                             f"{', '.join(columns)}: set {key} to one of them")
    wanted = {k: _column_values(ds, k, v) for k, v in where.items()}
    docs = []
    for i, row in enumerate(ds.select_columns([text_column, *where])):
        if any(row[k] not in values for k, values in wanted.items()):
            continue
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(f"dataset {source!r}: column {text_column!r} holds {type(text).__name__}, not text; "
                             f"set text_column to a column of strings")
        if text.strip():
            docs.append(Document(f"{split}:{i}", text))
            if len(docs) >= max_docs:
                break
    if not docs:
        condition = f" where {where}" if where else ""
        raise ValueError(f"dataset {source!r} ({split}) has no row with text in {text_column!r}{condition}: "
                         f"check the where values")
    return docs


def _column_values(ds, column: str, value) -> list:
    """The values a `where` condition accepts; class-label names become their ids."""
    values = value if isinstance(value, list) else [value]
    feature = (ds.features or {}).get(column)
    if feature is not None and hasattr(feature, "str2int"):
        names = list(feature.names)
        unknown = [v for v in values if isinstance(v, str) and v not in names]
        if unknown:
            raise ValueError(f"column {column!r} has no label {unknown[0]!r}; its labels are {', '.join(names)}")
        values = [names.index(v) if isinstance(v, str) else v for v in values]
    return values


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
               doc_tokens: int | None = None, with_documents: bool = False):
    """The windows of at most `ctx` tokens that a budget of `max_tokens` real tokens takes (see
    document_windows). with_documents=True returns (windows, the index in `texts` of each window's document)."""
    if with_documents:
        pairs = document_windows(tokenizer, texts, ctx=ctx, max_tokens=max_tokens, doc_tokens=doc_tokens)
        return [w for _, w in pairs], [d for d, _ in pairs]
    return [window for _, window in document_windows(tokenizer, texts, ctx=ctx, max_tokens=max_tokens,
                                                     doc_tokens=doc_tokens)]


def document_windows(tokenizer, texts: list[str], *, ctx: int = 256, max_tokens: int | None = None,
                     doc_tokens: int | None = None) -> list[tuple[int, list[int]]]:
    """(document index, window) pairs: the documents read in rounds, each round every document in order
    giving its next `doc_tokens` tokens (default ctx: one window) cut into windows of at most `ctx`, until
    `max_tokens` real tokens have been produced (exactly that many) or every token is used.

    So a budget is spread over many documents (B tokens come from at least B / doc_tokens documents when the
    first round holds them) rather than taken from the first few long ones. A one-token window after a
    document's start is dropped: it has no next-token target."""
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    doc_tokens = ctx if doc_tokens is None else doc_tokens
    if doc_tokens < 2:
        raise ValueError(f"doc_tokens (tokens per document per round) must be at least 2, got {doc_tokens}")
    token_ids: dict[int, list[int]] = {}          # tokenised when first visited: a small budget reads few documents
    out, total, offset = [], 0, 0
    while True:
        more = False
        for d, text in enumerate(texts):
            if d not in token_ids:
                token_ids[d] = _token_ids(tokenizer, text)
            ids = token_ids[d]
            end = min(offset + doc_tokens, len(ids))
            for start in range(offset, end, ctx):
                window = ids[start:min(start + ctx, end)]
                if len(window) < 2 and start > 0:
                    continue
                if max_tokens is not None:
                    window = window[:max_tokens - total]
                out.append((d, window))
                total += len(window)
                if max_tokens is not None and total >= max_tokens:
                    return out
            more = more or end < len(ids)
        if not more:
            return out
        offset += doc_tokens


# each tokenizer's ids of the texts it has read: a study windows the same documents again for every cache key,
# budget and notebook step (04 tokenised its domains 5,000 times), and the ids are never changed in place
_TOKENISED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _token_ids(tokenizer, text: str) -> list[int]:
    try:
        seen = _TOKENISED.setdefault(tokenizer, {})
    except TypeError:           # a tokenizer that cannot be weakly referenced: tokenised every time
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if text not in seen:
        seen[text] = tokenizer(text, add_special_tokens=True)["input_ids"]
    return seen[text]


def used_documents(tokenizer, texts: list[str], *, ctx: int = 256, max_tokens: int | None = None,
                   doc_tokens: int | None = None) -> list[int]:
    """Indices of the documents whose tokens a budget takes (document_windows), in the order first used."""
    return list(dict.fromkeys(d for d, _ in document_windows(tokenizer, texts, ctx=ctx, max_tokens=max_tokens,
                                                             doc_tokens=doc_tokens)))


def tasks_record(tasks: dict, tokenizer, stats_tokens: int | None, eval_tokens: int | None, ctx: int, *,
                 doc_tokens: int | None = None) -> dict:
    """What a run reads of each text task, for its tasks.json: {task: {"source", "statistics": [doc ids],
    "evaluation": [doc ids]}}, exactly the documents whose tokens statistics and evaluation use with these
    budgets (the windowing of collect_stats and evaluate)."""
    record = {}
    for name, task in tasks.items():
        if not isinstance(task, TextTask):
            raise TypeError(f"tasks_record takes text tasks (name -> TextTask), got {type(task).__name__} for "
                            f"{name!r}")
        used = {part: used_documents(tokenizer, getattr(task, part), ctx=ctx, max_tokens=budget,
                                     doc_tokens=doc_tokens)
                for part, budget in (("collect", stats_tokens), ("evaluate", eval_tokens))}
        record[name] = {"source": task.source,
                        "statistics": [task.collect_ids[i] for i in used["collect"]],
                        "evaluation": [task.evaluate_ids[i] for i in used["evaluate"]]}
    return record


def position_weights(lengths, ctx: int, *, skip_positions=(), equal_positions: bool = False) -> torch.Tensor:
    """The weight [ctx] a token at each position of a window carries in statistics, for windows of these
    `lengths`: 0 at `skip_positions` (position 0: the attention sink, and BOS, whose neurons fire there
    whatever the text, so counting it makes a task of short windows look specific to them); 1 elsewhere, or
    with equal_positions 1 / (windows reaching that position), scaled so the weights still sum to the counted
    tokens: every position then weighs the same in a task, so how long its windows are cannot move its
    statistics, as long as some window reaches every position below ctx (a warning says where none does)."""
    n_of_length = torch.bincount(torch.as_tensor(list(lengths), dtype=torch.long).clamp(max=ctx), minlength=ctx + 1)
    reach = n_of_length.flip(0).cumsum(0).flip(0)[1:].double()          # [p]: windows longer than p tokens
    longest = int((reach > 0).sum())
    reach[[p for p in skip_positions if p < ctx]] = 0
    if not equal_positions:
        return (reach > 0).double()
    if 0 < longest < ctx:
        warnings.warn(f"no window of these documents is longer than {longest} tokens, so positions {longest} .. "
                      f"{ctx - 1} weigh in the statistics of tasks with longer documents but not here: set lm.ctx "
                      f"(ctx) to {longest} or less so that document length cannot matter", RuntimeWarning,
                      stacklevel=2)
    counted = reach > 0
    weights = torch.zeros(ctx, dtype=torch.float64)
    weights[counted] = reach.sum() / (counted.sum() * reach[counted])
    return weights


def lm_batches(tokenizer, texts: list[str], *, ctx: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               doc_tokens: int | None = None, shard: tuple[int, int] = (0, 1), with_documents: bool = False,
               skip_positions=(), equal_positions: bool = False, with_weights: bool = False,
               weights_by_position: torch.Tensor | None = None, by_length: bool = False):
    """Yield right-padded (input_ids, attention_mask) batches of the windows of `lm_windows`
    (with_documents=True: (input_ids, attention_mask, document index of each row [batch])).
    with_weights=True adds, last, each position's weight in statistics [batch, seq] (float64; 0 at padding and
    skipped positions): position_weights of all the windows, before sharding, so every rank weighs alike, or
    `weights_by_position` [ctx] where the texts are only part of what is weighed (one block of a task).
    shard=(rank, world_size) takes every world_size-th window, so the shards' union is the whole set.
    by_length=True batches the (shard's) windows longest first, so windows of a length share a batch: domains of
    short documents (fortunes) otherwise pad a batch to its longest window, 1.4-1.9x the real tokens; whatever
    counts each row by its document index and positions (statistics, evaluation, attribution) reads the same."""
    rank, world = shard
    windows, documents = lm_windows(tokenizer, texts, ctx=ctx, max_tokens=max_tokens, doc_tokens=doc_tokens,
                                    with_documents=True)
    weights = weights_by_position
    if with_weights and weights is None:
        weights = position_weights([len(w) for w in windows], ctx, skip_positions=skip_positions,
                                   equal_positions=equal_positions)
    windows, documents = windows[rank::world], documents[rank::world]
    if by_length:
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))      # stable: ties keep their order
        windows, documents = [windows[i] for i in order], [documents[i] for i in order]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(windows), batch_size):
        ids, mask = _pad(windows[start:start + batch_size], pad_id)
        out = (ids, mask)
        if with_documents:
            out += (torch.tensor(documents[start:start + batch_size], dtype=torch.long),)
        if with_weights:
            out += (mask * weights[:ids.shape[1]],)
        yield out


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
    """Normalised images [N, C, H, W] float32 with integer labels, one split. ids: a name per image (an image
    folder's file paths); None: "<split>:<index>"."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str
    ids: list[str] | None = None
    groups: dict[str, list[str]] | None = None     # the dataset's own groups of classes (tasks: groups)

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
    return ImageDataset(images, labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist/{split}",
                        groups=dict(FASHION_MNIST_GROUPS))


def image_tasks(dataset: ImageDataset, tasks: str | dict = "classes") -> dict[str, list[str]]:
    """Task name -> class names: "classes" (one task per class), "groups" (the dataset's own groups:
    Fashion-MNIST's natural groups, CIFAR-100's superclasses), or an explicit dict."""
    if tasks == "classes":
        return {c: [c] for c in dataset.class_names}
    if tasks == "groups":
        if not dataset.groups:
            raise ValueError(f"tasks='groups' needs a dataset with its own groups of classes (Fashion-MNIST, "
                             f"CIFAR-100's superclasses); {dataset.name} has none: pass a dict of task -> classes")
        return dict(dataset.groups)
    if isinstance(tasks, dict):
        unknown = sorted({c for cs in tasks.values() for c in cs} - set(dataset.class_names))
        if unknown:
            raise ValueError(f"unknown classes {unknown} in image tasks; the dataset has {dataset.class_names}")
        shared = shared_classes(tasks)
        if shared:
            raise ValueError(shared)
        return tasks
    raise ValueError(f"image tasks must be 'classes', 'groups' or a dict of task -> classes, got {tasks!r}")


def shared_classes(tasks: dict[str, list[str]]) -> str | None:
    """What is wrong when image tasks share a class (its images would be in each task's statistics and
    evaluation), or None."""
    owners = collections.defaultdict(list)
    for t, classes in tasks.items():
        for c in dict.fromkeys(classes):
            owners[c].append(t)
    shared = {c: ts for c, ts in owners.items() if len(ts) > 1}
    if not shared:
        return None
    listed = "; ".join(f"{c!r} in {', '.join(map(repr, ts))}" for c, ts in shared.items())
    return f"image tasks share classes ({listed}), so their images would be in more than one task: give each " \
           f"class to one task"


def cifar100(split: str = "train", *, processor=None, local_dir: str | None = None,
             max_images: int | None = None) -> ImageDataset:
    """CIFAR-100 (`uoft-cs/cifar100`): labelled by its 100 fine classes, which is what a CIFAR-100 classifier
    predicts, with its 20 coarse superclasses as `groups` (the paper's tasks: vit.tasks groups). A copy without
    `fine_label` is labelled by the superclasses themselves (for a 20-way model)."""
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
    if "fine_label" not in part.column_names:
        return ImageDataset(images.float(), torch.tensor(part["coarse_label"]), list(names), f"cifar100/{split}")
    fine = part.features["fine_label"].names
    superclass = dict(zip(part["fine_label"], part["coarse_label"]))      # every fine class has one superclass
    groups = {name: [fine[f] for f in sorted(superclass) if superclass[f] == c] for c, name in enumerate(names)}
    return ImageDataset(images.float(), torch.tensor(part["fine_label"]), list(fine), f"cifar100/{split}",
                        groups={name: classes for name, classes in groups.items() if classes})


# -- an image folder: one subfolder of images per class ----------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder_files(root: str | Path) -> dict[str, dict[str, list[str]]]:
    """{split: {class: [image paths relative to root, sorted]}} of an image folder, one of two layouts:
    split, when root's subfolders are exactly train/ and test/: root/train/<class>/... and root/test/<class>/...
    with the same classes; otherwise unsplit, every subfolder a class (split "all"; a class may be named train
    or test when it holds its images directly). Classes are the sorted subfolder names (hidden ones left out);
    images are found at any depth below a class folder, not entering symlinked folders, and an image file
    may be in one place only. ValueError says what is wrong and how to fix it."""
    root = Path(root)
    layout = "root/train/<class>/<image> and root/test/<class>/<image>, or root/<class>/<image>"
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist: make a folder laid out as {layout}")
    subfolders = _subfolders(root)
    splits = sorted({"train", "test"} & set(subfolders))
    if subfolders == ["test", "train"]:
        parts = {"train": root / "train", "test": root / "test"}
    elif splits and splits == subfolders:                          # only one of train/ and test/
        have, missing = splits[0], {"train": "test", "test": "train"}[splits[0]]
        raise ValueError(f"image folder {str(root)!r} has {have}/ but no {missing}/: add {missing}/<class>/<image> "
                         f"with the same classes, or, to hold out vit.eval_frac of each class's images instead, "
                         f"move the class folders of {have}/ up into {str(root)!r}")
    else:
        parts = {"all": root}
        for name in splits:
            if _subfolders(root / name):
                raise ValueError(f"image folder {str(root)!r} holds {name}/ beside other folders, so {name}/ is a "
                                 f"class, but it has subfolders, as a split layout's {name}/<class>/ would: for a "
                                 f"split layout keep only train/ and test/ in the folder; for a class named {name}, "
                                 f"put its images directly in {name}/")
    out, places = {}, {}
    for split, folder in parts.items():
        classes = _subfolders(folder)
        if not classes:
            where = "" if split == "all" else " (a folder of only train/ and test/ is split: train/<class>/<image>)"
            raise ValueError(f"image folder {str(folder)!r} has no class subfolders{where}: lay it out as {layout}")
        out[split] = {}
        for c in classes:
            files = []
            for place, _, names in _walk(folder / c, f"class folder {str(folder / c)!r}", "give it fewer images"):
                for f in names:
                    path = Path(place) / f
                    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                        files.append(path.relative_to(root).as_posix())
                        stat = path.stat()                  # one file under two names (a link): in one place only
                        other = places.setdefault((stat.st_dev, stat.st_ino), files[-1])
                        if other != files[-1]:
                            raise ValueError(f"image folder {str(root)!r}: {other} and {files[-1]} are the same file "
                                             f"(a link), so it would be in two classes or splits: keep one")
            files.sort()
            if not files:
                raise ValueError(f"class folder {str(folder / c)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                                 f"add images or remove the folder")
            out[split][c] = files
    if "test" in out and set(out["test"]) != set(out["train"]):
        only_train, only_test = sorted(out["train"].keys() - out["test"]), sorted(out["test"].keys() - out["train"])
        raise ValueError(f"image folder {str(root)!r}: train/ and test/ must hold the same classes; only in train: "
                         f"{only_train}, only in test: {only_test}")
    if "all" in out:
        small = [c for c, files in out["all"].items() if len(files) < 2]
        if small:
            raise ValueError(f"image folder {str(root)!r} has no test/ folder, so each class is split into train and "
                             f"test images, but classes {small} have fewer than 2 images: add images")
    return out


def _subfolders(folder: Path) -> list[str]:
    """The sorted names of a folder's subfolders, hidden ones left out."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder(root: str | Path, *, seed: int = 0, eval_frac: float = 0.3, processor=None,
                 image_shape: tuple[int, int, int] | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) ImageDatasets of an image folder (image_folder_files), each in a seeded shuffled order.

    Label i is the i-th class in sorted order (as torchvision's ImageFolder and datasets' imagefolder number
    them), so the model's output i must be that class. An unsplit folder's classes are each split with a
    seeded shuffle, round(eval_frac * n) (at least 1) for test. Images (open_image) go through the model's
    `processor` IMAGE_CHUNK at a time, or without one are resized to `image_shape` (C, H, W) as each is read and
    scaled to [-1, 1]. All are held in memory at that size."""
    files = image_folder_files(root)
    if "all" in files:
        rng = random.Random(seed)
        parts = {"train": {}, "test": {}}
        for c, paths in files["all"].items():
            paths = list(paths)
            rng.shuffle(paths)
            n_eval = min(len(paths) - 1, max(1, int(round(eval_frac * len(paths)))))
            parts["test"][c], parts["train"][c] = paths[:n_eval], paths[n_eval:]
        files = parts
    classes = sorted(files["train"])
    name = Path(root).resolve().name
    out = []
    for split in ("train", "test"):
        items = [(path, i) for i, c in enumerate(classes) for path in sorted(files[split][c])]
        random.Random(seed).shuffle(items)
        images = _load_images([Path(root) / path for path, _ in items], processor, image_shape)
        out.append(ImageDataset(images, torch.tensor([i for _, i in items], dtype=torch.long), classes,
                                f"{name}/{split}", [path for path, _ in items]))
    return out[0], out[1]


def _load_images(paths: list[Path], processor, image_shape) -> torch.Tensor:
    from PIL import Image
    if processor is None and image_shape is None:
        raise ValueError("loading an image folder needs the model's image processor or its image_shape (C, H, W)")
    mode = "L" if processor is None and image_shape[0] == 1 else "RGB"
    if processor is not None:             # a chunk at a time, so only IMAGE_CHUNK images are ever at full size
        out = None
        for start in range(0, len(paths), IMAGE_CHUNK):
            chunk = [open_image(path, mode) for path in paths[start:start + IMAGE_CHUNK]]
            chunk = processor(images=chunk, return_tensors="pt")["pixel_values"].float()
            out = torch.empty((len(paths), *chunk.shape[1:])) if out is None else out
            out[start:start + len(chunk)] = chunk
        return out
    _, height, width = image_shape
    out = torch.empty((len(paths), 1 if mode == "L" else 3, height, width))
    for i, path in enumerate(paths):      # resized as it is read: one image at a time at full size
        pixels = torch.from_numpy(np.asarray(open_image(path, mode).resize((width, height), Image.BILINEAR),
                                             dtype=np.float32) / 255.0)
        out[i] = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    return out.sub_(0.5).div_(0.5)


IMAGE_CHUNK = 256      # images an image processor takes at once


def open_image(path: Path, mode: str):
    """An image file as a PIL image in `mode` ("L" or "RGB"), 8 bits a channel scaled from the file's full
    scale: 8-bit modes as they are (alpha dropped, as torchvision's ImageFolder does; palettes and CMYK
    converted), 16-bit greyscale (I;16, or I from a PNG) from 65535, 32-bit float (F) from 1. ValueError, naming
    the file, for one that PIL cannot read or whose full scale is unknown (32-bit integers, floats outside [0, 1])."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
                values, scale = np.asarray(im, dtype=np.float64), 65535.0
            elif im.mode == "I":
                raise ValueError(f"image {str(path)!r} has 32-bit integer pixels, whose full scale is unknown: save it "
                                 f"with 8 or 16 bits a channel")
            elif im.mode == "F":
                values, scale = np.asarray(im, dtype=np.float64), 1.0
                if not (np.isfinite(values).all() and 0.0 <= values.min() and values.max() <= 1.0):
                    raise ValueError(f"image {str(path)!r} has float pixels outside [0, 1], whose full scale is "
                                     f"unknown: save it with 8 or 16 bits a channel, or scaled to [0, 1]")
            else:
                return im.convert(mode)
    except (OSError, SyntaxError) as err:          # PIL's errors for a file that is not a readable image
        raise ValueError(f"image {str(path)!r} cannot be read ({type(err).__name__}: {err}): replace or remove "
                         f"it") from None
    return Image.fromarray(np.round(values / scale * 255.0).astype(np.uint8)).convert(mode)
