"""Neurons you can look at: for a few chosen neurons, the inputs that activate them most (tokens in context
for a language model, patches over the image for a ViT) and their activation distribution on every task.

One more pass over each task's statistics data, reading only the chosen neurons: per (neuron, task) a running
top-k of the counted positions (of the images, each at its best token, for a ViT; ties broken by position: the
earlier wins), each kept with its context, and a histogram with fixed bins. Memory is O(neurons x tasks x k), whatever the amount of data.

    shown = study.neuron_examples(masks, scores=scores)     # pick_neurons + collect_examples
    neurons.export(shown, out_dir)                          # neurons/<kind>-<task>.html and PNGs
    neurons.explorer(shown);                                # ipywidgets in JupyterLab, shown; None headless

Per neuron the pages also show what it does: its direct effect on the outputs (direct_effects: its output
direction read through the final norm's weight and the unembedding or classifier head) and, for the top
neurons of each task, its ablation effect (ablation_effects: each task's accuracy with that neuron zeroed).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatter
import torch

from .batches import _n_image_tokens, run_batches
from .data import images_and_labels
from .evidence import percentile_ci, resampled_ratio
from .files import atomic_file, file_name, write_text_atomic
from .models import NoDirectPathError, output_directions, output_readout
from .plots import interactive, show_png, untracked_figure
from .pruning import ablate
from .statistics import NonFiniteActivationError, bootstrap_weights

RANKS = ("abs", "value")


# -- which neurons ---------------------------------------------------------------------------------------
def pick_neurons(scores: dict, masks: dict, n: int = 4) -> dict[str, list[tuple[int, int]]]:
    """Per task its `n` selected neurons (masks[task] True) with the highest scores[task], as (layer, neuron)
    pairs, best first; ties broken by (layer, neuron)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (neurons per task) must be a whole number >= 1, got {n!r}")
    missing = set(masks) - set(scores)
    if missing:
        raise ValueError(f"masks name tasks without scores: {sorted(missing)}; pass the scores the masks were "
                         f"selected from")
    picked = {}
    for task, mask in masks.items():
        s = scores[task].detach().to(torch.float64)
        if s.shape != mask.shape:
            raise ValueError(f"task {task!r}: scores have shape {tuple(s.shape)} but the mask {tuple(mask.shape)}")
        flat = torch.nonzero(mask.bool().flatten()).flatten()
        order = torch.sort(-s.flatten()[flat], stable=True).indices[:n]     # flat index order breaks ties
        d = mask.shape[1]
        picked[task] = [(int(i) // d, int(i) % d) for i in flat[order]]
    return picked


def histogram_edges(stats: dict, neurons, bins: int = 200, reach: float = 200.0) -> torch.Tensor:
    """[n, bins + 1] bin edges per neuron, equal steps in asinh(x / r) from -`reach` r to +`reach` r, where r
    is the neuron's largest root-mean-square activation over the tasks (statistics as Study.stats() gives
    them): fine bins where most activations are, and heavy tails still inside the range (at the defaults
    bins are 0.06 r wide near 0, 0.6 r at 10 r). Values outside fall into the under- and overflow counts."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be a whole number >= 2, got {bins!r}")
    layers = torch.tensor([l for l, _ in neurons], dtype=torch.long)
    units = torch.tensor([u for _, u in neurons], dtype=torch.long)
    rms = torch.stack([s.rms[layers, units] for s in stats.values()]).max(0).values.double()
    rms = torch.where(rms > 0, rms, 1.0)                        # a neuron that never fires: unit scale
    steps = torch.linspace(-math.asinh(reach), math.asinh(reach), bins + 1, dtype=torch.float64)
    return rms[:, None] * torch.sinh(steps)[None, :]


# -- the collected examples ------------------------------------------------------------------------------
@dataclass
class NeuronExamples:
    """Top-k inputs and activation histograms of chosen neurons, per task.

    neurons: (layer, neuron) pairs, in the order of every per-neuron axis below; picked: {task: the neurons
    shown for it}. Per task, on the task's statistics data:
      value [n, k]     the activation at each kept position, best first (NaN where fewer than k positions)
      document [n, k]  index of its document (image) in the task's statistics data (-1 where none)
      position [n, k]  its token index in the window the model read (image: in the token sequence)
      LM: tokens [n][k][2w+1] (None outside the window) and context [n, k, 2w+1]: the tokens w either side
          and this neuron's activation at each (NaN outside); the kept position is at index w.
      images: grid [n, k, T], this neuron's activation at every token of the image (prefix tokens first, then
          the patches row by row), and images {document: image [C, H, W]} of every kept image.
      hist [n, bins + 2] counted positions per bin of `edges` [n, bins + 1], with the positions below
          edges[0] first and those at or above edges[-1] last: each row sums to the task's counted positions.
    rank: "abs" keeps the largest |activation| (the quantity the default score averages), "value" the largest.
    names: {task: the name of each statistics document (image) as tasks.json gives it}; none: its index.
    direct: {neuron: {"up": [(output, value)], "down": [...]}} (direct_effects), direct_note says how it was
    read (or why there is none); ablation: {neuron: {task: {"delta", "ci", "base", "n"}}} (ablation_effects)."""
    kind: str
    neurons: list
    picked: dict
    tasks: list
    k: int
    window: int
    rank: str
    edges: torch.Tensor
    value: dict = field(default_factory=dict)
    document: dict = field(default_factory=dict)
    position: dict = field(default_factory=dict)
    hist: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)
    grid_shape: tuple | None = None        # (prefix tokens, patch rows, patch columns) for images
    model: str = ""
    names: dict = field(default_factory=dict)
    direct: dict = field(default_factory=dict)
    direct_note: str = ""
    ablation: dict = field(default_factory=dict)
    ablation_note: str = ""

    def document_name(self, task: str, document: int) -> str:
        """A statistics document (image) as tasks.json names it (file name, fortune id, topic, train:i)."""
        names = self.names.get(task)
        return str(names[document]) if names is not None and 0 <= document < len(names) else f"doc {document}"

    def index(self, neuron) -> int:
        neuron = tuple(int(v) for v in neuron)
        if neuron not in self.neurons:
            raise KeyError(f"neuron {neuron} (layer, neuron) was not collected; collected: {self.neurons}")
        return self.neurons.index(neuron)

    def examples(self, neuron, tasks=None, limit: int | None = None) -> list[dict]:
        """The kept positions of `neuron` on `tasks` (default: all), best first (ties: task order, then
        position), at most `limit`: dicts with task, value, document, position and tokens/context (LM) or
        grid/image."""
        i = self.index(neuron)
        rows = []
        for t_order, task in enumerate(self.tasks if tasks is None else tasks):
            for j in range(self.k):
                value = float(self.value[task][i, j])
                if math.isnan(value):
                    break
                document = int(self.document[task][i, j])
                row = {"task": task, "value": value, "document": document, "name": self.document_name(task, document),
                       "position": int(self.position[task][i, j]), "_order": (t_order, j)}
                if self.kind == "lm":
                    row["tokens"] = self.tokens[task][i][j]
                    row["context"] = self.context[task][i, j].numpy()
                else:
                    row["grid"] = self.grid[task][i, j].numpy()
                    row["image"] = self.images[task][row["document"]]
                rows.append(row)
        key = (lambda r: (-abs(r["value"]), r["_order"])) if self.rank == "abs" else \
            (lambda r: (-r["value"], r["_order"]))
        rows.sort(key=key)
        for r in rows:
            del r["_order"]
        return rows[:limit]

    def owners(self, neuron) -> list[str]:
        """The tasks `neuron` was picked for."""
        neuron = tuple(neuron)
        return [t for t, ns in self.picked.items() if neuron in ns]


# -- collecting ------------------------------------------------------------------------------------------
class _TaskTopK:
    """Running top-k per neuron of one task, with each kept position's context, and the histograms."""

    def __init__(self, n: int, k: int, width: int, bins: int, grid_tokens: int | None):
        self.k = k
        self.value = torch.full((k, n), -math.inf, dtype=torch.float64)   # the ranked score
        self.signed = torch.full((k, n), math.nan, dtype=torch.float64)   # the activation itself
        self.document = torch.full((k, n), -1, dtype=torch.long)
        self.position = torch.full((k, n), -1, dtype=torch.long)
        self.ids = torch.full((k, n, width), -1, dtype=torch.long)
        self.context = torch.full((k, n, width if grid_tokens is None else grid_tokens), math.nan, dtype=torch.float64)
        self.hist = torch.zeros(n, bins + 2, dtype=torch.long)

    def merge(self, fields: dict) -> None:
        """Keep the k best of the kept entries and the candidates (all from later positions): a stable sort,
        so among equal values the kept, earlier ones stay first."""
        joined = {name: torch.cat([getattr(self, name), fields[name]]) for name in fields}
        order = torch.sort(joined["value"], dim=0, descending=True, stable=True).indices[:self.k]
        for name, values in joined.items():
            index = order.view(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
            setattr(self, name, values.gather(0, index))


class ExampleCollector:
    """Context manager: hooks on the layers of `neurons` keep their activations for one batch; after each
    forward `update` folds them into the current task's running top-k and histograms."""

    def __init__(self, handle, neurons, *, k: int, window: int, rank: str, edges: torch.Tensor):
        self.handle, self.neurons, self.k, self.window, self.rank = handle, list(neurons), k, window, rank
        self.edges = edges.to(torch.float64)
        self.layers = sorted({l for l, _ in self.neurons})
        self.units = {l: torch.tensor([u for m, u in self.neurons if m == l]) for l in self.layers}
        # where each layer's columns go in the order of `neurons`
        by_layer = [i for l in self.layers for i, (m, _) in enumerate(self.neurons) if m == l]
        self._to_order = torch.argsort(torch.tensor(by_layer))
        self.grid_tokens = _n_image_tokens(handle) if handle.kind == "image" else None
        self.tasks: dict[str, _TaskTopK] = {}
        self.task = None
        self.positions = self.documents = None
        self._batch: dict[int, torch.Tensor] = {}

    def start(self, task: str) -> None:
        self.task = task
        self.tasks[task] = _TaskTopK(len(self.neurons), self.k, 2 * self.window + 1, self.edges.shape[1] - 1,
                                     self.grid_tokens)

    def __enter__(self):
        self._hooks = self.handle.hooks({l: self._reader(l) for l in self.layers})
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _reader(self, layer: int):
        def read(x):
            self._batch[layer] = x[..., self.units[layer].to(x.device)].detach().to("cpu", torch.float64)
        return read

    def update(self, ids: torch.Tensor | None) -> None:
        """Fold the batch just run (ids [B, T] for an LM, None for images) into the current task."""
        acts = torch.cat([self._batch.pop(l) for l in self.layers], -1)[..., self._to_order]   # [B, T, n]
        B, T, n = acts.shape
        counted = torch.ones(B, T, dtype=torch.bool) if self.positions is None else self.positions.bool().cpu()
        values = acts[counted]                                                                 # [N, n]
        if not bool(torch.isfinite(values).all()):
            raise NonFiniteActivationError(f"activations of the chosen neurons became NaN or inf on task "
                                           f"{self.task!r}; check the input data and the model's dtype")
        state = self.tasks[self.task]
        for j, column in enumerate(values.T.contiguous()):
            state.hist[j] += torch.bincount(torch.bucketize(column, self.edges[j], right=True),
                                            minlength=state.hist.shape[1])
        score = (acts.abs() if self.rank == "abs" else acts).masked_fill(~counted[..., None], -math.inf)
        if ids is None:              # images: each image once, at its best token (the first of equal ones)
            best = score.argmax(1)                                                             # [B, n]
            flat = score.gather(1, best[:, None, :]).squeeze(1)
        else:
            flat = score.reshape(B * T, n)
        # stable: equal scores stay in reading order, so the earlier position wins, here and in merge
        top = torch.sort(flat, dim=0, descending=True, stable=True).indices[:self.k]        # [k', n]
        columns = torch.arange(n)[None, :].expand_as(top)
        row, pos = (top, best[top, columns]) if ids is None else (top // T, top % T)
        fields = {"value": flat.gather(0, top), "signed": acts[row, pos, columns],
                  "document": self.documents.long().cpu()[row], "position": pos}
        if ids is None:                               # this neuron at every token of the image
            fields["context"] = acts.permute(0, 2, 1)[row, columns]                            # [k', n, T]
            fields["ids"] = torch.full((*top.shape, 2 * self.window + 1), -1, dtype=torch.long)
        else:
            offsets = torch.arange(-self.window, self.window + 1)
            cols = pos[..., None] + offsets                                                    # [k', n, 2w+1]
            inside = (cols >= 0) & (cols < T)
            cols = cols.clamp(0, T - 1)
            rows = row[..., None].expand_as(cols)
            inside &= counted[rows, cols]                              # padding is never context
            fields["ids"] = torch.where(inside, ids.cpu()[rows, cols], -1)
            fields["context"] = torch.where(inside, acts[rows, cols, columns[..., None].expand_as(cols)], math.nan)
        state.merge(fields)


def collect_examples(handle, data: dict, neurons, *, picked: dict | None = None, edges: torch.Tensor,
                     k: int = 8, window: int = 8, rank: str = "abs", max_tokens: int | None = None,
                     batch_size: int | None = None, ctx: int = 256, cls_only: bool = False,
                     progress: bool = True, skip_positions=(), names: dict | None = None,
                     direct: int = 10) -> NeuronExamples:
    """One pass over each task's data ({task: documents or images}, as collect_stats takes them, with the
    same max_tokens/ctx/cls_only/skip_positions: skipped positions are neither counted nor shown) that
    keeps, for the (layer, neuron) pairs in `neurons` only, the top-`k` counted positions per task with
    `window` tokens either side (LM), or the top-`k` images, each at its best counted token, with the
    image's activation grid, and a histogram over `edges` [n, bins + 1] (histogram_edges). picked: {task: the
    neurons shown for it} for the pages (default: all of them under "chosen"). names: {task: each statistics
    document's name} for the contexts (tasks.json's); direct: how many outputs each neuron pushes up and down
    most to keep (direct_effects; 0: none). Deterministic for the same inputs."""
    neurons = list(dict.fromkeys((int(l), int(u)) for l, u in neurons))
    if not neurons:
        raise ValueError("no neurons to collect: pass at least one (layer, neuron) pair")
    for name, value, low in (("k", k, 1), ("window", window, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
    for l, u in neurons:
        if not (0 <= l < handle.n_layers and 0 <= u < handle.d_mlp):
            raise IndexError(f"neuron (layer {l}, neuron {u}) is outside the model's {handle.n_layers} layers x "
                             f"{handle.d_mlp} neurons")
    edges = torch.as_tensor(edges, dtype=torch.float64)
    if edges.dim() != 2 or edges.shape[0] != len(neurons) or edges.shape[1] < 2:
        raise ValueError(f"edges must be [{len(neurons)} neurons, bins + 1] (histogram_edges gives them), got "
                         f"{tuple(edges.shape)}")
    if not data:
        raise ValueError("no tasks: pass {task: statistics data}")
    result = NeuronExamples(handle.kind, neurons, dict(picked or {"chosen": neurons}), list(data), k, window, rank,
                            edges, model=handle.label)
    with ExampleCollector(handle, neurons, k=k, window=window, rank=rank, edges=edges) as collector:
        for task, task_data in data.items():
            collector.start(task)
            on_logits = (lambda logits, ids, mask, docs: collector.update(ids)) if handle.kind == "lm" else \
                (lambda logits, start, docs: collector.update(None))
            run_batches(handle, task_data, collector, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                        cls_only=cls_only, progress=progress, desc=f"neurons {task}", on_logits=on_logits,
                        documents=True, logits=False, skip_positions=skip_positions)
            _finish(result, task, collector.tasks.pop(task), handle, task_data)
    if handle.kind == "image":
        result.grid_shape = _grid_shape(handle)
    result.names = {t: list(names[t]) for t in data if t in names} if names else {}
    if direct:
        result.direct, result.direct_note = direct_effects(handle, neurons, direct)
    return result


# -- what a neuron does ----------------------------------------------------------------------------------
def output_names(handle, n: int) -> list[str]:
    """The names of a model's n outputs: decoded tokens (an id the tokenizer lacks as "#id"), or class names
    (the config's id2label; "class i" without one)."""
    if handle.kind == "lm":
        known = len(handle.tokenizer)
        return [handle.tokenizer.decode([i]) if i < known else f"#{i}" for i in range(n)]
    labels = getattr(getattr(handle.model, "config", None), "id2label", None) or {}
    return [str(labels.get(i, labels.get(str(i), f"class {i}"))) for i in range(n)]


DIRECT_CAPTION = ("Direct effect: the outputs whose logit this neuron's output direction moves most, per unit of "
                  "activation, read straight through {what}. Not its total effect: the blocks after it also read "
                  "what it writes, and the norms' division is left out.")


def direct_effects(handle, neurons, top: int = 10) -> tuple[dict, str]:
    """({neuron: {"up": [(output, value)], "down": [(output, value)]}}, caption): per (layer, neuron) the `top`
    outputs (tokens, classes) whose logit its output direction raises most and lowers most, per unit of its
    activation, read through the final norm's elementwise weight and the unembedding or classifier head
    (models.output_readout), largest first (ties: lower output index); at most half the outputs each. Without
    such a path: ({}, why)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top (outputs shown per direction) must be a whole number >= 1, got {top!r}")
    try:
        scale, head, what = output_readout(handle)
    except NoDirectPathError as err:
        return {}, f"No direct effect on the outputs is shown for this model: {err}."
    names = output_names(handle, head.shape[0])
    top = min(top, max(1, len(names) // 2))       # few classes: up and down lists without an output in both
    out = {}
    for layer in sorted({l for l, _ in neurons}):
        directions = output_directions(handle, layer)
        for l, u in neurons:
            if l != layer:
                continue
            logits = head @ (scale * directions[u])
            effects = {}
            for side, sign in (("up", 1), ("down", -1)):
                order = torch.sort(-sign * logits, stable=True).indices[:top]
                effects[side] = [(names[i], float(logits[i])) for i in order.tolist()]
            out[(l, u)] = effects
    return out, DIRECT_CAPTION.format(what=what)


def ablation_effects(handle, hits, neurons, *, base: dict | None = None, n_boot: int = 200,
                     seed: int = 0) -> dict:
    """{neuron: {task: {"delta", "ci", "base", "n"}}}: per (layer, neuron) in `neurons`, how much each task's
    top-1 accuracy changes when that neuron alone is zeroed. hits: a callable() -> {task: {"n", "top1"}} of
    per-document counts of the model as it is now (e.g. Study.document_hits); base: its result for the intact
    model (computed when None). ci: a 95% bootstrap interval over documents (images), each resample drawing
    the same documents for the intact and the ablated model."""
    base = hits() if base is None else base
    weights = {t: bootstrap_weights(len(h["n"]), n_boot, seed + i).numpy() for i, (t, h) in enumerate(base.items())}
    out = {}
    for layer, unit in neurons:
        mask = torch.zeros(handle.n_layers, handle.d_mlp, dtype=torch.bool)
        mask[layer, unit] = True
        with ablate(handle, mask):
            now = hits()
        out[(layer, unit)] = {}
        for t, h in base.items():
            if not np.array_equal(now[t]["n"], h["n"]):
                raise ValueError(f"task {t!r}: the ablated pass counted other documents than the intact one; "
                                 f"hits must read the same documents at every call")
            accuracy = lambda top1, w=None: resampled_ratio(top1, h["n"], w)       # noqa: E731
            change = accuracy(now[t]["top1"], weights[t]) - accuracy(h["top1"], weights[t])
            out[(layer, unit)][t] = {"delta": float(accuracy(now[t]["top1"]) - accuracy(h["top1"])),
                                     "ci": percentile_ci(change), "base": float(accuracy(h["top1"])),
                                     "n": len(h["n"])}
    return out


def add_ablations(ex: NeuronExamples, handle, hits, per_task: int = 3, *, n_boot: int = 200, seed: int = 0,
                  unit: str = "tokens", base: dict | None = None) -> NeuronExamples:
    """Fill ex.ablation (ablation_effects) for the first `per_task` neurons picked for each task, and its
    caption; `unit`: what the evaluation counts (tokens, images), for the caption; base: hits() of the intact
    model if already known (e.g. the cross-task matrix's), saving a pass."""
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"per_task (neurons ablated per task) must be a whole number >= 1, got {per_task!r}")
    chosen = list(dict.fromkeys(nr for ns in ex.picked.values() for nr in ns[:per_task]))
    base = hits() if base is None else base
    ex.ablation = ablation_effects(handle, hits, chosen, base=base, n_boot=n_boot, seed=seed)
    low, high = min(int(h["n"].sum()) for h in base.values()), max(int(h["n"].sum()) for h in base.values())
    ex.ablation_note = (f"Ablation effect: the change in each task's top-1 accuracy when this neuron alone is set "
                        f"to 0, on {low if low == high else f'{low}–{high}'} evaluation {unit} per task, with "
                        f"a 95% bootstrap interval over {'images' if unit == 'images' else 'documents'}; the owner "
                        f"tasks in bold. Unlike the direct effect, this is the neuron's total effect, through every "
                        f"later block.")
    return ex


def _grid_shape(handle) -> tuple[int, int, int]:
    """(prefix tokens, patch rows, patch columns): CLS (and DeiT's distillation token) come before the patches."""
    if hasattr(handle.model, "config"):
        _, h, w = handle.image_shape
        p = handle.model.config.patch_size
        return 1, h // p, w // p
    rows, cols = handle.model.patch_embed.grid_size
    return _n_image_tokens(handle) - rows * cols, rows, cols


def _finish(result: NeuronExamples, task: str, state: _TaskTopK, handle, task_data) -> None:
    """Move one task's kept entries into `result`, neuron-major; token ids become strings, images are copied
    (only those kept)."""
    valid = torch.isfinite(state.value).T                          # [n, k]
    result.value[task] = torch.where(valid, state.signed.T, math.nan)
    result.document[task] = torch.where(valid, state.document.T, -1)
    result.position[task] = torch.where(valid, state.position.T, -1)
    result.hist[task] = state.hist
    context = state.context.permute(1, 0, 2)
    if handle.kind == "lm":
        result.context[task] = torch.where(valid[..., None], context, math.nan)
        pieces: dict[int, str] = {}
        ids = state.ids.permute(1, 0, 2).tolist()
        result.tokens[task] = [[[None if t < 0 else pieces.setdefault(t, handle.tokenizer.decode([t]))
                                 for t in ids[i][j]] if valid[i, j] else [] for j in range(state.k)]
                               for i in range(len(result.neurons))]
    else:
        result.grid[task] = context.float()
        images = images_and_labels(task_data)[0]
        result.images[task] = {d: images[d].detach().float().clone() for d in
                               sorted(set(result.document[task][valid].tolist()))}


# -- views -----------------------------------------------------------------------------------------------
_POSITIVE, _NEGATIVE = (214, 39, 40), (31, 119, 180)
_TOKEN_CSS = """.ex{font-family:ui-monospace,monospace;font-size:.85rem;margin:.15rem 0;white-space:pre-wrap}
.ex .tok{border-radius:2px}.ex .hit{outline:2px solid #000}
.ex .meta{color:#555;font-family:system-ui,sans-serif;font-size:.8rem;margin-right:.5rem}
.effects{border-collapse:collapse;font-size:.85rem;margin:.3rem 0}.effects td,.effects th{padding:.1rem .6rem;
text-align:left}.effects .num{text-align:right;font-variant-numeric:tabular-nums}
.effects .tk{font-family:ui-monospace,monospace}.caption{color:#555;font-size:.85rem;font-style:italic}"""
_PAGE_CSS = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
img{max-width:100%;height:auto}section{margin-bottom:2.5rem}
""" + _TOKEN_CSS


def _scale(ex: NeuronExamples, neuron) -> float:
    """The largest |activation| kept for `neuron` on any task: the colour scale of its views."""
    i = ex.index(neuron)
    values = torch.cat([ex.value[t][i] for t in ex.tasks])
    values = values[~torch.isnan(values)].abs()
    return float(values.max()) if len(values) and float(values.max()) > 0 else 1.0


def _colour(value: float, scale: float) -> str:
    if not math.isfinite(value):
        return "transparent"
    r, g, b = _POSITIVE if value >= 0 else _NEGATIVE
    return f"rgba({r},{g},{b},{min(1.0, abs(value) / scale):.3f})"


def _shown(token: str) -> str:
    """A token as text a reader can see: line breaks and tabs as symbols, nothing as ∅; HTML-escaped."""
    visible = token.replace("\r", "").replace("\n", "↵").replace("\t", "→") or "∅"
    return html.escape(visible, quote=True)


def context_html(row: dict, scale: float, window: int) -> str:
    """One kept position as a line of tokens, each on a background coloured by this neuron's activation there
    (red positive, blue negative, full colour at `scale`); the kept token outlined; values in tooltips."""
    spans = []
    for j, (token, value) in enumerate(zip(row["tokens"], row["context"])):
        if token is None:
            continue
        hit = " hit" if j == window else ""
        spans.append(f'<span class="tok{hit}" style="background:{_colour(float(value), scale)}" '
                     f'title="{float(value):+.3f}">{_shown(token)}</span>')
    name = row.get("name", f"doc {row['document']}")        # as tasks.json names it
    meta = html.escape(f"{row['task']} · {name} · {row['value']:+.3f}")
    return f'<div class="ex"><span class="meta">{meta}</span>{"".join(spans)}</div>'


def contexts_html(ex: NeuronExamples, neuron, tasks=None, limit: int | None = None) -> str:
    """The kept contexts of `neuron` on `tasks` (default all), best first, as HTML lines (LM only)."""
    if ex.kind != "lm":
        raise TypeError("contexts_html shows tokens; for an image model use images_figure")
    scale = _scale(ex, neuron)
    rows = ex.examples(neuron, tasks, limit)
    return "\n".join(context_html(r, scale, ex.window) for r in rows) or "<p>No positions kept.</p>"


def direct_html(ex: NeuronExamples, neuron) -> str:
    """The neuron's direct effect (direct_effects) as a section: its caption, then the outputs it pushes up and
    down most side by side, with their logit change per unit of activation."""
    head = '<h3>Direct effect on the outputs</h3>\n<p class="caption">' + html.escape(ex.direct_note) + "</p>"
    effects = ex.direct.get(tuple(neuron))
    if effects is None:
        return head
    unit = "token" if ex.kind == "lm" else "class"
    rows = [f"<tr><th>pushes up ({unit})</th><th>logit</th><th>pushes down ({unit})</th><th>logit</th></tr>"]
    for (up, u), (down, d) in zip(effects["up"], effects["down"]):
        rows.append(f'<tr><td class="tk">{_shown(up)}</td><td class="num">{u:+.3f}</td>'
                    f'<td class="tk">{_shown(down)}</td><td class="num">{d:+.3f}</td></tr>')
    return head + '\n<table class="effects direct">' + "".join(rows) + "</table>"


def ablation_html(ex: NeuronExamples, neuron) -> str:
    """The neuron's ablation effect (ablation_effects) as a section: per task its intact top-1 accuracy and the
    change with this neuron zeroed, with the interval; '' when no ablation was run."""
    if not ex.ablation_note:
        return ""
    head = '<h3>Ablation effect</h3>\n<p class="caption">' + html.escape(ex.ablation_note) + "</p>"
    effects = ex.ablation.get(tuple(neuron))
    if effects is None:
        return head + "\n<p>Not ablated: only the top neurons of each task's set are.</p>"
    owners = set(ex.owners(neuron))
    rows = [f"<tr><th>task</th><th>{'documents' if ex.kind == 'lm' else 'images'}</th><th>top-1 intact</th>"
            "<th>change when zeroed</th><th>95% interval</th></tr>"]
    for task, e in effects.items():
        name = f"<b>{html.escape(task)}</b>" if task in owners else html.escape(task)
        rows.append(f'<tr><td>{name}</td><td class="num">{e["n"]}</td><td class="num">{e["base"]:.3f}</td>'
                    f'<td class="num">{e["delta"]:+.4f}</td>'
                    f'<td class="num">[{e["ci"][0]:+.4f}, {e["ci"][1]:+.4f}]</td></tr>')
    return head + '\n<table class="effects ablation">' + "".join(rows) + "</table>"


def distribution_figure(ex: NeuronExamples, neuron):
    """The neuron's activation density on every task (log scale, over the range where any task has values);
    the tasks it was picked for drawn thick."""
    i = ex.index(neuron)
    edges = ex.edges[i].numpy()
    owners = set(ex.owners(neuron))
    occupied = np.zeros(len(edges) - 1, dtype=bool)
    fig = untracked_figure(figsize=(7, 3.6))     # pyplot-free: the explorer draws it on a widget thread
    ax = fig.subplots()
    for task in ex.tasks:
        counts = ex.hist[task][i].numpy().astype(float)
        total = counts.sum()
        if total == 0:
            continue
        occupied |= counts[1:-1] > 0
        outside = (counts[0] + counts[-1]) / total
        label = task + (f" ({outside:.1%} beyond the bins)" if outside > 0 else "")
        ax.stairs(counts[1:-1] / total / np.diff(edges), edges, lw=2.5 if task in owners else 1.0, label=label,
                  alpha=1.0 if task in owners else 0.7)
    if occupied.any():
        first, last = np.flatnonzero(occupied)[[0, -1]]
        pad = 0.03 * (edges[last + 1] - edges[first])
        ax.set_xlim(edges[first] - pad, edges[last + 1] + pad)
    ax.set_yscale("log")
    # plain tick labels: log axes label in mathtext, shown raw ("$\mathdefault{10^{1}}$") with parse_math off (plots)
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("activation")
    ax.set_ylabel("density (fraction of positions\nper unit activation)")
    ax.set_title(f"Layer {neuron[0]}, neuron {neuron[1]}: activation on each task"
                 + (f" (picked for {', '.join(sorted(owners))})" if owners else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig        # no tight_layout: one axes, and saving and inline display both crop to the drawn extent


def _image_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised image [C, H, W] scaled to [0, 1] for display (grey for one channel)."""
    x = image.float()
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def images_figure(ex: NeuronExamples, neuron, rows: dict):
    """Kept images of `neuron` with its activation at every patch over each image (red positive, blue
    negative, full colour at the neuron's largest kept |activation|); the kept patch outlined (or "CLS").
    rows: {row title: examples} (NeuronExamples.examples)."""
    if ex.kind != "image":
        raise TypeError("images_figure shows images; for a language model use contexts_html")
    from matplotlib.patches import Rectangle
    prefix, n_rows, n_cols = ex.grid_shape
    scale = _scale(ex, neuron)
    width = max(1, max(len(r) for r in rows.values()))
    fig = untracked_figure(figsize=(1.7 * width, 2.3 * len(rows)))      # pyplot-free, as distribution_figure
    axes = fig.subplots(len(rows), width, squeeze=False)
    # a fixed grid without axis decorations: laying out (tight_layout) a grid of framed axes cost ~0.5 s a figure
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.02, top=1 - 0.35 / len(rows), wspace=0.1, hspace=0.45)
    for r, (title, examples) in enumerate(rows.items()):
        axes[r, 0].text(-0.08, 0.5, title, rotation=90, ha="right", va="center", fontsize=8,
                        transform=axes[r, 0].transAxes)
        for c in range(width):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.xaxis.set_visible(False)      # else every draw still measures the (empty) axes' ticks
            ax.yaxis.set_visible(False)
            if c >= len(examples):
                continue
            e = examples[c]
            picture = _image_rgb(e["image"])
            h, w = picture.shape[:2]
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, extent=(0, w, h, 0))
            grid = e["grid"][prefix:].reshape(n_rows, n_cols)
            overlay = plt.get_cmap("RdBu_r")((grid / scale + 1) / 2)
            overlay[..., 3] = 0.8 * np.clip(np.abs(grid) / scale, 0, 1)    # quiet patches leave the image visible
            ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
            where = "CLS" if e["position"] < prefix else ""
            if not where:
                p = e["position"] - prefix
                ph, pw = h / n_rows, w / n_cols
                ax.add_patch(Rectangle(((p % n_cols) * pw, (p // n_cols) * ph), pw, ph, fill=False, lw=1.5,
                                       edgecolor="black"))
            ax.set_title(f"{e['task']} {e.get('name', '#' + str(e['document']))}\n{e['value']:+.2f} {where}".strip(),
                         fontsize=7)
    fig.suptitle(f"Layer {neuron[0]}, neuron {neuron[1]}: top images (activation per patch)", fontsize=9)
    return fig


def top_rows(ex: NeuronExamples, neuron, task: str) -> dict:
    """{title: examples}: the top k on `task`, and the top k on every other task together."""
    others = [t for t in ex.tasks if t != task]
    rows = {f"top on {task}": ex.examples(neuron, [task], ex.k)}
    if others:
        rows["top on the other tasks"] = ex.examples(neuron, others, ex.k)
    return rows


def _save_png(fig, path: Path) -> Path:
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    return path


def export(ex: NeuronExamples, out_dir, kind: str | None = None) -> list[Path]:
    """Write out_dir/neurons/<kind>-<task>.html for every task with picked neurons, and the PNGs they show
    (out_dir/neurons/<kind>/...: each neuron's distribution, for images its top images per task); every link
    relative. kind: the file-name prefix (default "lm" or "image"); <task> is files.file_name(task), one file per
    task whatever its name. Returns the HTML pages' paths."""
    kind = kind or ex.kind
    folder = Path(out_dir) / "neurons"
    assets = folder / file_name(kind)
    assets.mkdir(parents=True, exist_ok=True)
    distribution = {}
    for neuron in ex.neurons:
        name = f"L{neuron[0]}-N{neuron[1]}-distribution.png"
        _save_png(distribution_figure(ex, neuron), assets / name)
        distribution[neuron] = f"{file_name(kind)}/{name}"
    pages = []
    for task, neurons in ex.picked.items():
        sections = []
        for rank_in_task, neuron in enumerate(neurons, 1):
            l, u = neuron
            parts = [f'<section id="L{l}-N{u}">\n<h2>{rank_in_task}. Layer {l}, neuron {u}</h2>',
                     f"<p>Picked for: {html.escape(', '.join(ex.owners(neuron)))}.</p>",
                     direct_html(ex, neuron), ablation_html(ex, neuron),      # what it does, before where it fires
                     f'<img src="{quote(distribution[neuron])}" alt="activation distribution of layer {l}, '
                     f'neuron {u}">']
            if ex.kind == "lm":
                for title, rows in top_rows(ex, neuron, task).items():
                    scale = _scale(ex, neuron)
                    lines = "\n".join(context_html(r, scale, ex.window) for r in rows) or "<p>None kept.</p>"
                    parts.append(f"<h3>{html.escape(title.capitalize())}</h3>\n{lines}")
            else:
                name = f"L{l}-N{u}-{file_name(task)}-top.png"
                _save_png(images_figure(ex, neuron, top_rows(ex, neuron, task)), assets / name)
                parts.append(f'<img src="{quote(file_name(kind) + "/" + name)}" alt="top images of layer {l}, '
                             f'neuron {u}">')
            sections.append("\n".join(parts) + "\n</section>")
        toc = " · ".join(f'<a href="#L{l}-N{u}">L{l} N{u}</a>' for l, u in neurons)
        unit = "token" if ex.kind == "lm" else "token (CLS or patch)"
        page = "\n".join([
            f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Neurons of {html.escape(task)}</title>\n<style>\n{_PAGE_CSS}\n</style>\n</head>\n<body>",
            f"<h1>Neurons of {html.escape(task)}</h1>",
            f"<p>{html.escape(ex.model)}: the {len(neurons)} selected neurons of this task with the highest "
            f"scores. For each, what it does (its direct effect on the outputs"
            f"{', and how each task’s accuracy changes with it zeroed' if ex.ablation_note else ''}), "
            f"its activation distribution on every task's statistics data, and the {ex.k} "
            f"{unit} positions where its |activation| is largest{' ' if ex.rank == 'abs' else ' (signed) '}on "
            f"this task and on the other tasks"
            + (f", with {ex.window} tokens either side (red positive, blue negative)." if ex.kind == "lm" else
               ", the neuron's activation drawn over every patch (red positive, blue negative).") + "</p>",
            f"<p>{toc}</p>", *sections, "</body>\n</html>\n"])
        path = folder / f"{file_name(kind)}-{file_name(task)}.html"
        write_text_atomic(path, page)
        pages.append(path)
    return pages


def explorer(ex: NeuronExamples):
    """An ipywidgets explorer (JupyterLab): pick a task, then a layer and a neuron among those shown for it,
    to see its direct and ablation effects, its top contexts (images) and its distribution on every task.
    It displays itself and returns its
    box (end the line with `;`, or the box is shown a second time); None in headless runs."""
    if not interactive():
        print("headless run: neuron explorer skipped (the same views are in neurons/*.html)")
        return None
    import ipywidgets as w
    from IPython.display import HTML, display

    tasks = [t for t, ns in ex.picked.items() if ns]
    task = w.Dropdown(options=tasks, description="task")
    layer = w.Dropdown(description="layer")
    neuron = w.Dropdown(description="neuron")
    out = w.Output()

    def choices(dropdown, options):
        dropdown.options = options
        if dropdown.value not in options:
            dropdown.value = options[0] if options else None

    def layers_of():
        choices(layer, sorted({l for l, _ in ex.picked[task.value]}))

    def neurons_of():
        choices(neuron, [u for l, u in ex.picked[task.value] if l == layer.value])

    def draw(change=None):
        out.clear_output(wait=True)
        if layer.value is None or neuron.value is None:
            return
        chosen = (layer.value, neuron.value)
        with out:
            display(HTML(f"<style>{_TOKEN_CSS}</style>" + direct_html(ex, chosen) + ablation_html(ex, chosen)))
            rows = top_rows(ex, chosen, task.value)
            if ex.kind == "lm":
                scale = _scale(ex, chosen)
                display(HTML(f"<style>{_TOKEN_CSS}</style>" + "".join(
                    f"<h4>{html.escape(title)}</h4>" + "".join(context_html(r, scale, ex.window) for r in rs)
                    for title, rs in rows.items())))
            else:
                show_png(images_figure(ex, chosen, rows))
            show_png(distribution_figure(ex, chosen))

    following = []       # non-empty while one control's change sets the others: they must not draw too

    def follow(update):
        def handler(change):
            if following:
                return
            following.append(change)
            try:
                update()
            finally:
                following.clear()
            draw()                    # once per person's change (a task change moved all three: 3 draws)
        return handler

    task.observe(follow(lambda: (layers_of(), neurons_of())), names="value")
    layer.observe(follow(neurons_of), names="value")
    neuron.observe(follow(lambda: None), names="value")
    following.append(None)
    layers_of()
    neurons_of()
    following.clear()
    draw()
    box = w.VBox([w.HBox([task, layer, neuron]), out])
    display(box)         # shown by itself, as plots.score_explorer: `explorer(shown);` (the notebooks' line) hid it
    return box
