"""Streaming per-neuron statistics (docs/method.md §2).

One forward-pre-hook per layer on the neuron module reduces the activations of the counted positions
(real tokens; never padding) to six per-neuron sums in one pass on the model's device, and folds them
into float64 totals after every call. Memory is O(L·d_mlp) whatever the number of tokens.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .batches import run_batches
from .files import atomic_file

MEANS = ("mean", "mean_abs", "mean_sq", "frac_pos", "mean_sqrt")


def save_tensors(path, tensors: dict, meta: dict) -> None:
    """safetensors with `meta` as JSON in its header and the SHA-256 of the tensors, written atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"modsep": json.dumps(meta, default=str),
                                               "modsep_sha256": _checksum(tensors)})


def _checksum(tensors: dict) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (what a load must give back exactly)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class ChecksumError(ValueError):
    """A statistics file whose tensors differ from the checksum written with them (bytes changed on disk)."""


def load_tensors(path, *, require_checksum: bool = False) -> tuple[dict, dict]:
    """The tensors and metadata of a file save_tensors wrote, verified against its checksum (a file without
    one, written by older code, is accepted unless require_checksum: the cache requires it)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    expected = header.get("modsep_sha256")
    if expected is None and require_checksum:
        raise ChecksumError(f"{path} has no checksum (written by older code)")
    if expected is not None and _checksum(tensors) != expected:
        raise ChecksumError(f"{path} does not match its checksum: its bytes were changed on disk (corrupted)")
    return tensors, json.loads(header.get("modsep", "{}"))


class NonFiniteActivationError(FloatingPointError):
    """Activations became NaN or inf; the message names the layers (and task)."""


@dataclass
class NeuronStats:
    """Per-task, per-neuron statistics. count [L]; mean, mean_abs, mean_sq, frac_pos, mean_sqrt [L, d_mlp]
    (float64). Derived: std (sample standard deviation), rms."""
    count: torch.Tensor
    mean: torch.Tensor
    mean_abs: torch.Tensor
    mean_sq: torch.Tensor
    frac_pos: torch.Tensor
    mean_sqrt: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.mean.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.mean.shape[1]

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (E[x²]−E[x]²)·n/(n−1). (The reference stored this under the name `std`.)"""
        n = self.count.unsqueeze(1)
        return ((self.mean_sq - self.mean ** 2) * n / (n - 1)).clamp_min(0.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def rms(self) -> torch.Tensor:
        return self.mean_sq.sqrt()

    def _sums(self) -> list[torch.Tensor]:
        n = self.count.unsqueeze(1)
        return [getattr(self, m) * n for m in MEANS]

    @classmethod
    def from_sums(cls, count: torch.Tensor, sums, meta=None) -> "NeuronStats":
        n = count.to(torch.float64).unsqueeze(1).clamp_min(1.0)
        return cls(count.to(torch.float64), *[s.to(torch.float64) / n for s in sums], meta=dict(meta or {}))

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Statistics of the union of both token sets (exact up to float64 rounding)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.mean.shape)} and "
                             f"{tuple(other.mean.shape)}: they come from different models")
        sums = [a + b for a, b in zip(self._sums(), other._sums())]
        meta = dict(self.meta)
        meta["merged_from"] = [self.meta.get("data"), other.meta.get("data")]
        return NeuronStats.from_sums(self.count + other.count, sums, meta)

    def save(self, path) -> None:
        """safetensors with the metadata as JSON in its header; written atomically."""
        save_tensors(path, {"count": self.count, **{m: getattr(self, m) for m in MEANS}}, self.meta)

    @classmethod
    def load(cls, path) -> "NeuronStats":
        tensors, meta = load_tensors(path)
        missing = {"count", *MEANS} - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a NeuronStats file: it lacks {sorted(missing)}")
        return cls(tensors["count"], *[tensors[m] for m in MEANS], meta=meta)


def reduce_sums(x: torch.Tensor) -> torch.Tensor:
    """[n, d] activations -> [5, d] float32 sums: x, |x|, x², #(x>0), sqrt|x|. (Eager, on gathered rows.)

    #(x>0) = (Σ sign x + Σ |sign x|) / 2, exact (zeros count in neither), and about twice as fast on the
    CPU as summing a boolean mask; sqrt is taken in place once Σ|x| is read."""
    x = x.float()
    a = x.abs()
    sign = x.sign()
    sums = [x.sum(0), a.sum(0), (x * x).sum(0), (sign.sum(0) + sign.abs_().sum(0)) * 0.5]
    sums.append(a.sqrt_().sum(0))
    return torch.stack(sums)


