"""The authors' released neuron scores for the real 7B models (Mistral-7B-Instruct-v0.2, Llama-7B,
and random-init versions of both), so the overlap study and the random-init control (docs/method.md §5, §6)
can be replayed offline.

Source: public repository nickypro/taker (MIT), folder examples/neuron-mapping/saved_tensors/,
commit ab2f5b74731cf048c4f97795be1d024749d0d768. One file per task, `<folder>/<task>-pile-<tag>-recent.pt`,
a torch pickle whose `ff_scores` is a float16 tensor [L, d_mlp]: mean |activation| on the task over
mean |activation| on the Pile (plus eps). Their `ff_criteria` (1% selection) is ignored: recompute it
from the scores (at least one file's is wrong).

Where the files come from, in order:
  1. `root=` if given (must hold the folder);
  2. `default_scores_dir()`: $MODSEP_PAPER_SCORES, else `shared/paper_scores` next to the repository's folder
     (<repo>/../shared/paper_scores) if it exists. A user points $MODSEP_PAPER_SCORES (or the params key
     paper_scores.dir) at the saved_tensors/ folder of a clone of the repository above (docs/method.md §13);
  3. a download cache ($MODSEP_CACHE/paper_scores or ~/.cache/modsep/paper_scores), filled from
     raw.githubusercontent.com at the pinned commit when a network is available.
Every file's SHA-256 is checked against the hashes listed in `paper_scores.sha256` (SHA256SUMS format, beside this module) before
it is unpickled; downloads are always checked.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import overlaps as ov
from .claims import Claim
from .evidence import percentile_ci, permutation_related_vs_unrelated
from .files import atomic_file
from .files import cache_dir as project_cache_dir
from .pruning import select_neurons, ties_at_threshold

REPOSITORY = "nickypro/taker"
COMMIT = "ab2f5b74731cf048c4f97795be1d024749d0d768"
SUBDIR = "examples/neuron-mapping/saved_tensors"
URL_TEMPLATE = "https://raw.githubusercontent.com/{repo}/{commit}/{subdir}/{path}"
ENV_DIR = "MODSEP_PAPER_SCORES"


def _read_sha256sums(path: Path) -> dict[str, str]:
    """{relative path: hex digest} from a file in `sha256sum` format ("<hex>  <path>" per line)."""
    digests = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            digests[rel.lstrip("*")] = digest
    return digests


SHA256 = _read_sha256sums(Path(__file__).with_name("paper_scores.sha256"))


class PaperScoresUnavailable(FileNotFoundError):
    """The released score files are not where we looked and could not be fetched."""


class ChecksumError(ValueError):
    """A score file's SHA-256 differs from the pinned release: the copy is corrupt or different."""


@dataclass(frozen=True)
class PaperScoreSet:
    folder: str          # folder under saved_tensors/
    tag: str             # the tag in the file names
    model: str           # what the scores were computed on
    trained: bool        # False: the same architecture, randomly initialised
    shape: tuple         # [n_layers, d_mlp]
    control: str | None  # the matching random-init (for a trained set) or trained set


PAPER_SCORE_SETS: dict[str, PaperScoreSet] = {
    "mistral-7b": PaperScoreSet("v0.2", "v0.2", "Mistral-7B-Instruct-v0.2", True, (32, 14336),
                                "mistral-7b-random"),
    "mistral-7b-random": PaperScoreSet("rand-mistral", "rand", "Mistral-7B architecture, random init",
                                       False, (32, 14336), "mistral-7b"),
    "llama-7b": PaperScoreSet("hf", "hf", "Llama-7B", True, (32, 11008), "llama-7b-random"),
    # the authors' folder is called rand-vit, but it holds a randomly initialised Llama-7B
    "llama-7b-random": PaperScoreSet("rand-vit", "rand", "Llama-7B architecture, random init",
                                     False, (32, 11008), "llama-7b"),
}


