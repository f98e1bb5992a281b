"""Task data (SPEC §4, §9): disjoint seeded text splits, the embedded domains, LM batching, Fashion-MNIST,
image task groups, clear errors for missing data, and the project's Fashion-MNIST ViT (trained, cached,
deterministic)."""
from __future__ import annotations

import collections
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PAD_ID, encode, random_texts, windows_of
from modsep_nb import data, load_model
from modsep_nb.data import (EMBEDDED_TEXT_DOMAINS, FASHION_MNIST_CLASSES, DataNotAvailableError, ImageDataset,
                            embedded_text_domain, fashion_mnist, image_tasks, lm_batches, split_documents,
                            text_tasks)


# -- text --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_domains():
    return {name: embedded_text_domain(name) for name in EMBEDDED_TEXT_DOMAINS}


def test_every_embedded_domain_is_nonempty(all_domains):
    for name, docs in all_domains.items():
        assert len(docs) >= 10, name
        assert all(isinstance(d, str) and d.strip() for d in docs), name


@pytest.mark.parametrize("name", ["code", "docs", "licenses", "computers", "songs-poems"])
def test_text_split_disjoint_and_complete(name, all_domains):
    task = text_tasks([name], eval_frac=0.3, seed=0)[name]
    collect, evaluate = set(task.collect), set(task.evaluate)
    assert collect and evaluate
    assert not collect & evaluate, "a document is in both the collection and the evaluation part"
    assert collect | evaluate == set(all_domains[name])          # nothing lost
    assert len(task.collect) == len(collect) and len(task.evaluate) == len(evaluate)
    n = len(set(all_domains[name]))
    assert len(task.evaluate) == round(0.3 * n)


def test_text_split_deterministic_per_seed():
    a = text_tasks(["science", "law"], seed=0)
    b = text_tasks(["science", "law"], seed=0)
    c = text_tasks(["science", "law"], seed=1)
    for name in ("science", "law"):
        assert a[name].collect == b[name].collect and a[name].evaluate == b[name].evaluate
        assert set(a[name].evaluate) != set(c[name].evaluate)


def test_split_documents_with_duplicates_never_leaks():
    docs = ["same"] * 5 + [f"doc {i}" for i in range(20)]
    for seed in range(20):
        collect, evaluate = split_documents(docs, 0.3, seed)
        assert not set(collect) & set(evaluate)


def test_split_documents_rejects_bad_input():
    with pytest.raises(ValueError):
        split_documents([], 0.3)
    with pytest.raises(ValueError):
        split_documents(["a", "b"], 1.0)
    with pytest.raises(ValueError):
        split_documents(["only one"], 0.3)


def test_unknown_domain_lists_known_ones():
    with pytest.raises(ValueError) as err:
        text_tasks(["no-such-domain"])
    msg = str(err.value)
    assert "no-such-domain" in msg
    assert all(name in msg for name in EMBEDDED_TEXT_DOMAINS)


def test_missing_fortunes_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path)
    with pytest.raises(DataNotAvailableError) as err:
        embedded_text_domain("science")
    assert "apt-get install" in str(err.value) and "fortunes" in str(err.value)


def test_missing_licenses_gives_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "nope")
    with pytest.raises(DataNotAvailableError, match="base-files"):
        embedded_text_domain("licenses")


# -- LM batching -------------------------------------------------------------------------------------------
def _rows(batches):
    """Real tokens of every row, and checks of the padding layout."""
    rows = []
    for ids, mask in batches:
        assert ids.shape == mask.shape and ids.dtype == torch.long
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            assert n >= 1
            assert mask[r, :n].eq(1).all() and mask[r, n:].eq(0).all(), "padding must be on the right"
            assert ids[r, n:].eq(PAD_ID).all(), "padding positions must hold the pad id"
            rows.append(ids[r, :n].tolist())
        assert mask.sum(1).max() == ids.shape[1], "a batch is as wide as its longest row"
    return rows


def test_lm_batches_windows_padding_and_mask(tokenizer):
    texts = random_texts(9, seed=1, max_len=13)
    batches = list(lm_batches(tokenizer, texts, ctx=5, batch_size=3))
    rows = _rows(batches)
    assert rows == windows_of(texts, 5)
    assert all(len(b[0]) <= 3 for b in batches)
    assert all(b[0].shape[1] <= 5 for b in batches)


@pytest.mark.parametrize("max_tokens", [1, 7, 23, 40])
def test_lm_batches_max_tokens_exact(tokenizer, max_tokens):
    texts = random_texts(12, seed=2, max_len=13)
    rows = _rows(lm_batches(tokenizer, texts, ctx=6, batch_size=4, max_tokens=max_tokens))
    assert sum(len(r) for r in rows) == max_tokens
    # the tokens are the first max_tokens of the unlimited stream, in order
    flat = [t for w in windows_of(texts, 6) for t in w]
    assert [t for r in rows for t in r] == flat[:max_tokens]


def test_lm_batches_tokenizer_matches_encode(tokenizer):
    # the fixture tokenizer really is the word-level one the expectations assume
    text = "w01 w02 w47 zzz"
    assert tokenizer(text)["input_ids"] == encode(text)