ROW_CHUNKS = 256     # the two-stage reduction's chunks (_two_stage: which activations take it)


def _five_sums(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[..., n, d] activations -> [5, ..., d] float32 sums over the rows where `keep` [..., n] is True."""
    x = x.float()
    if keep is not None:
        x = torch.where(keep.unsqueeze(-1), x, 0.0)    # where, not multiply: NaN in padding stays out
    a = x.abs()
    return torch.stack([x.sum(-2), a.sum(-2), (x * x).sum(-2), (x > 0).float().sum(-2), a.sqrt().sum(-2)])


def _plain_sums(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[5, d] float64: one float32 sum over all rows (few rows)."""
    return _five_sums(x, keep).double()


def _chunked_sums(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[5, d] float64 in two stages (n >= 2 × ROW_CHUNKS rows): the first ROW_CHUNKS · r rows (r = n // ROW_CHUNKS)
    viewed as ROW_CHUNKS chunks of r rows, each summed in float32, then the partial sums added in float64; the
    n − ROW_CHUNKS · r rows left over are read as the last ROW_CHUNKS rows with the earlier ones masked out, so
    every size > 1 is symbolic and one compiled graph serves every n (a size 0 or 1 would be specialised)."""
    n, d = x.shape
    r = n // ROW_CHUNKS
    m = ROW_CHUNKS * r
    late = torch.arange(ROW_CHUNKS, device=x.device) >= ROW_CHUNKS - (n - m)      # rows m.. of the last chunk
    head = _five_sums(x[:m].view(ROW_CHUNKS, r, d), None if keep is None else keep[:m].view(ROW_CHUNKS, r))
    tail = _five_sums(x[n - ROW_CHUNKS:], late if keep is None else late & keep[n - ROW_CHUNKS:])
    return head.double().sum(1) + tail.double()


def _masked_reduce(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The same five sums [5, d] (float64) over the rows where `keep` [n] is True, without gathering them (a
    gather needs the row count on the host: a GPU sync). Compiled, this reads the activations once
    (docs/method.md §10: 1.04× against 1.22× for separate reductions on a GPU; on 2 CPU cores 30× faster than eager).

    On a GPU, many rows of few columns take two stages (_chunked_sums), a layout independent of the shape:
    ROW_CHUNKS × d independent sums keep a GPU busy even for few columns (ViT-B/16: 3,072). A plain column sum
    has only d, and how torch.compile splits it over rows is decided once, from the first call's sizes (dynamic
    shapes: e.g. a 7B model's 14,336 columns, which need no split), then reused for every shape: the likely
    reason the ViT's reduction took 3× longer inside the collector than compiled alone on its shape (issue #27)."""
    return (_chunked_sums if _two_stage(x) else _plain_sums)(x, keep)


def _two_stage(x: torch.Tensor) -> bool:
    """Whether [n, d] activations take _chunked_sums: on an accelerator, for fewer than 8,192 columns (a plain
    column sum's only parallelism) and at least 32 rows a chunk (so the float32 partial sums written add at most
    about a third to the activations read). On the CPU never: two or so threads have work enough in d columns,
    and the partial sums would only add memory traffic (on 2 cores 1.3-4.5× slower than the plain sums)."""
    n, d = x.shape
    return x.device.type != "cpu" and d < 8192 and n >= 32 * ROW_CHUNKS


def _weighted_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[m, 5, d] float32 sums of x, |x|, x², 1(x>0), sqrt|x| over the rows of x [n, d], row i weighing w[j, i]
    in sum j (w [m, n] float: block indicators, position weights, or both); rows weighing 0 in every sum
    (padding, skipped positions) are set to 0 first, so NaN there stays out."""
    x = torch.where((w != 0).any(0, keepdim=True).T, x.float(), 0.0)
    a = x.abs()
    return torch.stack([w @ v for v in (x, a, x * x, (x > 0).float(), a.sqrt())], 1)


_COMPILED: dict[str, object] = {}


def _compiled_reduce(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """_masked_reduce compiled once per process (dynamic shapes; its two layouts apart, each a graph per dtype and
    with or without `keep`, within dynamo's limit of 8 recompiles), or None where torch.compile cannot build it
    (no C compiler, no Triton): then a RuntimeWarning says so once and the eager paths serve."""
    fn = _COMPILED.get("reduce")
    if fn is False:
        return None
    try:
        if fn is None:
            plain, chunked = (torch.compile(f, dynamic=True, fullgraph=True) for f in (_plain_sums, _chunked_sums))
            fn = _COMPILED["reduce"] = lambda x, keep: (chunked if _two_stage(x) else plain)(x, keep)
        return fn(x, keep)
    except Exception as err:  # the toolchain is missing or broken: correctness first, speed second
        _COMPILED["reduce"] = False
        warnings.warn(f"torch.compile of the statistics reduction failed ({type(err).__name__}: "
                      f"{(str(err).splitlines() or [''])[0][:200]}); using the eager reduction (slower)",
                      RuntimeWarning, stacklevel=2)
        return None


class StatsCollector:
    """Context manager: hooks on every layer accumulate statistics of the counted positions.

    Set `positions` (bool [batch, seq], or None for all) before each forward; a CPU tensor avoids a
    device sync. Setting `weights` after it (float [batch, seq], run_batches(equal_positions=True)) weighs each
    counted position so (data.position_weights); setting `positions` clears them. Each hook call reduces the
    activations with one compiled masked kernel (`fused`, the default; weighted sums with `weights`; eager
    where torch.compile is unavailable or fused=False) and adds the sums into float64 totals kept on the
    activations' device, so a forward never waits for the host. The totals are folded onto the CPU when the
    context exits.
    """

    def __init__(self, handle, *, sample_tokens: int = 0, layers=None, fused: bool = True):
        self.handle = handle
        self.layers = list(range(handle.n_layers)) if layers is None else list(layers)
        self.fused = fused
        L, d = handle.n_layers, handle.d_mlp
        self.totals = torch.zeros(L, 5, d, dtype=torch.float64)
        self.count = torch.zeros(L, dtype=torch.float64)
        self._device_totals: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nonfinite: set[int] = set()
        self.sample_tokens = sample_tokens        # a bounded sample of activations, only if asked
        self.samples: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        self._sampled = dict.fromkeys(self.layers, 0)
        self._hooks = None
        self.positions = None

    @property
    def positions(self) -> torch.Tensor | None:
        return self._positions

    @positions.setter
    def positions(self, value: torch.Tensor | None) -> None:
        self._positions = value
        self._all_counted = value is None or bool(value.all())
        self._positions_on: dict[torch.device, torch.Tensor] = {}
        self.weights = None

    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._weights_on: dict[torch.device, torch.Tensor] = {}

    def _weight_row(self, device: torch.device) -> torch.Tensor:
        """The position weights as one float32 row [1, batch·seq] on `device` (copied once per batch and device)."""
        if device not in self._weights_on:
            self._weights_on[device] = self._weights.to(device, torch.float32, non_blocking=True).reshape(1, -1)
        return self._weights_on[device]

    def _keep(self, device: torch.device) -> torch.Tensor:
        """The counted positions as a flat mask on `device` (copied once per batch and device)."""
        if device not in self._positions_on:
            self._positions_on[device] = self._positions.to(device, non_blocking=True).reshape(-1)
        return self._positions_on[device]

    def __enter__(self):
        self._hooks = self.handle.hooks({layer: self._reader(layer) for layer in self.layers})
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._fold()

    def _fold(self) -> None:
        """Move the totals kept per device into the CPU float64 totals; flag non-finite layers."""
        for totals, count in self._device_totals.values():
            self.totals += totals.cpu()
            self.count += count.cpu()
        self._device_totals.clear()
        bad = ~torch.isfinite(self.totals).flatten(1).all(1)
        self.nonfinite |= set(torch.nonzero(bad).flatten().tolist())

    def _sums(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """(five sums [5, d], number of counted rows) of [n, d] activations, by the fastest path available."""
        sums = _compiled_reduce(x, keep) if self.fused else None
        if sums is None and x.device.type == "cpu":    # eager on the CPU: gathering the rows is cheapest
            rows = x if keep is None else x[keep]
            return reduce_sums(rows), rows.shape[0]
        if sums is None:                                # eager elsewhere: masked, no host sync
            sums = _masked_reduce(x, keep)
        return sums, (x.shape[0] if keep is None else keep.sum())

    def _reader(self, layer: int):
        def read(x):
            x = x.reshape(-1, x.shape[-1])
            keep = None if self._all_counted else self._keep(x.device)
            if x.device not in self._device_totals:
                self._device_totals[x.device] = (torch.zeros_like(self.totals, device=x.device),
                                                 torch.zeros_like(self.count, device=x.device))
            totals, count = self._device_totals[x.device]
            if self._weights is None:
                sums, n = self._sums(x, keep)
            else:                                       # weighted positions: one weighted sum per statistic
                w = self._weight_row(x.device)
                sums, n = _weighted_sums(x, w)[0], w.sum()
            totals[layer] += sums.double()
            count[layer] += n
            if self.sample_tokens and self._sampled[layer] < self.sample_tokens:
                rows = x if keep is None else x[keep]
                take = rows[: self.sample_tokens - self._sampled[layer]].detach().float().cpu()
                self.samples[layer].append(take)
                self._sampled[layer] += take.shape[0]
        return read

    def all_reduce(self) -> None:
        """Sum the totals and counts of every rank (torch.distributed, any backend). NaN or inf on any rank
        survives the sum, so every rank flags the same layers."""
        import torch.distributed as dist
        self._fold()
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        packed = torch.cat([self.totals.flatten(), self.count]).to(backend_device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        n_tot = self.totals.numel()
        self.totals = packed[:n_tot].view_as(self.totals).clone()
        self.count = packed[n_tot:].clone()
        self._fold()

    def result(self, meta=None) -> NeuronStats:
        self._fold()
        if self.nonfinite:
            raise NonFiniteActivationError(
                f"activations became NaN or inf in layers {sorted(self.nonfinite)}"
                f"{' on task ' + repr(meta.get('task')) if meta and meta.get('task') else ''}; they were not "
                f"averaged in. Check the input data and the model's dtype (float16 overflows; try float32/bf16)")
        if (self.count == 0).any():
            raise ValueError("no tokens were counted: the data is empty (or every position was padding)")
        sums = [self.totals[:, i] for i in range(5)]
        return NeuronStats.from_sums(self.count.clone(), sums, meta)

    def sample(self, layer: int) -> torch.Tensor:
        return torch.cat(self.samples[layer]) if self.samples[layer] else torch.empty(0, self.handle.d_mlp)


def collect_stats(handle, data, *, max_tokens: int | None = None, batch_size: int | None = None,
                  ctx: int = 256, cls_only: bool = False, task: str | None = None,
                  progress: bool = True, distributed: bool | None = None, fused: bool = True,
                  doc_tokens: int | None = None, skip_positions=(), equal_positions: bool = False) -> NeuronStats:
    """Statistics of every neuron over `data` (docs/method.md §2, §11).

    data: list[str] for an LM (documents; cut into windows of `ctx` tokens, padded batches, padding never
    counted, at most `max_tokens` real tokens read in rounds of `doc_tokens` per document, default one
    window, so the budget is spread over many documents: data.document_windows); a float tensor
    [N, C, H, W], an ImageDataset or a map-style dataset of images (see data.images_and_labels) for an image
    model (CLS and patch tokens by default, CLS only with cls_only=True).
    distributed: under torchrun / accelerate launch (default: when torch.distributed is initialised) each
    rank takes every world_size-th window or image and the sums are all-reduced, so every rank returns
    what a single process would (to float64 rounding).
    fused: reduce each layer's activations with one compiled kernel (torch.compile; compiled once per
    process, a few seconds) instead of eager torch ops; False, or no compiler, takes the eager path.
    skip_positions (LM): positions of each window left out (a Study leaves out 0, the attention sink: params
    lm.skip_positions); equal_positions: every other position weighs the same, whatever the windows' lengths
    (data.position_weights; weighted sums, the eager path). The budget still counts every token read.
    """
    shard = shard_of(distributed)
    meta = {"model": handle.label, "task": task, "max_tokens": max_tokens, "ctx": ctx, "doc_tokens": doc_tokens,
            "cls_only": cls_only, "random_init": handle.random_init, "seed": handle.seed,
            "skip_positions": list(skip_positions), "equal_positions": equal_positions}
    with StatsCollector(handle, fused=fused) as collector:
        run_batches(handle, data, collector, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                    cls_only=cls_only, progress=progress and shard[0] == 0, desc=f"stats {task or ''}".strip(),
                    shard=shard, doc_tokens=doc_tokens, skip_positions=skip_positions,
                    equal_positions=equal_positions)
    if shard[1] > 1:
        collector.all_reduce()
    meta["tokens"] = float(collector.count[0])
    meta["world_size"] = shard[1]
    return collector.result(meta)


def shard_of(distributed: bool | None) -> tuple[int, int]:
    import torch.distributed as dist
    active = dist.is_available() and dist.is_initialized()
    if distributed and not active:
        raise RuntimeError("distributed=True needs torch.distributed initialised (run under torchrun or "
                           "accelerate launch and call torch.distributed.init_process_group first)")
    if distributed is False or not active:
        return (0, 1)
    return (dist.get_rank(), dist.get_world_size())


def weighted_pool(stats_list) -> NeuronStats:
    """Pool tasks with equal weight per task (docs/method.md §3 'rest'): the mean of each statistic across tasks."""
    if not stats_list:
        raise ValueError("nothing to pool")
    means = [torch.stack([getattr(s, m) for s in stats_list]).mean(0) for m in MEANS]
    count = torch.stack([s.count for s in stats_list]).sum(0)
    return NeuronStats(count, *means, meta={"pooled": [s.meta.get("task") for s in stats_list]})


# -- statistics per block of documents (docs/method.md §5.3: intervals without re-running the model) ---------
@dataclass
class BlockStats:
    """One task's statistics kept per block of documents (or images): a document's tokens all fall into one
    block, so a resample of blocks is a resample of documents. count [B, L]; sums [B, 5, L, d_mlp] (float64)
    of x, |x|, x², 1(x>0), sqrt|x| in the order of MEANS; n_documents [B]."""
    count: torch.Tensor
    sums: torch.Tensor
    n_documents: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return self.count.shape[0]

    def merged(self, weights=None) -> NeuronStats:
        """NeuronStats of the blocks taken `weights` [B] times each (default: once each, which is
        collect_stats on the same data). Weighted sums, then means: a resample costs no forward pass."""
        w = torch.ones(self.n_blocks, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (self.n_blocks,) or bool((w < 0).any()):
            raise ValueError(f"weights must be {self.n_blocks} non-negative numbers (one per block), got shape "
                             f"{tuple(w.shape)}")
        count = w @ self.count
        if bool((count == 0).any()):
            raise ValueError("the weighted blocks hold no tokens: give at least one non-empty block a weight")
        sums = (w @ self.sums.flatten(1)).view(self.sums.shape[1:])
        meta = dict(self.meta)
        meta["tokens"] = float(count[0])
        return NeuronStats.from_sums(count, list(sums), meta)

    def resamples(self, weights, chunk: int | None = None):
        """Yield merged(w) for each row w of `weights` [K, B], `chunk` rows per matrix product (default: as
        many as fit in about 128 MB, so the block sums are read once per chunk, not once per resample)."""
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.dim() != 2 or weights.shape[1] != self.n_blocks or bool((weights < 0).any()):
            raise ValueError(f"weights must be [K, {self.n_blocks}] non-negative numbers, got {tuple(weights.shape)}")
        flat = self.sums.flatten(1)
        chunk = chunk or max(1, 2 ** 27 // (8 * flat.shape[1]))
        for start in range(0, len(weights), chunk):
            w = weights[start:start + chunk]
            counts, sums = w @ self.count, (w @ flat).view(len(w), *self.sums.shape[1:])
            for count, s in zip(counts, sums):
                if bool((count == 0).any()):
                    raise ValueError("a resample holds no tokens: give at least one non-empty block a weight")
                meta = dict(self.meta)
                meta["tokens"] = float(count[0])
                yield NeuronStats.from_sums(count, list(s), meta)

    def subset(self, blocks) -> "BlockStats":
        """The blocks at the given indices (e.g. a pseudo-task made of some of a domain's blocks)."""
        idx = torch.as_tensor(blocks, dtype=torch.long)
        return BlockStats(self.count[idx], self.sums[idx], self.n_documents[idx], dict(self.meta))

    def save(self, path) -> None:
        save_tensors(path, {"count": self.count, "sums": self.sums, "n_documents": self.n_documents}, self.meta)

    @classmethod
    def load(cls, path) -> "BlockStats":
        tensors, meta = load_tensors(path, require_checksum=True)     # block statistics are the on-disk cache
        if {"count", "sums", "n_documents"} - set(tensors):
            raise ValueError(f"{path} is not a BlockStats file: it lacks count, sums or n_documents")
        return cls(tensors["count"], tensors["sums"], tensors["n_documents"], meta=meta)


def block_of_documents(n_documents: int, n_blocks: int) -> torch.Tensor:
    """Block [n_documents] of each document: contiguous runs of (almost) equal numbers of documents, into
    min(n_blocks, n_documents) blocks. Task documents are a seeded shuffle already, so runs are random."""
    if n_blocks < 1 or n_documents < 1:
        raise ValueError(f"need at least one block and one document, got n_blocks={n_blocks}, "
                         f"n_documents={n_documents}")
    used = min(n_blocks, n_documents)
    return torch.arange(n_documents) * used // n_documents


class BlockStatsCollector(StatsCollector):
    """StatsCollector that keeps its sums per block: set `documents` (index of each row's document [batch])
    as well as `positions` before each forward (run_batches(..., documents=True) does). A batch inside one
    block is reduced exactly as StatsCollector reduces it; a batch spanning blocks by one matrix product per
    statistic with the rows' block indicators (float32, like the fused kernel)."""

    def __init__(self, handle, block_of: torch.Tensor, *, layers=None, fused: bool = True):
        super().__init__(handle, layers=layers, fused=fused)
        self.block_of = block_of.long()
        self.n_blocks = int(block_of.max()) + 1
        L, d = handle.n_layers, handle.d_mlp
        self.totals = torch.zeros(L, self.n_blocks, 5, d, dtype=torch.float64)   # layer first: _fold flags layers
        self.count = torch.zeros(L, self.n_blocks, dtype=torch.float64)
        self.documents = None

    @StatsCollector.positions.setter
    def positions(self, value):
        StatsCollector.positions.fset(self, value)
        self._block_keep = {}

    @StatsCollector.weights.setter
    def weights(self, value):
        StatsCollector.weights.fset(self, value)
        self._block_keep = {}

    @property
    def documents(self):
        return self._documents

    @documents.setter
    def documents(self, value):
        self._documents = value
        self._block_keep = {}
        self._rows = None if value is None else self.block_of[value.long()]
        self._present = [] if value is None else torch.unique(self._rows).tolist()

    def _reader(self, layer: int):
        def read(x):
            if self._rows is None:
                raise RuntimeError("BlockStatsCollector needs `documents` set before each forward "
                                   "(run_batches(..., documents=True))")
            x = x.reshape(-1, x.shape[-1])
            if x.device not in self._device_totals:
                self._device_totals[x.device] = (torch.zeros_like(self.totals, device=x.device),
                                                 torch.zeros_like(self.count, device=x.device))
            totals, count = self._device_totals[x.device]
            if len(self._present) == 1 and self._weights is None:   # one block: as StatsCollector reduces it
                block = self._present[0]
                sums, n = self._sums(x, None if self._all_counted else self._keep(x.device))
                totals[layer, block] += sums.double()
                count[layer, block] += n
                return
            onehot = self._onehot(x.shape[0], x.device)         # [blocks present, rows]
            sums = _weighted_sums(x, onehot)
            present = torch.tensor(self._present, device=x.device)
            totals[layer].index_add_(0, present, sums.double())
            count[layer].index_add_(0, present, onehot.sum(1).double())
        return read

    def _onehot(self, n_rows: int, device) -> torch.Tensor:
        """[blocks present, rows] float: which counted rows belong to which block, 0/1 or each row's position
        weight (built once per batch)."""
        key = ("onehot", device)
        if key not in self._block_keep:
            per_row = n_rows // len(self._rows)
            rows = self._rows.repeat_interleave(per_row)
            keep = torch.ones_like(rows, dtype=torch.bool) if self._positions is None else self._positions.reshape(-1)
            onehot = ((rows[None, :] == torch.tensor(self._present)[:, None]) & keep[None, :]).float()
            if self._weights is not None:
                onehot *= self._weights.reshape(1, -1).float()
            self._block_keep[key] = onehot.to(device, non_blocking=True)
        return self._block_keep[key]

    def result(self, meta=None) -> BlockStats:
        self._fold()
        if self.nonfinite:
            task = (meta or {}).get("task")
            raise NonFiniteActivationError(f"activations became NaN or inf in layers {sorted(self.nonfinite)}"
                                           f"{' on task ' + repr(task) if task else ''}")
        if (self.count.sum(1) == 0).any():
            raise ValueError("no tokens were counted: the data is empty (or every position was padding)")
        n_documents = torch.bincount(self.block_of, minlength=self.n_blocks)
        return BlockStats(self.count.T.clone(), self.totals.permute(1, 2, 0, 3).clone(), n_documents,
                          dict(meta or {}))


def collect_block_stats(handle, data, n_blocks: int = 32, *, max_tokens: int | None = None,
                        batch_size: int | None = None, ctx: int = 256, cls_only: bool = False,
                        task: str | None = None, progress: bool = True, distributed: bool | None = None,
                        fused: bool = True, skip_positions=(), equal_positions: bool = False) -> BlockStats:
    """collect_stats, keeping the sums per block of documents (images): the documents read within the budget
    are cut into min(n_blocks, documents) contiguous runs (block_of_documents). One forward pass, as
    collect_stats; `.merged()` gives collect_stats's result (to float32 rounding of batches that span
    blocks), and bootstrap_stats resamples it. skip_positions, equal_positions: as collect_stats (the weights
    are the whole task's, so a block's sums are its share of the task's weighted sums)."""
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a whole number >= 1, got {n_blocks!r}")
    n_docs = documents_read(handle, data, max_tokens=max_tokens, ctx=ctx)
    shard = shard_of(distributed)
    meta = {"model": handle.label, "task": task, "max_tokens": max_tokens, "ctx": ctx, "cls_only": cls_only,
            "random_init": handle.random_init, "seed": handle.seed, "skip_positions": list(skip_positions),
            "equal_positions": equal_positions}
    with BlockStatsCollector(handle, block_of_documents(n_docs, n_blocks), fused=fused) as collector:
        run_batches(handle, data, collector, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx,
                    cls_only=cls_only, progress=progress and shard[0] == 0, desc=f"stats {task or ''}".strip(),
                    shard=shard, documents=True, skip_positions=skip_positions, equal_positions=equal_positions)
    if shard[1] > 1:
        collector.all_reduce()
    meta["tokens"] = float(collector.count[0].sum())
    meta["world_size"] = shard[1]
    meta["documents"] = n_docs
    return collector.result(meta)


def documents_read(handle, data, *, max_tokens, ctx) -> int:
    """How many documents (images) of `data` a pass with this budget reads."""
    return handle.modality.documents_read(handle, data, max_tokens=max_tokens, ctx=ctx)


def bootstrap_weights(n_blocks: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n_blocks] multiplicities of a resample with replacement of n_blocks blocks (seeded)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_blocks, size=(n_boot, n_blocks))
    return torch.from_numpy(np.stack([np.bincount(d, minlength=n_blocks) for d in draws])).to(torch.float64)


def bootstrap_stats(blocks: BlockStats, seed: int) -> NeuronStats:
    """One bootstrap resample of a task's statistics: its blocks drawn with replacement (seeded), merged."""
    return blocks.merged(bootstrap_weights(blocks.n_blocks, 1, seed)[0])


def activation_sample(handle, tasks, n_tokens: int, batch_size: int) -> list[torch.Tensor]:
    """A bounded sample of activations per layer ([about n_tokens, d_mlp]), drawn evenly from every task's
    statistics data (tasks: a tasks.Tasks), for MoEfication's co-activation split."""
    per_task = max(1, n_tokens // len(tasks.names))
    samples = None
    for name in tasks.names:
        budget = tasks.sample_budget(per_task)          # images: enough of them for about per_task rows
        with StatsCollector(handle, sample_tokens=per_task) as collector:
            run_batches(handle, tasks.statistics_data(name, budget), collector, max_tokens=budget,
                        batch_size=batch_size, ctx=tasks.collect_options().get("ctx", 256), progress=False)
        layers = [collector.sample(layer) for layer in range(handle.n_layers)]
        samples = layers if samples is None else [torch.cat([a, b]) for a, b in zip(samples, layers)]
    return samples
