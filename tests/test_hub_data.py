"""The paper's datasets go through the real `datasets` loading code; offline they are read from small
`save_to_disk` copies made here, and without a copy they fail with an error that says how to provide one."""
import numpy as np
import pytest
import torch

from modsep_nb.data import DataNotAvailableError, cifar100, hub_text_domain, text_tasks


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_text_domain_from_save_to_disk(tmp_path):
    import datasets
    rows = {"message_1": [f"q{i}" for i in range(30)], "message_2": [f"answer number {i} about cells" for i in range(30)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "biology"))
    docs = hub_text_domain("biology", local_dir=str(tmp_path / "biology"), max_docs=25)
    assert docs == rows["message_2"][:25]
    tasks = text_tasks(["biology"], source="hub", data_dir=str(tmp_path), eval_frac=0.2)
    t = tasks["biology"]
    assert sorted(t.collect + t.evaluate) == sorted(rows["message_2"]) and not set(t.collect) & set(t.evaluate)


def test_pile_subset_and_toxicity_filters(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "meta": [{"pile_set_name": "Github"},
                                                                     {"pile_set_name": "ArXiv"},
                                                                     {"pile_set_name": "Github"}]})
    ds.save_to_disk(str(tmp_path / "pile"))
    assert hub_text_domain("pile_Github", local_dir=str(tmp_path / "pile")) == ["a", "c"]
    cc = datasets.Dataset.from_dict({"text": ["calm", "rude", "mid"], "toxicity": [0.0, 0.9, 0.5]})
    cc.save_to_disk(str(tmp_path / "cc"))
    assert hub_text_domain("civil", local_dir=str(tmp_path / "cc")) == ["calm"]
    assert hub_text_domain("toxic", local_dir=str(tmp_path / "cc")) == ["rude"]


def test_hub_dataset_offline_error_says_how(offline, tmp_path):
    with pytest.raises(DataNotAvailableError) as err:
        hub_text_domain("biology", local_dir=str(tmp_path / "missing"))
    assert "camel-ai/biology" in str(err.value) and "save_to_disk" in str(err.value)
    with pytest.raises(DataNotAvailableError, match="uoft-cs/cifar100"):
        cifar100("test", local_dir=str(tmp_path / "missing"))


def test_cifar100_coarse_labels_from_save_to_disk(tmp_path):
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    names = [f"super{i}" for i in range(20)]
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"img": datasets.Image(), "coarse_label": datasets.ClassLabel(names=names)})
    split = datasets.Dataset.from_dict({"img": imgs, "coarse_label": [0, 3, 3, 19, 5, 0]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "c100"))
    ds = cifar100("test", local_dir=str(tmp_path / "c100"))
    assert ds.images.shape == (6, 3, 32, 32) and ds.class_names == names
    assert torch.equal(ds.labels, torch.tensor([0, 3, 3, 19, 5, 0]))
    expected = (np.asarray(imgs[1], dtype=np.float32) / 255.0 - 0.5) / 0.5
    assert np.allclose(ds.images[1].permute(1, 2, 0).numpy(), expected)
    no_labels = datasets.Dataset.from_dict({"img": imgs[:2]}, features=datasets.Features({"img": datasets.Image()}))
    datasets.DatasetDict({"test": no_labels}).save_to_disk(str(tmp_path / "nolabels"))
    with pytest.raises(ValueError, match="no 'coarse_label'"):
        cifar100("test", local_dir=str(tmp_path / "nolabels"))


def test_cifar100_fine_classes_grouped_by_superclass(tmp_path):
    """A CIFAR-100 classifier predicts the 100 fine classes: they are the labels, and the superclasses (the
    paper's tasks) are groups of them, read off the dataset's own (fine, coarse) pairs."""
    import datasets
    from PIL import Image
    from modsep_nb.data import image_tasks
    from modsep_nb.params import load_params
    rng = np.random.default_rng(0)
    coarse_names, fine_names = [f"super{i}" for i in range(20)], [f"fine{i}" for i in range(100)]
    fine = [7, 12, 7, 99, 3, 12, 50]
    coarse = [f % 20 for f in fine]                                  # any fixed map from fine to coarse
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in fine]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=fine_names),
                                  "coarse_label": datasets.ClassLabel(names=coarse_names)})
    split = datasets.Dataset.from_dict({"img": imgs, "fine_label": fine, "coarse_label": coarse}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "c100"))
    ds = cifar100("test", local_dir=str(tmp_path / "c100"))
    assert ds.class_names == fine_names and torch.equal(ds.labels, torch.tensor(fine))
    expected = {}
    for f in sorted(set(fine)):
        expected.setdefault(coarse_names[f % 20], []).append(fine_names[f])
    assert ds.groups == {name: expected[name] for name in coarse_names if name in expected}
    assert image_tasks(ds, "groups") == ds.groups
    assert image_tasks(ds, "classes") == {c: [c] for c in fine_names}
    load_params(None, {"vit": {"dataset": "cifar100", "tasks": "groups", "eval_images": 500},
                       "dynamics": {"eval_images": 500}})
    load_params(None, {"vit": {"dataset": "cifar100", "tasks": "groups", "eval_images": 500}, "notebooks": ["01"]})
    without_groups = cifar100("test", local_dir=str(tmp_path / "c100"))
    without_groups.groups = None
    with pytest.raises(ValueError, match="has none: pass a dict"):
        image_tasks(without_groups, "groups")