def _score_set(name: str) -> PaperScoreSet:
    if name not in PAPER_SCORE_SETS:
        raise ValueError(f"unknown paper score set {name!r}: choose one of {', '.join(PAPER_SCORE_SETS)}")
    return PAPER_SCORE_SETS[name]


def _file_name(spec: PaperScoreSet, task: str) -> str:
    return f"{spec.folder}/{task}-pile-{spec.tag}-recent.pt"


def available_tasks(name: str) -> list[str]:
    """The tasks the pinned release holds for a score set (alphabetical)."""
    spec = _score_set(name)
    prefix, suffix = f"{spec.folder}/", f"-pile-{spec.tag}-recent.pt"
    return sorted(p[len(prefix):-len(suffix)] for p in SHA256 if p.startswith(prefix) and p.endswith(suffix))


# ----------------------------------------------------------------------------------------------
# where the files are

def default_scores_dir() -> Path | None:
    """$MODSEP_PAPER_SCORES if set, else <repo>/../shared/paper_scores if it exists, else None. Users put the
    files (the folders v0.2/, hf/, rand-mistral/, rand-vit/) anywhere and set $MODSEP_PAPER_SCORES to it."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    shared = repo_root.parent / "shared" / "paper_scores"
    return shared if shared.is_dir() else None


def cache_dir() -> Path:
    """Download cache: $MODSEP_CACHE/paper_scores, else ~/.cache/modsep/paper_scores."""
    return project_cache_dir("paper_scores")


def _how_to_get(folder: str) -> str:
    return (f"Get the files from the public repository {REPOSITORY}, folder {SUBDIR}/{folder}/ at commit "
            f"{COMMIT} (e.g. git clone + git checkout {COMMIT[:12]}, or the raw.githubusercontent.com "
            f"URLs), then set the environment variable {ENV_DIR} to the folder holding {folder}/ "
            f"(or set the params key paper_scores.dir / pass root=).")


# ----------------------------------------------------------------------------------------------
# checksums and downloads

def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path, rel_path: str) -> None:
    """Raise ChecksumError unless `path` has the pinned SHA-256 of release file `rel_path`."""
    expected = SHA256[rel_path]
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(f"{path} has SHA-256 {actual}, but the released {rel_path} has {expected}: "
                            f"the copy is corrupt or not the pinned one. Re-copy it from {REPOSITORY}, "
                            f"{SUBDIR}/{rel_path} at commit {COMMIT}.")


def _fetch_url(url: str, dest: Path) -> None:
    """Write the bytes at `url` to `dest` (the only function that touches the network)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def download_file(rel_path: str, dest_root: Path) -> Path:
    """Fetch one release file into dest_root/rel_path, checked before it appears there.

    The bytes go to a temporary file in the same folder, are hashed, and only then renamed into
    place (atomic), so a failed or corrupt download never leaves a file that looks valid.
    """
    dest = Path(dest_root) / rel_path
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = URL_TEMPLATE.format(repo=REPOSITORY, commit=COMMIT, subdir=SUBDIR, path=rel_path)
    with atomic_file(dest, suffix=".part") as tmp:
        _fetch_url(url, tmp)
        verify_file(tmp, rel_path)      # raising here removes the temporary file: nothing is left
    return dest


def fetch_paper_scores(name: str, *, tasks: Sequence[str] | None = None, cache: Path | None = None) -> Path:
    """Download (if not cached) a score set's files into the cache; returns the cache root."""
    spec = _score_set(name)
    root = Path(cache) if cache is not None else cache_dir()
    for task in _check_tasks(name, tasks):
        rel = _file_name(spec, task)
        if not (root / rel).is_file():
            try:
                download_file(rel, root)
            except OSError as err:      # no network, DNS failure, HTTP error, ...
                raise PaperScoresUnavailable(f"could not download {rel} ({err}). {_how_to_get(spec.folder)}") from err
    return root


# ----------------------------------------------------------------------------------------------
# loading

