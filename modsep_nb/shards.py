"""Block statistics computed anywhere and put together exactly (issue #27: past one machine).

The unit of work is one block of documents (statistics.BlockStats): its windows (images) are batched on their
own, never beside another block's, so a block's sums are the same bits whichever process computes it. Hence:

- `collect_blocks`: a task's block statistics, the ones the study cache holds. Under torchrun the blocks are
  split over the ranks and summed (one rank's block plus the other ranks' zeros: exact).
- `collect` (`python -m modsep_nb collect PARAMS --shard I/N --out DIR`, e.g. one Slurm array task each): this
  shard's blocks of every cache entry the notebooks read, one file per entry in DIR.
- `merge` (`python -m modsep_nb merge DIR... --out CACHE`): the shards' blocks into those cache entries,
  bit-equal to what one process writes, so the notebooks load them instead of computing.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .batches import run_batches
from .statistics import (BlockStats, NonFiniteActivationError, StatsCollector, documents_read, load_tensors,
                         save_tensors, shard_of, block_of_documents)

SHARD_FILE = re.compile(r"(?P<entry>.+)\.shard(?P<i>\d+)-of-(?P<n>\d+)\.safetensors")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N (Slurm: --array=0-<N-1>, then --shard $SLURM_ARRAY_TASK_ID/N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(m[1]), int(m[2])


def _block_data(handle, data, n_blocks: int, max_tokens, ctx: int):
    """(block of each document read [n_docs], a function block -> (its data, its budget)): the documents (images)
    a pass with this budget reads, cut into blocks as statistics.block_of_documents does."""
    n_docs = documents_read(handle, data, max_tokens=max_tokens, ctx=ctx)
    block_of = block_of_documents(n_docs, n_blocks)
    # LM: each block's documents with the tokens the whole pass reads from them; images: each block's images
    part = handle.modality.block_part(handle, data, block_of, max_tokens=max_tokens, ctx=ctx)
    return block_of, part


def _block_sums(handle, data, n_blocks, blocks, *, max_tokens=None, batch_size=None, ctx=256, cls_only=False,
                fused=True, progress=False, skip_positions=(), equal_positions=False):
    """(count [k, L], sums [k, 5, L, d_mlp] float64, n_documents [B], documents read) of the blocks listed.
    skip_positions, equal_positions (LM): as statistics.collect_stats, weighing by the whole task's windows."""
    block_of, part = _block_data(handle, data, n_blocks, max_tokens, ctx)
    # the task's position weights (LM), not each block's: one block's windows are too few
    weights = handle.modality.task_weights(handle, data, max_tokens=max_tokens, ctx=ctx,
                                           skip_positions=skip_positions, equal_positions=equal_positions)
    counts, sums = [], []
    for b in blocks:
        block_data, budget = part(b)
        with StatsCollector(handle, fused=fused) as collector:
            run_batches(handle, block_data, collector, max_tokens=budget, batch_size=batch_size, ctx=ctx,
                        cls_only=cls_only, progress=progress, desc=f"block {b}", equal_positions=equal_positions,
                        weights_by_position=weights)
        counts.append(collector.count)
        sums.append(collector.totals.permute(1, 0, 2))      # [L, 5, d] -> [5, L, d], as BlockStats keeps them
    L, d = handle.n_layers, handle.d_mlp
    count = torch.stack(counts) if counts else torch.zeros(0, L, dtype=torch.float64)
    total = torch.stack(sums) if sums else torch.zeros(0, 5, L, d, dtype=torch.float64)
    return count, total, torch.bincount(block_of, minlength=int(block_of.max()) + 1), len(block_of)


def _base_meta(handle, task, max_tokens, ctx, cls_only, n_docs) -> dict:
    return {"model": handle.label, "task": task, "max_tokens": max_tokens, "ctx": ctx, "cls_only": cls_only,
            "random_init": handle.random_init, "seed": handle.seed, "documents": n_docs}


def _assemble(count, sums, n_documents, meta) -> BlockStats:
    """BlockStats of every block, refused where any activation was NaN or inf (the layers named)."""
    bad = ~torch.isfinite(sums).all(3).all(1).all(0)
    if bool(bad.any()):
        task = meta.get("task")
        raise NonFiniteActivationError(f"activations became NaN or inf in layers {torch.nonzero(bad).flatten().tolist()}"
                                       f"{' on task ' + repr(task) if task else ''}")
    # tokens last, as one process and a merge both write it: the cache file's bytes do not depend on who made it
    return BlockStats(count, sums, n_documents, {**meta, "tokens": float(count[:, 0].sum())})


def collect_blocks(handle, data, n_blocks: int = 32, *, max_tokens: int | None = None, batch_size: int | None = None,
                   ctx: int = 256, cls_only: bool = False, task: str | None = None, progress: bool = True,
                   distributed: bool | None = None, fused: bool = True, skip_positions=(),
                   equal_positions: bool = False) -> BlockStats:
    """collect_block_stats's result (the same documents, blocks and budget; the same sums to float32 rounding),
    with each block batched alone: what the study cache holds with evidence.blocks_alone. Under torchrun (distributed: default when
    torch.distributed is initialised) rank r computes blocks r, r + world, ... and the ranks' sums are added,
    so every rank returns what one process computes, bit for bit."""
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a whole number >= 1, got {n_blocks!r}")
    rank, world = shard_of(distributed)
    n_used = min(n_blocks, documents_read(handle, data, max_tokens=max_tokens, ctx=ctx))
    mine = list(range(rank, n_used, world))
    count, sums, n_documents, n_docs = _block_sums(handle, data, n_blocks, mine, max_tokens=max_tokens,
                                                   batch_size=batch_size, ctx=ctx, cls_only=cls_only, fused=fused,
                                                   progress=progress and rank == 0, skip_positions=skip_positions,
                                                   equal_positions=equal_positions)
    if world > 1:
        full_count = torch.zeros(n_used, *count.shape[1:], dtype=torch.float64)
        full_sums = torch.zeros(n_used, *sums.shape[1:], dtype=torch.float64)
        full_count[mine], full_sums[mine] = count, sums
        count, sums = _sum_over_ranks(full_count), _sum_over_ranks(full_sums)
    return _assemble(count, sums, n_documents, _base_meta(handle, task, max_tokens, ctx, cls_only, n_docs))


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = x.to(device)
    dist.all_reduce(x)
    return x.cpu()


