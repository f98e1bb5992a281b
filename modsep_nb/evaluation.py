"""Evaluation (docs/method.md §4): accuracy of LMs and image models, and the cross-task matrix.

LM metrics are computed over real next-token targets only (never padding, never BOS), batched, with
perplexity = exp(mean cross-entropy) — the reference averaged exp per token, which is not perplexity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import BlockTape
from .pruning import ablate, first_layer, select_neurons
from .batches import run_batches
from .data import images_and_labels, lm_batches
from .statistics import shard_of


def lm_token_metrics(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     bos_token_id=None, skip_tokens: torch.Tensor | None = None, topk: int = 10,
                     per_row: bool = False, top1_only: bool = False, top1=None) -> dict:
    """Sums over one batch: counted targets, top-1 hits, top-k hits, summed cross-entropy (float64).
    per_row=True adds "rows": counted targets and top-1 hits of each row (window) [batch], int64.
    top1_only=True gives "n", "top1" and "finite" only, from one max over the vocabulary in the logits' own
    dtype (no float copy, no softmax, no top-k): what an ablation matrix reads, where the rest is wasted work.
    top1 (with top1_only): rows [n, d_model] -> (largest logit, its token) [n] (ModelHandle.top1); `logits` are
    then the output embedding's inputs [batch, tokens, d_model], read only at the counted positions."""
    targets = input_ids[:, 1:]
    counted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if bos_token_id is not None:
        counted &= targets != bos_token_id
    if skip_tokens is not None and skip_tokens.numel():
        counted &= ~torch.isin(targets, skip_tokens.to(targets.device))
    if top1_only:
        # max propagates NaN and +inf, so a finite maximum of every counted row is the check CE gave before
        rows = logits[:, :-1][counted]
        best, top = top1(rows) if top1 is not None else rows.max(-1)
        targets = targets[counted]
        hit = top == targets
        out = {"n": int(len(targets)), "top1": int(hit.sum()), "finite": bool(torch.isfinite(best).all())}
        if per_row:
            row = torch.nonzero(counted)[:, 0]
            out["rows"] = {"n": torch.bincount(row, minlength=len(counted)).cpu(),
                           "top1": torch.bincount(row, weights=hit.double(), minlength=len(counted)).long().cpu()}
        return out
    logits = logits[:, :-1].float()
    logits, targets = logits[counted], targets[counted]
    ce = F.cross_entropy(logits, targets, reduction="sum") if len(targets) else logits.new_zeros(())
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices if len(targets) else targets[:, None]
    hits = top == targets[:, None]
    out = {}
    if per_row:
        row = torch.nonzero(counted)[:, 0]
        out["rows"] = {"n": torch.bincount(row, minlength=len(counted)).cpu(),
                       "top1": torch.bincount(row, weights=hits[:, 0].double(), minlength=len(counted)).long().cpu()}
    return out | {"n": int(len(targets)), "top1": int(hits[:, 0].sum()) if len(targets) else 0,
            f"top{topk}": int(hits.any(-1).sum()) if len(targets) else 0, "ce": float(ce.double())}


