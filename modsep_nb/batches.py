"""Running data through a model in batches: LM documents cut into padded windows of `ctx` tokens, images in
chunks, with the positions that count handed to a statistics collector. Shared by statistics and evaluation."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import images_and_labels, lm_batches


@torch.no_grad()
def run_batches(handle, data, collector, *, max_tokens=None, batch_size=None, ctx=256, cls_only=False,
                progress=True, desc="forward", on_logits=None, shard=(0, 1), doc_tokens=None, documents=False,
                logits=None, skip_positions=(), equal_positions=False, weights_by_position=None):
    """Run `data` through the model in batches, telling `collector` which positions count.
    shard=(rank, world_size): this process's share (every world_size-th window or image).
    logits: whether the passes need the model's output (default: when on_logits is given). Without it each
    forward stops after the last hooked layer (ModelHandle.read_forward) and on_logits gets None.
    documents=True: before each forward `collector.documents` is set to the index in `data` of each row's
    document (LM) or image [batch], and on_logits gets it as a last argument.
    skip_positions, equal_positions (LM): the positions of each window the collector does not count, and
    whether it weighs every other position alike (`collector.weights`; data.position_weights); the model
    still reads every token, so only what is counted changes. weights_by_position [ctx]: those weights given
    (e.g. a whole task's, when `data` is one block of it) instead of computed from the windows read here."""
    for name, value, low in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1), ("ctx", ctx, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be a whole number >= {low}{'' if name == 'ctx' else ' or None'}, "
                             f"got {value!r}")
    device = handle.device
    if logits is None:
        logits = on_logits is not None
    if handle.kind == "lm":
        if isinstance(data, str) or not all(isinstance(t, str) for t in data):
            raise TypeError("a language model takes a list of documents (list[str]) as data")
        if not data:
            raise ValueError("the text data is empty: pass at least one document")
        batches = lm_batches(handle.tokenizer, data, ctx=ctx, batch_size=batch_size or 8, max_tokens=max_tokens,
                             doc_tokens=doc_tokens, shard=shard, with_documents=True, with_weights=True,
                             skip_positions=skip_positions, equal_positions=equal_positions,
                             weights_by_position=weights_by_position, by_length=True)
        bar = tqdm(total=max_tokens, desc=desc, unit="tok", disable=not progress, leave=False)
        for ids, mask, docs, weights in batches:
            if collector is not None:
                collector.positions = weights > 0      # set while on the CPU: no device sync
                if equal_positions:
                    collector.weights = weights
                if documents:
                    collector.documents = docs
            ids, mask = ids.to(device), mask.to(device)
            out = handle.lm_logits(ids, mask) if logits else handle.read_forward(ids, mask)
            if on_logits is not None:
                on_logits(out, ids, mask, *([docs] if documents else []))
            bar.update(int(mask.sum()))
        bar.close()
        return
    images = images_and_labels(data)[0]
    check_images(handle, images)
    if max_tokens is not None:   # for images the budget counts images
        images = images[:max_tokens]
    index = torch.arange(len(images))[shard[0]::shard[1]]
    images = images[shard[0]::shard[1]]
    bs = batch_size or 64
    for start in tqdm(range(0, len(images), bs), desc=desc, unit="batch", disable=not progress, leave=False):
        x = images[start:start + bs].to(device=device, dtype=handle.dtype)
        docs = index[start:start + bs]
        if collector is not None:
            collector.positions = None
            if documents:
                collector.documents = docs
            if cls_only:
                n_tok = n_image_tokens(handle)
                pos = torch.zeros(x.shape[0], n_tok, dtype=torch.bool)
                pos[:, 0] = True
                collector.positions = pos
        out = handle.image_logits(x) if logits else handle.read_forward(x)
        if on_logits is not None:
            on_logits(out, start, *([docs] if documents else []))


def n_image_tokens(handle) -> int:
    c, h, w = handle.image_shape
    if not hasattr(handle.model, "config"):   # timm: patches plus its class (and distillation) tokens
        return handle.model.patch_embed.num_patches + getattr(handle.model, "num_prefix_tokens", 1)
    cfg = handle.model.config
    return (h // cfg.patch_size) * (w // cfg.patch_size) + 1


def check_images(handle, images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise TypeError(f"an image model takes a float tensor [N, C, H, W] or an ImageDataset, got "
                        f"{type(images).__name__}{'' if not isinstance(images, torch.Tensor) else list(images.shape)}")
    if len(images) == 0:
        raise ValueError("the image data is empty")
    expected = handle.image_shape
    if tuple(images.shape[1:]) != tuple(expected):
        raise ValueError(f"images have shape [C, H, W] = {list(images.shape[1:])} but {handle.label} expects "
                         f"{list(expected)}: resize/convert them (e.g. with the model's processor) first")
    if not images.is_floating_point():
        raise TypeError("images must be a float tensor (normalised as the model expects), not integers")
