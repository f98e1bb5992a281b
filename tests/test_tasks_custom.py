"""Own tasks in params (issue #16): text tasks from files or a `datasets` dataset, image tasks from an image
folder; each goes through the same seeded, document-disjoint split and into tasks.json with its ids, and
`check` stops a task that cannot run with one clear error."""
from __future__ import annotations

import random
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tokenizer, random_texts, save_hf_vit
from modsep_nb import data
from modsep_nb.__main__ import main
from modsep_nb.params import ParamsError, load_params
from modsep_nb.study import Study
from modsep_nb.tasks import TextTasks


def write_params(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_texts(folder: Path, names: list[str], seed: int) -> dict[str, str]:
    """Files of distinct random words under `folder`; {path relative to folder: text}."""
    texts = {}
    for name, text in zip(names, random_texts(len(names), seed=seed, min_len=5)):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        texts[name] = text
    return texts


def assert_split(task: data.TextTask, expected: dict[str, str]) -> None:
    """Disjoint, complete, each id's text the expected one."""
    assert set(task.collect_ids).isdisjoint(task.evaluate_ids)
    assert set(task.collect_ids) | set(task.evaluate_ids) == set(expected)
    assert task.evaluate_ids and task.collect_ids
    for ids, texts in ((task.collect_ids, task.collect), (task.evaluate_ids, task.evaluate)):
        assert [expected[i] for i in ids] == texts


# -- text files ---------------------------------------------------------------------------------------------
@pytest.fixture
def text_files(tmp_path):
    a = write_texts(tmp_path / "texts", [f"a/{i:02d}.txt" for i in range(20)], seed=1)
    b = write_texts(tmp_path / "texts", [f"b/{d}/{i}.md" for d in ("x", "y/z") for i in range(6)], seed=2)
    (tmp_path / "texts" / "a" / "blank.txt").write_text("  \n\n")        # no text: left out
    (tmp_path / "texts" / "b" / "notes.txt").write_text("not matched by *.md")
    return tmp_path, a, b


def test_file_tasks_end_to_end(text_files):
    tmp_path, a, b = text_files
    path = write_params(tmp_path / "params", {"lm": {"tasks": {
        "mine": {"files": ["../texts/a/*.txt"]}, "nested": {"files": "../texts/b/**/*.md"}, "docs": None}}})
    params = load_params(path)
    tasks = TextTasks.from_params(params)
    assert tasks.names == ["mine", "nested", "docs"]
    # ids: the paths as matched, relative to the params file's folder
    assert_split(tasks["mine"], {f"../texts/{k}": v for k, v in a.items()})
    assert_split(tasks["nested"], {f"../texts/{k}": v for k, v in b.items()})
    assert tasks["mine"].source == "files" and tasks["docs"].source == "embedded"
    assert len(tasks["mine"].evaluate) == round(0.3 * 20)
    again, other = TextTasks.from_params(params), TextTasks.from_params({**params, "seed": 1})
    assert again["mine"].evaluate_ids == tasks["mine"].evaluate_ids
    assert set(other["mine"].evaluate_ids) != set(tasks["mine"].evaluate_ids)
    # tasks.json lists exactly the files whose tokens are read: with budgets covering everything, all of them
    record = tasks.record(types.SimpleNamespace(tokenizer=make_tokenizer()), 10_000)
    assert record["mine"]["source"] == "files"
    assert sorted(record["mine"]["statistics"]) == sorted(tasks["mine"].collect_ids)
    assert sorted(record["mine"]["evaluation"]) == sorted(tasks["mine"].evaluate_ids)


def test_absolute_globs_and_the_list_form_still_work(text_files):
    tmp_path, a, _ = text_files
    params = load_params(None, {"lm": {"tasks": {"mine": {"files": [str(tmp_path / "texts/a/0*.txt"),
                                                                    str(tmp_path / "texts/a/1*.txt")]},
                                                 "law": None}}})
    task = TextTasks.from_params(params)["mine"]
    assert_split(task, {str(tmp_path / "texts" / k): v for k, v in a.items()})
    assert load_params(None, {"lm": {"tasks": ["law", "docs"]}})["lm"]["tasks"] == ["law", "docs"]


# -- a datasets dataset -------------------------------------------------------------------------------------
@pytest.fixture
def saved_dataset(tmp_path):
    import datasets
    rng = random.Random(0)
    texts = random_texts(60, seed=3, min_len=4)
    langs = [rng.choice(["en", "fr"]) for _ in texts]
    labels = [rng.choice([0, 1]) for _ in texts]
    texts[5] = ""                                             # an empty row: left out
    features = datasets.Features({"text": datasets.Value("string"), "lang": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": texts, "lang": langs, "label": labels}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(tmp_path / "ds"))
    return tmp_path, texts, langs, labels


def test_dataset_tasks_end_to_end(saved_dataset):
    tmp_path, texts, langs, labels = saved_dataset
    path = write_params(tmp_path / "params", {"lm": {"tasks": {
        "english": {"dataset": "../ds", "split": "train", "text_column": "text", "where": {"lang": "en"}},
        "negative": {"dataset": str(tmp_path / "ds"), "where": {"label": "neg", "lang": ["fr", "de"]}},
        "few": {"dataset": "../ds", "where": {"label": "pos", "lang": "fr"}, "max_docs": 7}}}})   # disjoint tasks
    tasks = TextTasks.from_params(load_params(path))
    rows = range(len(texts))
    assert_split(tasks["english"], {f"train:{i}": texts[i] for i in rows if langs[i] == "en" and texts[i]})
    assert_split(tasks["negative"], {f"train:{i}": texts[i] for i in rows if labels[i] == 0 and langs[i] == "fr"
                                     and texts[i]})
    french = [r for r in rows if texts[r] and labels[r] == 1 and langs[r] == "fr"]
    assert len(french) > 7
    assert_split(tasks["few"], {f"train:{i}": texts[i] for i in french[:7]})
    assert tasks["english"].source == "dataset"
    record = tasks.record(types.SimpleNamespace(tokenizer=make_tokenizer()), 10_000)
    assert sorted(record["english"]["evaluation"]) == sorted(tasks["english"].evaluate_ids)


# -- one clear error per problem, from `check` --------------------------------------------------------------
TEXT_ERRORS = [
    ({"files": ["../texts/none/*.txt"]}, r"lm.tasks.mine.*no file matches '../texts/none/\*.txt'"),
    ({"files": ["../texts/a/blank.txt"]}, r"lm.tasks.mine.*hold no text"),
    ({"files": ["../texts/a/00.txt"]}, r"lm.tasks.mine.*1 distinct document.*give more files"),
    ({"files": []}, r"lm.tasks.mine.files' must be a glob or a non-empty list"),
    ({"files": ["../texts/a/*.txt"], "split": "train"}, r"unknown keys \['split'\]; a files task takes files"),
    ({}, r"lm.tasks.mine' must be null \(the domain of that name\), \{files"),
    ({"files": "x", "dataset": "y"}, r"lm.tasks.mine' must be null"),
    ({"dataset": "./missing"}, r"dataset folder '.*missing' does not exist"),
    ({"dataset": "../texts"}, r"dataset folder '.*texts' does not load"),
    ({"dataset": "../ds", "split": "validation"}, r"has no split 'validation'; its splits are train, test"),
    ({"dataset": "../ds", "text_column": "body"}, r"has no column 'body'; its columns are text, lang, label: set "
                                                  r"text_column"),
    ({"dataset": "../ds", "where": {"language": "en"}}, r"has no column 'language'.*set where"),
    ({"dataset": "../ds", "where": {"lang": "de"}}, r"has no row with text in 'text' where \{'lang': 'de'\}"),
    ({"dataset": "../ds", "where": {"label": "neutral"}},
     r"column 'label' has no label 'neutral'; its labels are neg, pos"),
    ({"dataset": "../ds", "text_column": "label"}, r"column 'label' holds int, not text"),
    ({"dataset": "../ds", "where": {"lang": {"in": "en"}}}, r"where' must map column names to a value"),
]


@pytest.mark.parametrize("spec, message", TEXT_ERRORS)
def test_check_names_each_bad_text_task(text_files, saved_dataset, spec, message):
    tmp_path = text_files[0]
    path = write_params(tmp_path / "params", {"lm": {"tasks": {"mine": spec, "law": None}}})
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_check_command_reports_the_error(text_files, capsys):
    tmp_path = text_files[0]
    path = write_params(tmp_path / "params", {"lm": {"tasks": {"mine": {"files": "../nothing/*"}, "law": None}}})
    assert main(["check", str(path)]) == 2
    assert "no file matches '../nothing/*'" in capsys.readouterr().err
    with pytest.raises(ParamsError, match=r"unknown tasks \['nosuch'\]"):
        load_params(None, {"lm": {"tasks": {"law": None, "nosuch": None}}})
    with pytest.raises(ParamsError, match="at least two tasks"):
        load_params(None, {"lm": {"tasks": {"law": None}}})


def test_a_hub_id_is_left_to_the_run(tmp_path):
    """check does not open a hub dataset (that needs the network); the run says how to get it offline."""
    params = load_params(None, {"lm": {"tasks": {"hub": {"dataset": "someone/some-texts"}, "law": None}}})
    assert params["lm"]["tasks"]["hub"] == {"dataset": "someone/some-texts"}


# -- an image folder ------------------------------------------------------------------------------------------
def write_images(root: Path, layout: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Solid-colour PNGs of varied sizes, one distinct grey level per image: {relative path: level}."""
    from PIL import Image
    rng = random.Random(seed)
    levels = rng.sample(range(256), sum(layout.values()))
    out = {}
    for folder, n in layout.items():
        for i in range(n):
            path = root / folder / f"img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            level = levels.pop()
            Image.new("RGB", (rng.randint(8, 40), rng.randint(8, 40)), (level, level, level)).save(path)
            out[path.relative_to(root).as_posix()] = level
    return out


def image_params(tmp_path, vit_dir, folder, **vit):
    return write_params(tmp_path / "params", {"device": "cpu", "cache_dir": str(tmp_path / "cache"), "vit": {
        "model": str(vit_dir), "dataset": "image-folder", "data_dir": folder, "stats_images": 4,
        "eval_images": 100, "batch_size": 8, **vit}})


def test_image_folder_without_test_split_end_to_end(tmp_path):
    levels = write_images(tmp_path / "imgs", {"cat": 10, "dog": 7, "fox": 5})
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=16, patch_size=4, num_channels=3, num_labels=3)
    path = image_params(tmp_path, vit_dir, "../imgs", tasks={"pets": ["cat", "dog"], "wild": ["fox"]})
    study = Study.from_params(load_params(path), "vit")
    tasks = study.tasks
    assert tasks.names == ["pets", "wild"] and tasks.train.class_names == ["cat", "dog", "fox"]
    for split in (tasks.train, tasks.test):
        assert split.images.shape[1:] == (3, 16, 16)
        for i, name in enumerate(split.ids):
            # each image where its id says, its class the folder's, resized and scaled to [-1, 1]
            assert split.class_names[int(split.labels[i])] == name.split("/")[0]
            torch.testing.assert_close(split.images[i], torch.full((3, 16, 16), (levels[name] / 255 - 0.5) / 0.5))
    assert set(tasks.train.ids).isdisjoint(tasks.test.ids) and set(tasks.train.ids) | set(tasks.test.ids) == set(levels)
    assert [sum(i.startswith(c) for i in tasks.test.ids) for c in ("cat", "dog", "fox")] == [3, 2, 2]
    record = study.record()
    assert record["pets"]["source"] == "imgs"
    assert len(record["pets"]["statistics"]) == 4
    # a seeded sample of the task's train images (not the first in folder order), listed in dataset order
    pets = [i for i in tasks.train.ids if i.split("/")[0] in ("cat", "dog")]
    chosen = record["pets"]["statistics"]
    assert set(chosen) <= set(pets) and chosen == sorted(chosen, key=tasks.train.ids.index)
    assert chosen == [tasks.train.ids[i] for i in tasks.statistics_indices("pets", 4)]
    # the attribution's data (07) is the same seeded sample, with each image's own label
    labelled = tasks.labelled_data("pets", 4)
    assert torch.equal(labelled.images, tasks.statistics_data("pets", 4))
    assert [f"{labelled.class_names[int(k)]}/" for k in labelled.labels] == [c[:c.index("/") + 1] for c in chosen]
    assert sorted(record["wild"]["evaluation"]) == sorted(i for i in tasks.test.ids if i.startswith("fox/"))
    same = study.tasks.from_params(load_params(path), image_shape=(3, 16, 16))
    other = study.tasks.from_params({**load_params(path), "seed": 1}, image_shape=(3, 16, 16))
    assert same.test.ids == tasks.test.ids and set(other.test.ids) != set(tasks.test.ids)
    assert study.stats(progress=False)["wild"].count[0] == 3 * 17    # all 3 train foxes (budget 4), 16 patches + CLS


def test_image_folder_with_train_and_test_and_a_processor(tmp_path):
    import transformers
    levels = write_images(tmp_path / "imgs", {"train/a": 4, "train/b": 3, "test/a": 2, "test/b": 2})
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=16, patch_size=4, num_channels=3, num_labels=2)
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2] * 3,
                                               image_std=[0.4] * 3)
    processor.save_pretrained(vit_dir)
    study = Study.from_params(load_params(image_params(tmp_path, vit_dir, str(tmp_path / "imgs"))), "vit")
    assert study.handle.processor is not None and study.tasks.names == ["a", "b"]
    assert sorted(study.tasks.train.ids) == sorted(k for k in levels if k.startswith("train/"))
    assert sorted(study.tasks.test.ids) == sorted(k for k in levels if k.startswith("test/"))
    for i, name in enumerate(study.tasks.test.ids):
        expected = torch.full((3, 16, 16), (levels[name] / 255 - 0.2) / 0.4)      # the processor's normalisation
        torch.testing.assert_close(study.tasks.test.images[i], expected, atol=1e-5, rtol=0)
    assert study.record()["b"]["evaluation"] == [i for i in study.tasks.test.ids if i.startswith("test/b/")]


IMAGE_ERRORS = [
    ("missing", {}, r"vit.data_dir': image folder '.*missing' does not exist: make a folder laid out as"),
    ("flat", {}, r"image folder '.*flat' has no class subfolders"),
    ("emptyclass", {}, r"class folder '.*emptyclass/b' holds no images"),
    ("mismatch", {}, r"train/ and test/ must hold the same classes; only in train: \['b'\], only in test: \[\]"),
    ("single", {}, r"classes \['b'\] have fewer than 2 images"),
    ("good", {"tasks": {"g": ["a", "zebra"]}}, r"unknown classes \['zebra'\]; the image folder's classes .* are a, b"),
    ("good", {"tasks": "groups"}, r"'groups', which is defined for fashion-mnist \(its natural groups\) and cifar100"),
    ("one", {}, r"has 1 class; .* at least two class subfolders"),
    (None, {}, r"'vit.data_dir' must name the folder"),
]


@pytest.mark.parametrize("folder, vit, message", IMAGE_ERRORS)
def test_check_names_each_bad_image_folder(tmp_path, folder, vit, message):
    root = tmp_path / "imgs"
    write_images(root / "flat", {".": 2})
    write_images(root / "emptyclass", {"a": 2})
    (root / "emptyclass" / "b").mkdir()
    (root / "emptyclass" / "b" / "readme.txt").write_text("no images")
    write_images(root / "mismatch", {"train/a": 2, "train/b": 2, "test/a": 2})
    write_images(root / "single", {"a": 2, "b": 1})
    write_images(root / "good", {"a": 2, "b": 2})
    write_images(root / "one", {"a": 3})
    params = {"vit": {"dataset": "image-folder", "data_dir": None if folder is None else f"../imgs/{folder}", **vit}}
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "params", params))