# -- job arrays: collect this shard's blocks of every cache entry, then merge ------------------------------------
def collect(entries, shard: tuple[int, int], out_dir, *, progress: bool = True) -> list[Path]:
    """Write this shard's blocks of every cache entry (study.cache_entries: [(study, task, budget, n_blocks)]) into
    out_dir, one file per entry. The entries' blocks are dealt out in turn over all N shards, so the shards get
    (almost) equal numbers of blocks."""
    i, n = shard
    out_dir = Path(out_dir)
    written, unit = [], 0
    for study, task, budget, n_blocks in entries:
        if not study.params["evidence"]["blocks_alone"]:
            raise ValueError("collect needs `evidence: {blocks_alone: true}` in the parameter file: then each block is "
                             "batched alone, and the notebooks (run with the same file) read the merged statistics")
        data, options, key, path = study.block_entry(task, budget, n_blocks)
        max_tokens, ctx = options.get("max_tokens"), options.get("ctx", 256)
        n_used = min(n_blocks, documents_read(study.handle, data, max_tokens=max_tokens, ctx=ctx))
        mine = [b for b in range(n_used) if (unit + b) % n == i]
        unit += n_used
        count, sums, n_documents, n_docs = _block_sums(study.handle, data, n_blocks, mine, progress=progress,
                                                       **options)
        meta = {"entry": path.name, "shard": [i, n], "blocks": n_used, "cache_key": key,
                "meta": _base_meta(study.handle, task, max_tokens, ctx, options.get("cls_only", False), n_docs)}
        target = out_dir / f"{path.stem}.shard{i}-of-{n}.safetensors"
        save_tensors(target, {"count": count, "sums": sums, "block": torch.tensor(mine, dtype=torch.long),
                               "n_documents": n_documents}, meta)
        if progress:
            print(f"{study.kind} {task!r}{' (random init, seed ' + str(study.handle.seed) + ')' if study.handle.random_init else ''}: "
                  f"{len(mine)} of {n_used} blocks -> {target}")
        written.append(target)
    return written


class MergeError(ValueError):
    """Shard files that do not make whole cache entries (a block missing or twice, other settings)."""


def merge(dirs, out_dir) -> list[Path]:
    """Put the blocks in the shard files of `dirs` together into the cache entries under out_dir/stats/ (the
    params' cache_dir, or $MODSEP_CACHE), each exactly as one process would have written it. Every block of an
    entry must be in exactly one file, all from shards of the same N."""
    files: dict[str, list[Path]] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise MergeError(f"{d} is not a folder: give the folders `collect --out` wrote")
        for p in sorted(d.glob("*.safetensors")):
            m = SHARD_FILE.fullmatch(p.name)
            if m:
                files.setdefault(m["entry"], []).append(p)
    if not files:
        raise MergeError(f"no shard files (*.shardI-of-N.safetensors) in {', '.join(map(str, dirs))}: run "
                         f"`python -m modsep_nb collect PARAMS --shard I/N --out DIR` first")
    written = []
    for entry, paths in sorted(files.items()):
        parts = [load_tensors(p, require_checksum=True) for p in paths]
        metas = [m for _, m in parts]
        ns = {m["shard"][1] for m in metas}
        if len(ns) > 1 or any(m["meta"] != metas[0]["meta"] or m["blocks"] != metas[0]["blocks"] for m in metas):
            raise MergeError(f"{entry}: its shard files come from different runs (shards of N = {sorted(ns)}, or other "
                             f"data): keep one collect run's files per folder")
        n_used, base = metas[0]["blocks"], metas[0]["meta"]
        seen = torch.cat([t["block"] for t, _ in parts])
        if len(seen) != len(set(seen.tolist())) or set(seen.tolist()) != set(range(n_used)):
            missing = sorted(set(range(n_used)) - set(seen.tolist()))
            shards = sorted({m["shard"][0] for m in metas})
            raise MergeError(f"{entry} (task {base['task']!r}): blocks {missing or 'repeated'} of {n_used}; found shards "
                             f"{shards} of {ns.pop()}: run collect for every shard I/N (0 <= I < N), each file once")
        t0 = parts[0][0]
        count = torch.zeros(n_used, *t0["count"].shape[1:], dtype=torch.float64)
        sums = torch.zeros(n_used, *t0["sums"].shape[1:], dtype=torch.float64)
        for t, _ in parts:
            count[t["block"]], sums[t["block"]] = t["count"], t["sums"]
        blocks = _assemble(count, sums, t0["n_documents"], base)
        blocks.meta["cache_key"] = metas[0]["cache_key"]          # as Study writes it
        target = Path(out_dir) / "stats" / metas[0]["entry"]
        blocks.save(target)
        written.append(target)
    return written
