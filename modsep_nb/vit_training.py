"""The embedded image model: a small ViT trained here on Fashion-MNIST (no pretrained one exists offline).

Trained once (seeded), saved with save_pretrained plus its test accuracy, cached by its settings, and
reused. The default settings reach about 83% test accuracy in about 5 minutes on two CPU cores.

The same training run also saves `checkpoints` snapshots at log-spaced steps (checkpoint_steps) under
checkpoints/step-N/ of the model folder: step 0 is the seeded initialisation (the weights
load_model(..., random_init=True, seed=<training seed>) gives) and the last is the model folder itself.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import FASHION_MNIST_CLASSES, fashion_mnist
from .files import cache_dir, cached_dir

DEFAULT_TRAINING = dict(epochs=2, n_train=None, batch_size=128, lr=2e-3, seed=0, hidden_size=64,
                        num_hidden_layers=6, num_attention_heads=4, intermediate_size=256, patch_size=4,
                        checkpoints=10)


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


def fmnist_vit_path(**overrides) -> tuple[Path, dict]:
    """(the cache folder of the model trained with these settings, whether or not it is there yet; the settings)."""
    unknown = sorted(set(overrides) - set(DEFAULT_TRAINING))
    if unknown:
        raise TypeError(f"unknown fmnist-vit training options {unknown}; known: {sorted(DEFAULT_TRAINING)}")
    settings = {**DEFAULT_TRAINING, **overrides}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"fmnist-vit-{key}", settings


def fmnist_vit_dir(**overrides) -> Path:
    """The cached model folder for these training settings; trains it first if missing."""
    target, settings = fmnist_vit_path(**overrides)
    # verified against its manifest on every load; trained (again) when missing or different. The key covers
    # every setting, `checkpoints` included, so a folder saved before checkpoints existed is never reused
    return cached_dir(target, lambda tmp: train_fmnist_vit(tmp, settings), what="Fashion-MNIST ViT")


def fmnist_vit_checkpoints(**overrides) -> dict[int, Path]:
    """{training step: model folder} of the cached run with these settings, from step 0 (the initialisation)
    to the last step, which is the model folder itself (trains it first if missing)."""
    folder = fmnist_vit_dir(**overrides)
    info = json.loads((folder / "modsep_info.json").read_text(encoding="utf-8"))
    return {int(step): folder / rel for step, rel in info["checkpoints"].items()}


def checkpoint_steps(total: int, n: int) -> list[int]:
    """`n` distinct training steps from 0 (the initialisation) to `total` (the end), log-spaced between 1 and
    `total` (consecutive where log-spacing would repeat a step, as at the start of a short run)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"the number of checkpoints must be a whole number >= 2 (the start and the end), got {n!r}")
    if total < n - 1:
        raise ValueError(f"training has {total} steps, too few for {n} distinct checkpoints: use at most "
                         f"{total + 1} checkpoints or train longer")
    steps = [0]
    for i, ideal in enumerate(np.geomspace(1, total, n - 1)):
        room = total - (n - 2 - i)            # leave one step for each checkpoint still to place
        steps.append(min(max(int(round(ideal)), steps[-1] + 1), room))
    return steps


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
    schedule = checkpoint_steps(steps, settings["checkpoints"])
    saved = {steps: "."}                      # the last checkpoint is the model folder itself

    def snapshot(step: int) -> None:
        if step in schedule and step != steps:
            rel = f"checkpoints/step-{step}"
            model.save_pretrained(Path(target) / rel)
            step_info = json.dumps({"step": step, "of": steps, "training": settings}, indent=1)
            (Path(target) / rel / "modsep_info.json").write_text(step_info, encoding="utf-8")
            saved[step] = rel
    start = time.time()
    model.train()
    snapshot(0)                                # the seeded initialisation, before any update
    done = 0
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
                done += 1
                snapshot(done)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(pixel_values=test.images[i:i + 512]).logits.argmax(-1)
                           for i in range(0, len(test), 512)])
    accuracy = float((preds == test.labels).float().mean())
    info = {"test_accuracy": accuracy, "training": settings, "train_seconds": round(time.time() - start, 1),
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "n_train": len(images),
            "checkpoints": {str(k): saved[k] for k in sorted(saved)}}
    model.save_pretrained(target)
    (Path(target) / "modsep_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    print(f"fmnist-vit: test accuracy {accuracy:.3f} after {settings['epochs']} epoch(s) on {len(images)} images "
          f"({info['train_seconds']} s)")
    return accuracy