def frequent_targets(tokenizer, texts, n: int, *, ctx=256, max_tokens=None, doc_tokens=None) -> torch.Tensor:
    """The domain's n most frequent target tokens (the reference skipped the top 50)."""
    counts: dict[int, int] = {}
    for ids, mask in lm_batches(tokenizer, texts, ctx=ctx, batch_size=64, max_tokens=max_tokens,
                                doc_tokens=doc_tokens):
        vals, cnt = torch.unique(ids[:, 1:][mask[:, 1:].bool()], return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    top = sorted(counts, key=lambda t: (-counts[t], t))[:n]
    return torch.tensor(top, dtype=torch.long)


def check_finite_logits(finite: bool, task: str | None, dtype) -> None:
    """Refuse NaN or infinite logits (a float16 overflow): the metrics read from them would be silently wrong."""
    if not finite:
        raise FloatingPointError(
            f"evaluation{' of task ' + repr(task) if task else ''}: the model's logits are NaN or infinite (its "
            f"dtype is {str(dtype).removeprefix('torch.')}; float16 overflows): run it in float32 or bfloat16 "
            f"(params: dtype, or lm.dtype / vit.dtype)")


@torch.no_grad()
def evaluate(handle, data, *, labels=None, max_tokens=None, batch_size=None, ctx=256, skip_top: int = 0,
             classes=None, progress=False, doc_tokens=None, per_document: bool = False, task: str | None = None,
             top1_only: bool = False) -> dict:
    """Metrics of the model on `data` (docs/method.md §4, §11).

    LM (data: list[str]): top1, top10, loss (mean cross-entropy), perplexity = exp(loss), n targets; the
    windows of collect_stats (at most `max_tokens` real tokens, `doc_tokens` per document per round).
    Image (data: ImageDataset, a dataset of (image, label) items, or a tensor with `labels`): top1, top5,
    per_class top1, and, when `classes` is given, accuracy restricted to images of those classes.
    per_document=True adds "documents": {"n", "top1"} int64 arrays, one entry per document read (LM:
    counted targets and top-1 hits; images: 1 and the top-1 hit of each image, plus "labels"), so the
    accuracy over any resample of documents is a ratio of sums (evidence.py) without another pass.
    task: named in the error raised when the logits are NaN or infinite (never a number read from them).
    top1_only=True (LM): top1 and n only (and "documents"), without the cross-entropy and top-10 over the
    vocabulary, for passes that read only top-1 hits (the ablation matrices); the same top1 numbers.
    """
    if handle.kind == "lm":
        skip = (frequent_targets(handle.tokenizer, data, skip_top, ctx=ctx, max_tokens=max_tokens,
                                 doc_tokens=doc_tokens) if skip_top else None)
        totals = {"n": 0, "top1": 0} if top1_only else {"n": 0, "top1": 0, "top10": 0, "ce": 0.0}
        bos = handle.tokenizer.bos_token_id
        per_doc = {"n": np.zeros(len(data), dtype=np.int64), "top1": np.zeros(len(data), dtype=np.int64)}

        # top-1 alone: from the last hidden states, a slice of the vocabulary at a time, where the model allows
        top1 = handle.top1 if top1_only and handle.unembedding is not None else None

        def add(logits, ids, mask, docs=None):
            m = lm_token_metrics(logits, ids, mask, bos_token_id=bos, skip_tokens=skip, topk=10,
                                 per_row=per_document, top1_only=top1_only, top1=top1)
            check_finite_logits(m["finite"] if top1_only else math.isfinite(m["ce"]), task, handle.dtype)
            for k in totals:
                totals[k] += m[k]
            if per_document:
                for k in per_doc:
                    np.add.at(per_doc[k], docs.numpy(), m["rows"][k].numpy())
        run_batches(handle, data, None, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                    progress=progress, desc="evaluate", on_logits=add, doc_tokens=doc_tokens,
                    documents=per_document, head_input=top1 is not None)
        n = totals["n"]
        if n == 0:
            raise ValueError("no target tokens to evaluate: the data is empty or too short")
        if top1_only:
            out = {"top1": totals["top1"] / n, "n": n}
        else:
            loss = totals["ce"] / n
            out = {"top1": totals["top1"] / n, "top10": totals["top10"] / n, "loss": loss,
                   "perplexity": math.exp(loss) if loss < 709 else math.inf, "n": n}     # exp overflows past 709
        if per_document:
            read = int(np.flatnonzero(per_doc["n"]).max()) + 1     # documents past the budget were not read
            out["documents"] = {k: v[:read] for k, v in per_doc.items()}
        return out
    return _evaluate_images(handle, data, labels=labels, batch_size=batch_size, classes=classes, progress=progress,
                            per_document=per_document, task=task)


def _evaluate_images(handle, data, *, labels=None, batch_size=None, classes=None, progress=False,
                     per_document=False, task=None) -> dict:
    images, own_labels, class_names = images_and_labels(data)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class ids [N], got dtype {labels.dtype}")
        labels = labels.long()
    else:
        labels = own_labels
    if labels is None:
        raise ValueError("evaluating images needs their labels: pass an ImageDataset, a dataset of "
                         "(image, label) items, or labels=[N]")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if classes is not None:
        if class_names is None and any(isinstance(c, str) for c in classes):
            raise ValueError("classes given by name need an ImageDataset (which knows the names); pass class ids")
        ids = [class_names.index(c) if isinstance(c, str) else int(c) for c in classes]
        keep = torch.isin(labels, torch.tensor(ids))
        images, labels = images[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError(f"no images to evaluate{' for task ' + repr(task) if task else ''}"
                         f"{' of classes ' + str(list(classes)) if classes is not None else ''}: an accuracy over "
                         f"no images is undefined; give it test images (e.g. raise vit.eval_images)")
    preds = []

    def add(logits, start):
        check_finite_logits(bool(torch.isfinite(logits).all()), task, handle.dtype)
        if int(labels.max()) >= logits.shape[-1]:
            raise ValueError(f"labels go up to {int(labels.max())} but the model scores {logits.shape[-1]} classes: "
                             f"output i must be class i (see models.check_outputs)")
        # top-5, or every output of a model with fewer
        preds.append(logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())
    run_batches(handle, images, None, batch_size=batch_size, progress=progress, desc="evaluate", on_logits=add)
    top5 = torch.cat(preds)
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(-1)
    per_class = {}
    for c in labels.unique().tolist():
        name = class_names[c] if class_names else c
        per_class[name] = float(hit1[labels == c].float().mean())
    out = {"top1": float(hit1.float().mean()), "top5": float(hit5.float().mean()), "per_class": per_class,
           "n": len(labels)}
    if per_document:
        out["documents"] = {"n": np.ones(len(labels), dtype=np.int64), "top1": hit1.long().numpy(),
                            "labels": labels.numpy()}
    return out


# -- the cross-task matrix ---------------------------------------------------------------------------
@dataclass
class CrossTaskResult:
    """M[A, B] = acc_B(pruned for A) / acc_B(unpruned); `fracs[A]` the fraction pruned for A.

    converged[A]: with a `target`, whether the bisection brought A to within `tol` of it (False: the
    target was never reached, even at `max_frac`, or the steps ran out); None with a fixed `frac`
    (there is no target). reached[A]: A's own relative accuracy at `fracs[A]` (= matrix[A, A]).
    random_pruned [n_seeds, A, B]: acc_B when as many random neurons as A's, with the same count in
    every layer, are ablated instead (one random set per seed, see matched_random_mask);
    random_matrix [A, B]: their mean over seeds relative to the unpruned accuracy. Both None when no
    random_seeds were given.
    """
    tasks: list[str]
    matrix: np.ndarray
    base: dict
    pruned: np.ndarray
    fracs: dict
    settings: dict = field(default_factory=dict)
    converged: dict = field(default_factory=dict)
    reached: dict = field(default_factory=dict)
    random_pruned: np.ndarray | None = None
    random_matrix: np.ndarray | None = None
    documents: dict | None = None       # fixed frac, evaluators giving hits: {"base", "pruned", "random"} hits

    def not_converged(self) -> list[str]:
        """Tasks whose bisection never reached the target (empty with a fixed frac)."""
        return [t for t in self.tasks if self.converged.get(t) is False]

    def selectivity(self) -> dict:
        """Per pruned task A (arrays in the order of `tasks`), all accuracies relative to unpruned:

        own: M[A, A]; others: mean of M[A, B] over B != A; selectivity = others - own.
        random_own, random_others, random_selectivity: the same under the matched random ablation.
        own_vs_random = own / random_own and others_vs_random = mean over B != A of
        M[A, B] / random_M[A, B]: below 1, pruning A's neurons hurts more than random neurons do.
        The random entries are nan when the matrix was computed without random_seeds.
        """
        n = len(self.tasks)
        if n < 2:
            raise ValueError("selectivity needs at least two tasks (own vs others)")
        off = ~np.eye(n, dtype=bool)
        own, others = own_and_others(self.matrix)
        rand = self.random_matrix if self.random_matrix is not None else np.full((n, n), np.nan)
        random_own, random_others = own_and_others(rand)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = self.matrix / rand
        return {"tasks": list(self.tasks), "own": own, "others": others, "selectivity": others - own,
                "random_own": random_own, "random_others": random_others,
                "random_selectivity": random_others - random_own,
                "own_vs_random": np.diag(ratio).copy(),
                "others_vs_random": np.array([ratio[i, off[i]].mean() for i in range(n)])}


def matched_random_mask(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """A random bool mask with exactly as many neurons in every layer as `mask` [L, d_mlp] has.

    The baseline for an ablation: the same number of neurons, in the same layers, but not chosen by
    any score. Seeded (the same seed and mask give the same result); layers are drawn independently.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor [n_layers, d_mlp], got {mask.dtype} {tuple(mask.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    counts = mask.sum(1).tolist()
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for layer, k in enumerate(counts):
        out[layer, torch.randperm(mask.shape[1], generator=gen)[:k]] = True
    return out.to(mask.device)


def own_and_others(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per pruned task A (rows, over any leading axes of [..., T, T]): M[A, A] and the mean of M[A, B≠A]."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[-1]
    own = np.diagonal(matrix, axis1=-2, axis2=-1)
    others = (matrix.sum(-1) - own) / (n - 1)
    return own, others


def selectivity(matrix):
    """Mean over tasks of (others' relative accuracy − own) for a cross-task matrix [..., T, T]: positive when
    pruning a task's neurons hurts that task more than the rest."""
    own, others = own_and_others(matrix)
    return others.mean(-1) - own.mean(-1)


def cross_task_matrix(handle, scores: dict, evaluators, *, frac: float | None = None,
                      target: float | None = None, mode="global", ablation="zero", means=None,
                      max_frac: float = 0.2, tol: float = 0.02, max_steps: int = 12,
                      random_seeds=(), base: dict | None = None, progress=True,
                      distributed: bool | None = None) -> CrossTaskResult:
    """Prune each task A's top neurons and measure every task B (docs/method.md §4).

    scores: task -> [L, d_mlp] scores (see task_scores). evaluators: task -> callable() giving that task's
    accuracy of the model as it currently is (inside the ablation), or one callable() -> {task: accuracy}
    when all tasks come out of one pass (images). Give either `frac` (fixed) or `target` (bisection per A
    on frac in (0, max_frac] until acc_A is within `tol` × unpruned of target × unpruned). means (ablation
    "mean"): [L, d_mlp] for every task, or a dict task -> [L, d_mlp] (e.g. each task's retain-set mean).
    random_seeds: for each seed and each A, also ablate a random set with A's count per layer
    (matched_random_mask(mask_A, seed)) and measure every task: the baseline that tells damage specific
    to A's neurons from damage that removing that many neurons does anyway (see CrossTaskResult).
    Tasks with equal per-layer counts (e.g. mode='per_layer' at a fixed frac) share the random set of a
    seed, which is then measured once.
    distributed: under torchrun (default: when torch.distributed is initialised) rank r measures the rows
    (pruned tasks) r, r + world, ... (and the unpruned accuracies of tasks r, r + world, ... not in `base`), and
    every rank returns the whole result, the one process's.
    """
    if (frac is None) == (target is None):
        raise ValueError("give exactly one of frac (a fixed fraction) or target (e.g. 0.8 of unpruned accuracy)")
    if target is not None and not 0.0 < target < 1.0:
        raise ValueError(f"target must be strictly between 0 and 1, got {target}")
    random_seeds = [int(s) for s in random_seeds]
    if len(set(random_seeds)) != len(random_seeds):
        raise ValueError(f"random_seeds must be distinct, got {random_seeds}")
    tasks = list(scores)
    if callable(evaluators):
        raw_all = evaluators
    else:
        missing = sorted(set(tasks) - set(evaluators))
        if missing:
            raise ValueError(f"no evaluator for tasks {missing}")
        raw_all = lambda: {t: evaluators[t]() for t in tasks}  # noqa: E731
    raw_one = (lambda t: raw_all()[t]) if callable(evaluators) else (lambda t: evaluators[t]())  # noqa: E731
    # a fixed fraction's rows read every task alike (raw_all): the blocks below a set's first layer replay from the
    # rows before (an image model's sets start in layers 0-2 of 6; a language model's in layer 0: nothing to replay)
    tape = BlockTape()
    below = first_layer if frac is not None else (lambda m: 0)     # noqa: E731
    rank, world = shard_of(distributed)
    base = dict(base) if base else {}       # accuracies, or per-document hits as the evaluators give them
    missing = [t for t in tasks if t not in base]
    if missing and callable(evaluators):    # one pass gives every task: splitting it would save nothing
        with tape.replay(handle, below=handle.n_layers if frac is not None else 0):   # every block, for the rows
            base.update({t: v for t, v in raw_all().items() if t not in base})
    elif missing:                           # torchrun: rank r measures every world-th missing task, then all share
        measured = _gathered({t: evaluators[t]() for t in missing[rank::world]}, world)
        base.update({t: measured[t] for t in missing})
    keep = frac is not None and all(_is_hits(base[t]) for t in tasks)
    documents = {"base": {t: base[t] for t in tasks}, "pruned": {}, "random": [{} for _ in random_seeds]} if keep else None
    base = {t: accuracy_of(v) for t, v in base.items()}
    pruned = np.zeros((len(tasks), len(tasks)))
    random_pruned = np.zeros((len(random_seeds), len(tasks), len(tasks)))
    fracs, converged, reached = {}, {}, {}
    seen_random: dict = {}      # equal per-layer counts and seed give the same random set: measure it once
    rows = {}                   # per pruned task: (frac, converged, reached, raw, raw of each random seed)
    for a in tqdm(tasks[rank::world], desc="cross-task", disable=not progress or rank > 0, leave=False):
        means_a = _means_for(means, a)
        if frac is not None:
            f, done, got = frac, None, None
        else:
            tried = {}          # the bisection's own-task results by fraction: the row reuses the one at f
            f, done, got = _bisect_frac(
                handle, scores[a], lambda: raw_one(a), base[a], target, mode=mode, ablation=ablation,
                means=means_a, max_frac=max_frac, tol=tol, max_steps=max_steps, tried=tried)
        mask = select_neurons(scores[a], f, mode)
        with ablate(handle, mask, ablation, means_a), tape.replay(handle, below=below(mask)):
            if frac is None and not callable(evaluators) and f in tried:     # task a at f: the bisection's pass
                raw = {t: tried[f] if t == a else evaluators[t]() for t in tasks}
            else:
                raw = raw_all()
        randoms = []
        for seed in random_seeds:
            key = (seed, tuple(mask.sum(1).tolist()), a if isinstance(means, dict) else None)
            if key not in seen_random:
                random_mask = matched_random_mask(mask, seed)
                with ablate(handle, random_mask, ablation, means_a), tape.replay(handle, below=below(random_mask)):
                    seen_random[key] = raw_all()
            randoms.append(seen_random[key])
        rows[a] = (f, done, got, raw, randoms)
    rows = _gathered(rows, world)       # torchrun: each rank measured every world-th row
    for i, a in enumerate(tasks):
        fracs[a], converged[a], reached[a], raw, randoms = rows[a]
        pruned[i] = [accuracy_of(raw[b]) for b in tasks]
        if frac is not None:
            reached[a] = pruned[i, i] / base[a] if base[a] else float("nan")
        for s, r in enumerate(randoms):
            random_pruned[s, i] = [accuracy_of(r[b]) for b in tasks]
        if documents:
            documents["pruned"][a] = raw
            for s, r in enumerate(randoms):
                documents["random"][s][a] = r
    base_row = np.array([base[t] for t in tasks])
    with np.errstate(divide="ignore", invalid="ignore"):
        matrix = pruned / base_row[None, :]
        random_matrix = (random_pruned / base_row[None, None, :]).mean(0) if random_seeds else None
    return CrossTaskResult(tasks, matrix, base, pruned, fracs,
                           {"frac": frac, "target": target, "mode": mode, "ablation": ablation,
                            "random_seeds": random_seeds},
                           converged, reached, random_pruned if random_seeds else None, random_matrix, documents)


def _gathered(part: dict, world: int) -> dict:
    """Every rank's `part` in one dict (torch.distributed; world 1: `part` itself)."""
    if world == 1:
        return part
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _is_hits(value) -> bool:
    return isinstance(value, dict) and "top1" in value and "n" in value


def accuracy_of(value) -> float:
    """An evaluator's answer as an accuracy: a number as it is, per-document hits as Σtop1 / Σn."""
    if _is_hits(value):
        n = float(np.sum(value["n"]))
        return float(np.sum(value["top1"])) / n if n else float("nan")
    return float(value)


def _means_for(means, task):
    """Mean ablation's fill values for `task`: one tensor for every task, or a dict task -> tensor."""
    return means[task] if isinstance(means, dict) else means


def bisection_evaluations(n_tasks: int, max_steps: int) -> int:
    """The most evaluations of one task a cross-task matrix by bisection costs (unpruned accuracies given): per task
    the bound and up to max_steps bisection steps on its own evaluation, then its row over every task."""
    return n_tasks * (1 + max_steps) + n_tasks * n_tasks


def _bisect_frac(handle, scores, raw_a, base_a, target, *, mode, ablation, means, max_frac, tol, max_steps,
                 tried: dict | None = None):
    """Bisection on frac: accuracy falls (roughly monotonically) as more of A's neurons are pruned.
    raw_a: A's evaluator (an accuracy, or what accuracy_of reads); tried: filled with {frac: its result} of every
    fraction measured.

    Returns (frac, converged, reached): converged is True when acc_A at frac is within tol × base_a of
    target × base_a; otherwise frac is max_frac (the target is out of reach) or the smallest fraction
    tried that fell below the target (the steps ran out). reached = acc_A(frac) / base_a.
    A task the unpruned model never gets right (base_a 0) has no fraction to find: max_frac, not converged, nan.
    """
    if not base_a > 0:
        return max_frac, False, float("nan")
    goal, slack = target * base_a, tol * base_a
    lo, hi = 0.0, max_frac

    def acc_at(f):
        with ablate(handle, select_neurons(scores, f, mode), ablation, means):
            raw = raw_a()
        if tried is not None:
            tried[f] = raw
        return accuracy_of(raw)
    acc_hi = acc_at(hi)
    if acc_hi > goal - slack:   # within tol at the bound, or it does not even come down that far
        return hi, acc_hi <= goal + slack, acc_hi / base_a
    best, acc_best = hi, acc_hi
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        acc = acc_at(mid)
        if abs(acc - goal) <= slack:
            return mid, True, acc / base_a
        if acc > goal:
            lo = mid
        else:
            hi, best, acc_best = mid, mid, acc
    return best, False, acc_best / base_a
