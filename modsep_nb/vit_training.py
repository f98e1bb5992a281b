"""The embedded image model: a small ViT trained here on Fashion-MNIST (no pretrained one exists offline).

Trained once (seeded), saved with save_pretrained plus its test accuracy, cached by its settings, and
reused. The default settings reach about 83% test accuracy in about 5 minutes on two CPU cores.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import FASHION_MNIST_CLASSES, fashion_mnist
from .files import cache_dir, cached_dir

DEFAULT_TRAINING = dict(epochs=2, n_train=None, batch_size=128, lr=2e-3, seed=0, hidden_size=64,
                        num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, patch_size=4)


def vit_config(settings: dict):
    from transformers import ViTConfig
    return ViTConfig(image_size=28, patch_size=settings["patch_size"], num_channels=1,
                     hidden_size=settings["hidden_size"], num_hidden_layers=settings["num_hidden_layers"],
                     num_attention_heads=settings["num_attention_heads"],
                     intermediate_size=settings["intermediate_size"], hidden_act="gelu",
                     num_labels=len(FASHION_MNIST_CLASSES),
                     id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                     label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
                     architectures=["ViTForImageClassification"])


def fmnist_vit_dir(**overrides) -> Path:
    """The cached model folder for these training settings; trains it first if missing."""
    unknown = sorted(set(overrides) - set(DEFAULT_TRAINING))
    if unknown:
        raise TypeError(f"unknown fmnist-vit training options {unknown}; known: {sorted(DEFAULT_TRAINING)}")
    settings = {**DEFAULT_TRAINING, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / f"fmnist-vit-{key}"
    # verified against its manifest on every load; trained (again) when missing or different
    return cached_dir(target, lambda tmp: train_fmnist_vit(tmp, settings), what="Fashion-MNIST ViT")


def train_fmnist_vit(target: Path, settings: dict) -> float:
    """Train, evaluate on the test split, and save into the (temporary) folder `target`. Returns test
    accuracy."""
    from transformers import ViTForImageClassification
    train, test = fashion_mnist("train"), fashion_mnist("test")
    images, labels = train.images, train.labels
    if settings["n_train"]:
        images, labels = images[: settings["n_train"]], labels[: settings["n_train"]]
    gen = torch.Generator().manual_seed(settings["seed"])
    torch.manual_seed(settings["seed"])
    model = ViTForImageClassification(vit_config(settings))
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.05)
    bs = settings["batch_size"]
    steps = settings["epochs"] * ((len(images) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=steps, pct_start=0.1)
    start = time.time()
    model.train()
    with tqdm(total=steps, desc="training fmnist-vit", unit="step") as bar:
        for _ in range(settings["epochs"]):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), bs):
                idx = order[i:i + bs]
                loss = F.cross_entropy(model(pixel_values=images[idx]).logits, labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=test.images[i:i + 512]).logits.argmax(-1)
                           for i in range(0, len(test), 512)])
    accuracy = float((preds == test.labels).float().mean())
    info = {"test_accuracy": accuracy, "training": settings, "train_seconds": round(time.time() - start, 1),
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "n_train": len(images)}
    model.save_pretrained(target)
    (Path(target) / "modsep_info.json").write_text(json.dumps(info, indent=1))
    print(f"fmnist-vit: test accuracy {accuracy:.3f} after {settings['epochs']} epoch(s) on {len(images)} images "
          f"({info['train_seconds']} s)")
    return accuracy
