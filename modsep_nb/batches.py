"""Running data through a model in batches: LM documents cut into padded windows of `ctx` tokens, images in
chunks (the handle's modality builds them, modalities.py), with the positions that count handed to a statistics
collector. Shared by statistics and evaluation."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def run_batches(handle, data, collector, *, max_tokens=None, batch_size=None, ctx=256, cls_only=False,
                progress=True, desc="forward", on_logits=None, shard=(0, 1), doc_tokens=None, documents=False,
                logits=None, skip_positions=(), equal_positions=False, weights_by_position=None, head_input=False):
    """Run `data` through the model in batches, telling `collector` which positions count.
    shard=(rank, world_size): this process's share (every world_size-th window or image).
    logits: whether the passes need the model's output (default: when on_logits is given). Without it each
    forward stops after the last hooked layer (ModelHandle.read_forward) and on_logits gets None.
    documents=True: before each forward `collector.documents` is set to the index in `data` of each row's
    document (LM) or image [batch], and on_logits gets it as a last argument.
    skip_positions, equal_positions (LM): the positions of each window the collector does not count, and
    whether it weighs every other position alike (`collector.weights`; data.position_weights); the model
    still reads every token, so only what is counted changes. weights_by_position [ctx]: those weights given
    (e.g. a whole task's, when `data` is one block of it) instead of computed from the windows read here.
    head_input=True (LM): on_logits gets the output embedding's input [batch, tokens, d_model] instead of the
    logits (ModelHandle.head_input; ModelHandle.top1 reads top-1 from it)."""
    for name, value, low in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1), ("ctx", ctx, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be a whole number >= {low}{'' if name == 'ctx' else ' or None'}, "
                             f"got {value!r}")
    if logits is None:
        logits = on_logits is not None
    # the modality builds the batches (LM: windows of documents; images: chunks); the loop is the same
    total, unit, batches = handle.modality.batches(
        handle, data, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx, shard=shard, doc_tokens=doc_tokens,
        cls_only=cls_only, skip_positions=skip_positions, equal_positions=equal_positions,
        weights_by_position=weights_by_position)
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)
    for batch in batches:
        if collector is not None:
            collector.positions = batch.positions      # set while on the CPU: no device sync
            if equal_positions:
                collector.weights = batch.weights
            if documents:
                collector.documents = batch.documents
        if head_input:
            out = handle.head_input(batch.inputs, batch.mask)
        else:
            out = handle.logits(batch.inputs, batch.mask) if logits else handle.read_forward(batch.inputs, batch.mask)
        if on_logits is not None:
            on_logits(out, *batch.given, *([batch.documents] if documents else []))
        bar.update(batch.read)
    bar.close()
