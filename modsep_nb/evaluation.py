"""Evaluation (SPEC §4): accuracy of LMs and image models, and the cross-task matrix.

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

from .pruning import ablate, select_neurons
from .batches import run_batches
from .data import images_and_labels, lm_batches


def lm_token_metrics(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     bos_token_id=None, skip_tokens: torch.Tensor | None = None, topk: int = 10,
                     per_row: bool = False) -> dict:
    """Sums over one batch: counted targets, top-1 hits, top-k hits, summed cross-entropy (float64).
    per_row=True adds "rows": counted targets and top-1 hits of each row (window) [batch], int64."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    counted = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    if bos_token_id is not None:
        counted &= targets != bos_token_id
    if skip_tokens is not None and skip_tokens.numel():
        counted &= ~torch.isin(targets, skip_tokens.to(targets.device))
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


def frequent_targets(tokenizer, texts, n: int, *, ctx=256, max_tokens=None) -> torch.Tensor:
    """The domain's n most frequent target tokens (the reference skipped the top 50)."""
    counts: dict[int, int] = {}
    for ids, mask in lm_batches(tokenizer, texts, ctx=ctx, batch_size=64, max_tokens=max_tokens):
        vals, cnt = torch.unique(ids[:, 1:][mask[:, 1:].bool()], return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    top = sorted(counts, key=lambda t: (-counts[t], t))[:n]
    return torch.tensor(top, dtype=torch.long)


@torch.no_grad()
def evaluate(handle, data, *, labels=None, max_tokens=None, batch_size=None, ctx=256, skip_top: int = 0,
             classes=None, progress=False, per_document: bool = False) -> dict:
    """Metrics of the model on `data` (SPEC §4, §11).

    LM (data: list[str]): top1, top10, loss (mean cross-entropy), perplexity = exp(loss), n targets.
    Image (data: ImageDataset, a dataset of (image, label) items, or a tensor with `labels`): top1, top5,
    per_class top1, and, when `classes` is given, accuracy restricted to images of those classes.
    per_document=True adds "documents": {"n", "top1"} int64 arrays, one entry per document read (LM:
    counted targets and top-1 hits; images: 1 and the top-1 hit of each image, plus "labels"), so the
    accuracy over any resample of documents is a ratio of sums (evidence.py) without another pass.
    """
    if handle.kind == "lm":
        skip = frequent_targets(handle.tokenizer, data, skip_top, ctx=ctx, max_tokens=max_tokens) if skip_top else None
        totals = {"n": 0, "top1": 0, "top10": 0, "ce": 0.0}
        bos = handle.tokenizer.bos_token_id
        per_doc = {"n": np.zeros(len(data), dtype=np.int64), "top1": np.zeros(len(data), dtype=np.int64)}

        def add(logits, ids, mask, docs=None):
            m = lm_token_metrics(logits, ids, mask, bos_token_id=bos, skip_tokens=skip, topk=10,
                                 per_row=per_document)
            for k in totals:
                totals[k] += m[k]
            if per_document:
                for k in per_doc:
                    np.add.at(per_doc[k], docs.numpy(), m["rows"][k].numpy())
        run_batches(handle, data, None, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                    progress=progress, desc="evaluate", on_logits=add, documents=per_document)
        n = totals["n"]
        if n == 0:
            raise ValueError("no target tokens to evaluate: the data is empty or too short")
        loss = totals["ce"] / n
        out = {"top1": totals["top1"] / n, "top10": totals["top10"] / n, "loss": loss,
               "perplexity": math.exp(loss), "n": n}
        if per_document:
            read = int(np.flatnonzero(per_doc["n"]).max()) + 1     # documents past the budget were not read
            out["documents"] = {k: v[:read] for k, v in per_doc.items()}
        return out
    return _evaluate_images(handle, data, labels=labels, batch_size=batch_size, classes=classes, progress=progress,
                            per_document=per_document)


def _evaluate_images(handle, data, *, labels=None, batch_size=None, classes=None, progress=False,
                     per_document=False) -> dict:
    images, own_labels, class_names = images_and_labels(data)
    labels = own_labels if labels is None else torch.as_tensor(labels, dtype=torch.long)
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
    preds = []

    def add(logits, start):
        preds.append(logits.float().topk(5, dim=-1).indices.cpu())
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
    """M[A, B] = acc_B(pruned for A) / acc_B(unpruned); `fracs[A]` the fraction pruned for A."""
    tasks: list[str]
    matrix: np.ndarray
    base: dict
    pruned: np.ndarray
    fracs: dict
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Per pruned task A: its own relative accuracy M[A, A] and the others' mean M[A, B≠A]; their means over
        tasks, and selectivity = others − own (positive: pruning A's neurons hurts A more than the rest)."""
        own, others = own_and_others(self.matrix)
        return {"own": dict(zip(self.tasks, own.tolist())), "others": dict(zip(self.tasks, others.tolist())),
                "own_mean": float(own.mean()), "own_min": float(own.min()), "others_mean": float(others.mean()),
                "selectivity": float(selectivity(self.matrix))}


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
                      base: dict | None = None, progress=True) -> CrossTaskResult:
    """Prune each task A's top neurons and measure every task B (SPEC §4).

    scores: task -> [L, d_mlp] scores (see task_scores). evaluators: task -> callable() giving that task's
    accuracy of the model as it currently is (inside the ablation), or one callable() -> {task: accuracy}
    when all tasks come out of one pass (images). Give either `frac` (fixed) or `target` (bisection per A
    on frac in (0, max_frac] until acc_A is within `tol` × unpruned of target × unpruned). means (ablation
    "mean"): [L, d_mlp] for every task, or a dict task -> [L, d_mlp] (e.g. each task's retain-set mean).
    """
    if (frac is None) == (target is None):
        raise ValueError("give exactly one of frac (a fixed fraction) or target (e.g. 0.8 of unpruned accuracy)")
    if target is not None and not 0.0 < target < 1.0:
        raise ValueError(f"target must be strictly between 0 and 1, got {target}")
    tasks = list(scores)
    if callable(evaluators):
        evaluate_all, evaluate_one = evaluators, (lambda t: evaluators()[t])
    else:
        missing = sorted(set(tasks) - set(evaluators))
        if missing:
            raise ValueError(f"no evaluator for tasks {missing}")
        evaluate_all = lambda: {t: evaluators[t]() for t in tasks}  # noqa: E731
        evaluate_one = lambda t: evaluators[t]()  # noqa: E731
    base = dict(base) if base else {}
    if any(t not in base for t in tasks):
        base.update({t: v for t, v in evaluate_all().items() if t not in base})
    pruned = np.zeros((len(tasks), len(tasks)))
    fracs = {}
    for i, a in enumerate(tqdm(tasks, desc="cross-task", disable=not progress, leave=False)):
        f = frac if frac is not None else _bisect_frac(handle, scores[a], lambda: evaluate_one(a), base[a], target,
                                                        mode=mode, ablation=ablation, means=_means_for(means, a),
                                                        max_frac=max_frac, tol=tol, max_steps=max_steps)
        fracs[a] = f
        with ablate(handle, select_neurons(scores[a], f, mode), ablation, _means_for(means, a)):
            accs = evaluate_all()
        pruned[i] = [accs[b] for b in tasks]
    base_row = np.array([base[t] for t in tasks])
    with np.errstate(divide="ignore", invalid="ignore"):
        matrix = pruned / base_row[None, :]
    return CrossTaskResult(tasks, matrix, base, pruned, fracs,
                           {"frac": frac, "target": target, "mode": mode, "ablation": ablation})


def _means_for(means, task):
    """Mean ablation's fill values for `task`: one tensor for every task, or a dict task -> tensor."""
    return means[task] if isinstance(means, dict) else means


def _bisect_frac(handle, scores, evaluate_a, base_a, target, *, mode, ablation, means, max_frac, tol, max_steps):
    """Bisection on frac: accuracy falls (roughly monotonically) as more of A's neurons are pruned."""
    goal = target * base_a
    lo, hi = 0.0, max_frac

    def acc_at(f):
        with ablate(handle, select_neurons(scores, f, mode), ablation, means):
            return evaluate_a()
    if acc_at(hi) > goal:       # even the largest fraction does not bring it down: report the bound
        return hi
    best = hi
    for _ in range(max_steps):
        mid = (lo + hi) / 2
        acc = acc_at(mid)
        if abs(acc - goal) <= tol * base_a:
            return mid
        if acc > goal:
            lo = mid
        else:
            hi = best = mid
    return best