# -- Fashion-MNIST -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist():
    return fashion_mnist("train"), fashion_mnist("test")


def _raw_labels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    return np.frombuffer(raw[8:], dtype=np.uint8)


def test_fashion_mnist_shapes_and_normalisation(fmnist):
    train, test = fmnist
    assert tuple(train.images.shape) == (60000, 1, 28, 28) and tuple(test.images.shape) == (10000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.long
    assert train.class_names == FASHION_MNIST_CLASSES
    # labels as stored in the idx files, read independently
    root = data.FASHION_MNIST_DIR
    assert np.array_equal(train.labels.numpy(), _raw_labels(root / "train-labels-idx1-ubyte.gz"))
    assert np.array_equal(test.labels.numpy(), _raw_labels(root / "t10k-labels-idx1-ubyte.gz"))
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # normalised with the train set's mean and std
    assert abs(train.images.mean().item()) < 0.01
    assert abs(train.images.std().item() - 1.0) < 0.01
    # and the normalisation is invertible back to the 8-bit pixels
    mean, std = data.FASHION_MNIST_NORM
    pixels = (test.images[:50] * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert pixels.min() > -0.01 and pixels.max() < 255.01


def test_image_tasks_groups_and_classes(fmnist):
    train, _ = fmnist
    classes = image_tasks(train, "classes")
    assert classes == {c: [c] for c in FASHION_MNIST_CLASSES}
    groups = image_tasks(train, "groups")
    members = [c for cs in groups.values() for c in cs]
    assert sorted(members) == sorted(FASHION_MNIST_CLASSES)           # each class in exactly one group
    assert set(groups["tops"]) == {"T-shirt/top", "Pullover", "Coat", "Shirt"}
    assert set(groups["footwear"]) == {"Sandal", "Sneaker", "Ankle boot"}
    assert image_tasks(train, {"x": ["Bag", "Trouser"]}) == {"x": ["Bag", "Trouser"]}
    with pytest.raises(ValueError, match="Hat"):
        image_tasks(train, {"x": ["Hat"]})
    with pytest.raises(ValueError):
        image_tasks(train, "superclasses")
    other = ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), ["a", "b"], "toy")
    with pytest.raises(ValueError):
        image_tasks(other, "groups")


def test_image_subset(fmnist):
    _, test = fmnist
    footwear = test.subset(["Sandal", "Sneaker", "Ankle boot"])
    expected = test.images[(test.labels == 5) | (test.labels == 7) | (test.labels == 9)]
    assert torch.equal(footwear, expected)
    assert len(test.subset(["Bag"], max_images=17)) == 17


def test_missing_fashion_mnist_gives_install_hint(tmp_path):
    with pytest.raises(DataNotAvailableError) as err:
        fashion_mnist("train", root=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    with pytest.raises(ValueError):
        fashion_mnist("validation")


# -- the project's Fashion-MNIST ViT -----------------------------------------------------------------------
SMALL = dict(epochs=1, n_train=2000, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


def test_fmnist_vit_trains_caches_and_is_deterministic(monkeypatch, tmp_path, fmnist):
    import modsep_nb.vit_training as vt
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "a"))
    first = load_model("fmnist-vit", **SMALL)
    assert type(first.model).__name__ == "ViTForImageClassification"
    assert first.kind == "image" and first.n_layers == 2 and first.d_mlp == 64
    assert first.image_shape == (1, 28, 28)
    saved = [p for p in (tmp_path / "a").iterdir() if p.name.startswith("fmnist-vit")]
    assert len(saved) == 1 and (saved[0] / "config.json").is_file()

    # the stored test accuracy is the model's accuracy on the test split, recomputed here
    _, test = fmnist
    with torch.no_grad():
        preds = torch.cat([first.model(pixel_values=test.images[i:i + 1000]).logits.argmax(-1)
                           for i in range(0, 10000, 1000)])
    accuracy = (preds == test.labels).float().mean().item()
    assert first.info["test_accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert accuracy > 0.15         # 10 classes: chance is 0.1 (16 steps reach about 0.25)

    # a second load reuses the cache: no training, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in saved[0].iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was trained again")
    monkeypatch.setattr(vt, "train_fmnist_vit", no_training)
    again = load_model("fmnist-vit", **SMALL)
    assert {p: p.stat().st_mtime_ns for p in saved[0].iterdir()} == mtimes
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    monkeypatch.undo()

    # the same settings in another cache folder train to identical weights
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path / "b"))
    second = load_model("fmnist-vit", **SMALL)
    assert (tmp_path / "b" / saved[0].name).is_dir()
    s1, s2 = first.model.state_dict(), second.model.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert second.info["test_accuracy"] == first.info["test_accuracy"]


def test_fmnist_vit_rejects_unknown_option():
    with pytest.raises(TypeError, match="n_layers"):
        load_model("fmnist-vit", n_layers=3)


def test_word_counts_helper_sanity():
    # the helpers used by the expectations above do what they say
    texts = ["w00 w01", "w02"]
    assert windows_of(texts, 2) == [[2, 7], [2, 9]]          # a lone trailing token has no target
    assert collections.Counter(encode("w00 w00"))[7] == 2