def _check_tasks(name: str, tasks: Sequence[str] | None) -> list[str]:
    available = available_tasks(name)
    if tasks is None:
        return available
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a list of task names, got the string {tasks!r}: use [{tasks!r}]")
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(f"score set {name!r} has no tasks {unknown}; it has: {', '.join(available)}")
    return list(tasks)


def _resolve_root(name: str, root, tasks: list[str], download: bool) -> Path:
    spec = _score_set(name)
    if root is not None:
        root = Path(root).expanduser()
        if not (root / spec.folder).is_dir():
            raise PaperScoresUnavailable(f"no folder {spec.folder}/ (scores of {spec.model}) under {root}. "
                                         + _how_to_get(spec.folder))
        return root
    default = default_scores_dir()
    if default is not None and (default / spec.folder).is_dir():
        return default
    cached = cache_dir()
    if all((cached / _file_name(spec, t)).is_file() for t in tasks):
        return cached
    if not download:
        looked = f"{default}/{spec.folder}" if default is not None else f"${ENV_DIR} (unset)"
        raise PaperScoresUnavailable(f"the scores of {spec.model} ({spec.folder}/) are not in {looked} nor "
                                     f"in the cache {cached}, and download=False. " + _how_to_get(spec.folder))
    return fetch_paper_scores(name, tasks=tasks, cache=cached)


def load_paper_scores(name: str, *, root=None, tasks: Sequence[str] | None = None, verify: bool = True,
                      download: bool = True) -> dict[str, torch.Tensor]:
    """Load a released score set: {task: float32 tensor [L, d_mlp]}, in alphabetical task order
    (or the order of `tasks`).

    name: one of PAPER_SCORE_SETS ("mistral-7b", "mistral-7b-random", "llama-7b", "llama-7b-random").
    The stored scores are float16; they are returned as float32 holding exactly the same values
    (float16 ⊂ float32), so the many ties of the release are kept as they are — selection breaks
    them by index (see `tie_report`). verify=True checks every file's SHA-256 before unpickling it.
    download=False never touches the network.
    """
    spec = _score_set(name)
    tasks = _check_tasks(name, tasks)
    root = _resolve_root(name, root, tasks, download)
    missing = [_file_name(spec, t) for t in tasks if not (root / _file_name(spec, t)).is_file()]
    if missing:
        raise PaperScoresUnavailable(f"{root} lacks {len(missing)} file(s) of the release: {', '.join(missing)}. "
                                     + _how_to_get(spec.folder))
    scores = {}
    for task in tasks:
        rel = _file_name(spec, task)
        path = root / rel
        if verify:
            verify_file(path, rel)      # before torch.load: never unpickle an unchecked file
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, Mapping) or "ff_scores" not in data:
            raise ValueError(f"{path} holds no 'ff_scores': is it a file of the release?")
        ff = data["ff_scores"]
        if tuple(ff.shape) != spec.shape:
            raise ValueError(f"{path}: ff_scores has shape {tuple(ff.shape)}, expected {spec.shape} for {spec.model}")
        scores[task] = ff.to(torch.float32)
    return scores


# ----------------------------------------------------------------------------------------------
# task families (for ordering plots and related-vs-unrelated comparisons)

_FAMILIES: dict[str, tuple[str, ...]] = {
    "science": ("biology", "chemistry", "physics", "math", "pile_ArXiv", "pile_PhilPapers"),
    "medicine": ("pile_PubMed_Abstracts", "pile_PubMed_Central", "pile_NIH_ExPorter"),
    "code": ("code", "pile_Github", "pile_StackExchange", "pile_Ubuntu_IRC"),
    "web/social": ("civil", "emotion", "pile_HackerNews", "pile_Enron_Emails", "pile_Wikipedia"),
    "law/language": ("pile_FreeLaw", "pile_USPTO_Backgrounds", "pile_EuroParl", "pile_Gutenberg", "poems"),
}


