"""Modalities: what differs between language and image models, in one place (issue #25).

A handle's `modality` (ModelHandle.modality) and a tasks class's (TextTasks.modality, ImageTasks.modality) is TEXT or
IMAGE. The modules that run data through a model ask it how a batch is built, what the forward's inputs are, how
many documents (images) a budget reads, what the outputs are called, rather than compare kind strings. Each
method takes the model's handle; this module imports no other module that handles models, so models.py can.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .data import document_windows, images_and_labels, lm_batches, lm_windows, position_weights


class Batch(NamedTuple):
    """One forward of batches.run_batches, whatever the modality."""
    inputs: torch.Tensor                # token ids [B, T] or images [B, C, H, W], on the model's device
    mask: torch.Tensor | None           # attention mask [B, T] on the device (LM); None for images
    documents: torch.Tensor             # index in the data of each row's document (image) [B]
    positions: torch.Tensor | None      # [B, T] bool, the positions a collector counts; None: all
    weights: torch.Tensor | None        # [B, T] float64, each position's weight in statistics (LM)
    given: tuple                        # what on_logits gets after the logits: (ids, mask) or (start,)
    read: int                           # progress: tokens (LM) or batches (images) read


class TextModality:
    """Language models: data are documents (list[str]) read as padded windows of `ctx` tokens (data.lm_batches),
    the outputs score the next token at every position, a budget counts tokens."""
    kind, section, unit = "lm", "lm", "tokens"            # Architecture.kind, the params section, what budgets count
    auto_class = "AutoModelForCausalLM"                   # builds one from a config (plan.model_size)

    def logits(self, handle, inputs, mask):
        return handle.lm_logits(inputs, mask)

    def check(self, data) -> None:
        if isinstance(data, str) or not all(isinstance(t, str) for t in data):
            raise TypeError("a language model takes a list of documents (list[str]) as data")
        if not data:
            raise ValueError("the text data is empty: pass at least one document")

    def batches(self, handle, data, *, max_tokens, batch_size, ctx, shard, doc_tokens=None, cls_only=False,
                skip_positions=(), equal_positions=False, weights_by_position=None):
        """(progress total, its unit, the batches): see batches.run_batches (cls_only is for images)."""
        self.check(data)
        device = handle.device
        windows = lm_batches(handle.tokenizer, data, ctx=ctx, batch_size=batch_size or 8, max_tokens=max_tokens,
                             doc_tokens=doc_tokens, shard=shard, with_documents=True, with_weights=True,
                             skip_positions=skip_positions, equal_positions=equal_positions,
                             weights_by_position=weights_by_position, by_length=True)

        def run():
            for ids, mask, docs, weights in windows:
                read = int(mask.sum())
                ids, mask = ids.to(device), mask.to(device)
                yield Batch(ids, mask, docs, weights > 0, weights, (ids, mask), read)
        return max_tokens, "tok", run()

    def documents_read(self, handle, data, *, max_tokens, ctx) -> int:
        if isinstance(data, str) or not all(isinstance(t, str) for t in data) or not data:
            raise TypeError("a language model takes a non-empty list of documents (list[str]) as data")
        _, docs = lm_windows(handle.tokenizer, data, ctx=ctx, max_tokens=max_tokens, with_documents=True)
        return max(docs) + 1      # read in rounds: the last window need not be the last document

    def block_part(self, handle, data, block_of: torch.Tensor, *, max_tokens, ctx):
        """block -> (its documents, the tokens the whole pass reads from them): a block's own documents read in
        rounds with that budget give exactly the windows the whole pass reads from them, in the same order
        (rounds visit documents in order)."""
        taken = torch.zeros(int(block_of.max()) + 1, dtype=torch.long)
        for d, window in document_windows(handle.tokenizer, data, ctx=ctx, max_tokens=max_tokens):
            taken[block_of[d]] += len(window)

        def part(b):
            docs = torch.nonzero(block_of == b).flatten()
            return data[int(docs[0]):int(docs[-1]) + 1], int(taken[b])
        return part

    def task_weights(self, handle, data, *, max_tokens, ctx, skip_positions=(), equal_positions=False):
        """The position weights [ctx] of all the windows a pass reads (data.position_weights)."""
        lengths = [len(w) for w in lm_windows(handle.tokenizer, data, ctx=ctx, max_tokens=max_tokens)]
        return position_weights(lengths, ctx, skip_positions=skip_positions, equal_positions=equal_positions)

    def grid_tokens(self, handle) -> None:
        """Tokens of one input's activation grid: none, a window's length varies."""

    def output_names(self, handle, n: int) -> list[str]:
        known = len(handle.tokenizer)
        return [handle.tokenizer.decode([i]) if i < known else f"#{i}" for i in range(n)]

    def chance_accuracy(self, handle) -> None:
        """No fixed chance level: next-token top-1 by chance depends on the text."""

    def tokens_per_unit(self, config) -> int:
        return 1

    def random_batch(self, handle, batch_size: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(inputs, mask, tokens) of batch_size random windows of ctx tokens, for timing."""
        x = torch.randint(10, 100, (batch_size, ctx), device=handle.device)
        return x, torch.ones_like(x), x.numel()


