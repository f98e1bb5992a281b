"""Neurons you can look at, what is computed (neurons.py is the public face; neuron_pages.py shows it): for a few
chosen neurons, the top-k inputs that activate them most and their activation histograms on every task
(pick_neurons, histogram_edges, collect_examples), what each does to the outputs (direct_effects) and each
task's accuracy with it zeroed (ablation_effects, add_ablations). Never imports the pages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .batches import run_batches
from .data import images_and_labels
from .evidence import percentile_ci, resampled_ratio
from .modalities import n_image_tokens
from .models import BlockTape, NoDirectPathError, output_directions, output_readout
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

    @property
    def shows_tokens(self) -> bool:
        """Whether a kept example is tokens around a position (LM: tokens, context) or an image (grid, images)."""
        return self.kind == "lm"

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
                if self.shows_tokens:
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
        self.grid_tokens = handle.modality.grid_tokens(handle)     # None: an LM's windows vary in length
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

    def on_logits(logits, first, *rest):        # first: the token ids [B, T] (LM), the batch's start (images)
        collector.update(first if result.shows_tokens else None)
    with ExampleCollector(handle, neurons, k=k, window=window, rank=rank, edges=edges) as collector:
        for task, task_data in data.items():
            collector.start(task)
            run_batches(handle, task_data, collector, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                        cls_only=cls_only, progress=progress, desc=f"neurons {task}", on_logits=on_logits,
                        documents=True, logits=False, skip_positions=skip_positions)
            _finish(result, task, collector.tasks.pop(task), handle, task_data)
    if not result.shows_tokens:
        result.grid_shape = _grid_shape(handle)
    result.names = {t: list(names[t]) for t in data if t in names} if names else {}
    if direct:
        result.direct, result.direct_note = direct_effects(handle, neurons, direct)
    return result


# -- what a neuron does ----------------------------------------------------------------------------------
def output_names(handle, n: int) -> list[str]:
    """The names of a model's n outputs: decoded tokens (an id the tokenizer lacks as "#id"), or class names
    (the config's id2label; "class i" without one)."""
    return handle.modality.output_names(handle, n)


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
    # one neuron changes nothing below its layer: the deepest first, and each pass replays the blocks below its
    # neuron's layer from the passes before (the same results; SmolLM2's shown neurons sit in layers 11-29 of 30)
    tape = BlockTape()
    for layer, unit in sorted(neurons, key=lambda n: -n[0]):
        mask = torch.zeros(handle.n_layers, handle.d_mlp, dtype=torch.bool)
        mask[layer, unit] = True
        with ablate(handle, mask), tape.replay(handle, below=layer):
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
    return {n: out[n] for n in neurons}       # in the order asked


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
    return n_image_tokens(handle) - rows * cols, rows, cols


def _finish(result: NeuronExamples, task: str, state: _TaskTopK, handle, task_data) -> None:
    """Move one task's kept entries into `result`, neuron-major; token ids become strings, images are copied
    (only those kept)."""
    valid = torch.isfinite(state.value).T                          # [n, k]
    result.value[task] = torch.where(valid, state.signed.T, math.nan)
    result.document[task] = torch.where(valid, state.document.T, -1)
    result.position[task] = torch.where(valid, state.position.T, -1)
    result.hist[task] = state.hist
    context = state.context.permute(1, 0, 2)
    if result.shows_tokens:
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