def task_families() -> dict[str, list[str]]:
    """{family: [task, ...]} covering every task of the release, each task in exactly one family.

    science (camel-ai sciences, ArXiv, PhilPapers: academic writing), medicine (PubMed, NIH grants),
    code (code, GitHub, StackExchange, Ubuntu IRC: technical Q&A and chat), web/social (comments,
    emotions, HackerNews, e-mail, Wikipedia), law/language (court opinions, patents, parliament,
    books, poems).
    """
    return {family: list(tasks) for family, tasks in _FAMILIES.items()}


def ordered_tasks(tasks: Iterable[str], families: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Tasks sorted by family (in the order of `families`, default `task_families()`), then by their
    place within the family; tasks in no family come last, alphabetically."""
    families = task_families() if families is None else families
    position = {t: (f, k) for f, fam in enumerate(families.values()) for k, t in enumerate(fam)}
    last = len(families)
    return sorted(tasks, key=lambda t: position.get(t, (last, 0)) + (t,))


# ----------------------------------------------------------------------------------------------
# ties

def tie_report(scores: Mapping[str, torch.Tensor], frac: float, mode: str = "global") -> dict[str, int]:
    """{task: number of unselected neurons whose score equals the selection threshold}.

    Those neurons were left out only by the index tie-break of `select_neurons`; float16 scores
    (the release) have many. With mode="per_layer" each layer has its own threshold and the
    counts are summed over layers.
    """
    report = {}
    for task, s in scores.items():
        mask = select_neurons(s, frac, mode)
        s = s.detach().to(torch.float64)
        if mode == "global":
            report[task] = ties_at_threshold(s, mask)
        else:
            report[task] = sum(ties_at_threshold(s[l], mask[l]) for l in range(s.shape[0]))
    return report


# ----------------------------------------------------------------------------------------------
# replays used by the notebooks (02: the overlap study; 04: trained vs random init)

def replay_overlap(name: str, *, frac: float = 0.01, sweep=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2), root=None,
                   tasks: Sequence[str] | None = None) -> dict:
    """The paper's overlap study on a released score set: the task × task overlap coefficient at `frac`
    (global top-k, tasks ordered by family), the frac sweep, layer distributions of global and
    per-layer selection, related vs unrelated pairs, and the ties at each threshold."""
    scores = load_paper_scores(name, root=root, tasks=tasks)
    order = ordered_tasks(scores)
    scores = {t: scores[t] for t in order}
    masks = {t: select_neurons(s, frac, "global") for t, s in scores.items()}
    names, matrix = ov.overlap_matrix(masks, metric="overlap")
    families = {f: [t for t in ts if t in scores] for f, ts in task_families().items()}
    n_layers, d_mlp = next(iter(scores.values())).shape
    return {
        "name": name, "model": PAPER_SCORE_SETS[name].model, "frac": frac, "tasks": names, "matrix": matrix,
        "chance": float(ov.chance_overlap(int(masks[names[0]].sum()), int(masks[names[0]].sum()),
                                          n_layers * d_mlp)),
        "sweep": ov.overlap_sweep(scores, list(sweep), mode="global", metric="overlap"),
        "layers_global": {t: ov.layer_distribution(m) for t, m in masks.items()},
        "related": ov.related_vs_unrelated(matrix, names, {f: ts for f, ts in families.items() if ts}),
        "ties_global": tie_report(scores, frac, "global"),
        "ties_per_layer": tie_report(scores, frac, "per_layer"),
        "families": families,
    }


def pair_overlap(replay: dict, a: str, b: str) -> float:
    """The overlap of tasks `a` and `b` in a replay_overlap result; NaN where the score set lacks either."""
    names = replay["tasks"]
    return float(replay["matrix"][names.index(a), names.index(b)]) if a in names and b in names else float("nan")


def replay_random_control(trained: str, *, fracs=(0.01, 0.05), root=None, n_perm: int = 1000,
                          seed: int = 0) -> dict:
    """Trained vs random-init on a released pair of score sets (docs/method.md §6), over the tasks both have:
    pairwise overlaps at each frac, pattern persistence (Spearman between the two task × task overlap
    matrices with a permutation p-value), and where the global selections sit per layer."""

    random_name = PAPER_SCORE_SETS[trained].control
    if random_name is None or PAPER_SCORE_SETS[trained].trained is False:
        raise ValueError(f"{trained!r} is not a trained score set with a random-init control")
    tasks = ordered_tasks(sorted(set(available_tasks(trained)) & set(available_tasks(random_name))))
    sets = {"trained": load_paper_scores(trained, root=root, tasks=tasks),
            "random": load_paper_scores(random_name, root=root, tasks=tasks)}
    out = {"trained": trained, "random": random_name, "model": PAPER_SCORE_SETS[trained].model, "tasks": tasks,
           "fracs": list(fracs), "pairs": {}, "matrices": {}, "layers": {}, "ties": {}, "persistence": {}}
    iu = np.triu_indices(len(tasks), 1)
    for frac in fracs:
        for which, scores in sets.items():
            masks = {t: select_neurons(s, frac, "global") for t, s in scores.items()}
            names, m = ov.overlap_matrix(masks, metric="overlap")
            out["matrices"][(which, frac)] = m
            out["pairs"][(which, frac)] = m[iu]
            out["layers"][(which, frac)] = np.mean([ov.layer_distribution(mk) for mk in masks.values()], 0)
            out["ties"][(which, frac)] = tie_report(scores, frac, "global")
        out["persistence"][frac] = ov.pattern_persistence(out["matrices"][("trained", frac)],
                                                          out["matrices"][("random", frac)], n_perm=n_perm, seed=seed)
    return out


def related_claim(replay: dict, n_perm: int, seed: int):
    """02's `related_share_more` test on a released score set (replay_overlap's result), as its own claim
    `related_share_more[<name>]`: within- minus across-family overlap of the top sets, family labels permuted over
    tasks (evidence.permutation_related_vs_unrelated). Estimate: the difference's excess over the permutation
    null's mean; interval: a leave-one-task-out jackknife of the difference (the release has one score per task,
    no documents to resample), shifted by that mean; the record keeps the difference and the null's band apart."""
    names, matrix = replay["tasks"], np.asarray(replay["matrix"], dtype=np.float64)
    groups = {f: ts for f, ts in replay["families"].items() if ts}
    test = permutation_related_vs_unrelated(matrix, names, groups, n_perm, seed)
    left_out = []
    for k, t in enumerate(names):             # the jackknife: each task left out in turn
        keep = [i for i in range(len(names)) if i != k]
        r = ov.related_vs_unrelated(matrix[np.ix_(keep, keep)], [names[i] for i in keep],
                                    {f: [u for u in ts if u != t] for f, ts in groups.items()})
        left_out.append(r["within"] - r["across"])
    left_out = np.array(left_out)
    n = len(left_out)
    se = float(np.sqrt((n - 1) / n * np.sum((left_out - left_out.mean()) ** 2)))
    diff, shift = test["difference"], float(np.mean(test["null"]))
    ci = (diff - 1.96 * se, diff + 1.96 * se)
    return Claim(f"related_share_more[{replay['name']}]", f"{replay['model']} (the authors' released scores, retain: "
                 f"the Pile): related tasks (the same family) share more neurons than unrelated ones (within- minus "
                 f"across-family overlap at top {replay['frac']:.0%}, excess over the same with family labels permuted; "
                 f"interval: jackknife over tasks)", diff - shift, (ci[0] - shift, ci[1] - shift), 0.0, p=test["p"],
                 n=len(names), unit="tasks", test="permutation of family labels", p_floor=test["p_floor"],
                 floor_n=test["floor_n"], observed=diff, observed_ci=ci, null_band=percentile_ci(test["null"]),
                 null_values=np.asarray(test["null"]))