class ImageModality:
    """Image models: data are images (a tensor [N, C, H, W], an ImageDataset or a dataset of images) read in
    chunks, the outputs score one class per image, a budget counts images."""
    kind, section, unit = "image", "vit", "images"
    auto_class = "AutoModelForImageClassification"

    def logits(self, handle, inputs, mask=None):
        return handle.image_logits(inputs)

    def batches(self, handle, data, *, max_tokens, batch_size, ctx=None, shard, doc_tokens=None, cls_only=False,
                skip_positions=(), equal_positions=False, weights_by_position=None):
        """(progress total, its unit, the batches): see batches.run_batches; max_tokens counts images, the
        positions are all (cls_only: the CLS token only)."""
        images = images_and_labels(data)[0]
        check_images(handle, images)
        if max_tokens is not None:
            images = images[:max_tokens]
        index = torch.arange(len(images))[shard[0]::shard[1]]
        images = images[shard[0]::shard[1]]
        bs, device = batch_size or 64, handle.device
        starts = range(0, len(images), bs)

        def batch(start):
            x = images[start:start + bs].to(device=device, dtype=handle.dtype)
            positions = None
            if cls_only:
                positions = torch.zeros(x.shape[0], n_image_tokens(handle), dtype=torch.bool)
                positions[:, 0] = True
            return Batch(x, None, index[start:start + bs], positions, None, (start,), 1)
        return len(starts), "batch", (batch(start) for start in starts)

    def documents_read(self, handle, data, *, max_tokens, ctx=None) -> int:
        n = len(images_and_labels(data)[0])
        return n if max_tokens is None else min(n, max_tokens)

    def block_part(self, handle, data, block_of: torch.Tensor, *, max_tokens, ctx=None):
        """block -> (its images, None: all of them)."""
        images = images_and_labels(data)[0][:len(block_of)]

        def part(b):
            docs = torch.nonzero(block_of == b).flatten()
            return images[int(docs[0]):int(docs[-1]) + 1], None
        return part

    def task_weights(self, handle, data, **options) -> None:
        """Every token of an image weighs alike."""

    def grid_tokens(self, handle) -> int:
        return n_image_tokens(handle)

    def output_names(self, handle, n: int) -> list[str]:
        """The config's id2label ("class i" without one)."""
        labels = getattr(getattr(handle.model, "config", None), "id2label", None) or {}
        return [str(labels.get(i, labels.get(str(i), f"class {i}"))) for i in range(n)]

    def chance_accuracy(self, handle) -> float | None:
        n_labels = getattr(handle.model.config, "num_labels", None)
        return 1.0 / n_labels if n_labels else None

    def tokens_per_unit(self, config) -> int:
        return (config.image_size // config.patch_size) ** 2 + 1         # patches and the class token

    def random_batch(self, handle, batch_size: int, ctx=None) -> tuple[torch.Tensor, None, int]:
        x = torch.randn(batch_size, *handle.image_shape, device=handle.device, dtype=handle.dtype)
        return x, None, len(x)


TEXT, IMAGE = TextModality(), ImageModality()
MODALITIES = {m.kind: m for m in (TEXT, IMAGE)}         # Architecture.kind -> its modality


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
