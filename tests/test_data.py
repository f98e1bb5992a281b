"""Task data (docs/method.md §4, §9): disjoint seeded text splits, the embedded domains, LM batching, Fashion-MNIST,
image task groups, clear errors for missing data, and the project's Fashion-MNIST ViT (trained, cached,
deterministic)."""
from __future__ import annotations

import collections
import functools
import gzip
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PAD_ID, encode, make_tokenizer, random_texts, windows_in_rounds, windows_of
from modsep_nb import data, load_model
from modsep_nb.data import (EMBEDDED_TEXT_DOMAINS, FASHION_MNIST_CLASSES, DataNotAvailableError, Document,
                            ImageDataset, TextTask, document_groups, document_windows, embedded_documents,
                            embedded_text_domain, fashion_mnist, image_tasks, lm_batches, split_documents,
                            tasks_record, text_tasks)


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
    # whole families move together, so the evaluation part holds at most its share (exactly it where every
    # document is its own family)
    assert 0 < len(task.evaluate) <= round(0.3 * n)
    if name in ("computers", "songs-poems"):
        assert len(task.evaluate) >= round(0.3 * n) - 2


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
        texts = [d.text for d in collect + evaluate]
        assert not {d.text for d in collect} & {d.text for d in evaluate}
        assert sorted(texts) == sorted(set(docs))                    # duplicates kept once, nothing lost
        assert {d.id for d in collect + evaluate if d.text == "same"} == {"0"}    # the first occurrence


def test_split_documents_keeps_families_together():
    docs = [Document(f"d{i}", f"text {i}", family="A" if i < 4 else ("B" if i < 6 else None)) for i in range(30)]
    for seed in range(10):
        collect, evaluate = split_documents(docs, 0.3, seed)
        sides = {d.id: "c" for d in collect} | {d.id: "e" for d in evaluate}
        assert len({sides[f"d{i}"] for i in range(4)}) == 1 and len({sides[f"d{i}"] for i in (4, 5)}) == 1
        assert len(evaluate) <= 9 and len(sides) == 30
    with pytest.raises(ValueError, match="family"):
        split_documents([Document("a", "x", "F"), Document("b", "y", "F")], 0.3)


def test_split_documents_order_is_a_seeded_shuffle():
    docs = [f"doc {i:03d}" for i in range(200)]
    collect, evaluate = split_documents(docs, 0.3, seed=0)
    again, _ = split_documents(docs, 0.3, seed=0)
    other, _ = split_documents(docs, 0.3, seed=1)
    ids = [int(d.id) for d in collect]
    assert [d.id for d in again] == [d.id for d in collect] and [d.id for d in other] != [d.id for d in collect]
    assert ids != sorted(ids)                                          # not the original order
    assert all(docs[int(d.id)] == d.text for d in collect + evaluate)


def test_document_groups_join_shared_passages_of_200_characters():
    rng = np.random.default_rng(0)
    letters = [bytes(rng.integers(97, 123, 1000, dtype=np.uint8)).decode() for _ in range(5)]
    shared = letters[4][:200]
    texts = [letters[0][:300] + shared + letters[0][300:600],        # 0 and 1 share exactly 200 characters
             letters[1][:123] + shared + letters[1][123:],
             letters[2][:500] + "#" + shared[:199] + "$" + letters[2][500:],     # only 199 with 0 and 1
             letters[3][:50] + letters[1][700:900] + "!",             # 3 shares 200 with 1: joins 0 through 1
             "short"]
    groups = document_groups([Document(str(i), t) for i, t in enumerate(texts)])
    assert groups[0] == groups[1] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
    families = document_groups([Document("a", "x", "F"), Document("b", "y", "F"), Document("c", "z")])
    assert families[0] == families[1] != families[2]


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


@pytest.fixture(scope="module")
def embedded_tasks():
    return text_tasks(EMBEDDED_TEXT_DOMAINS, eval_frac=0.3, seed=0)


@functools.lru_cache(maxsize=None)
def _fortune_entries(path: Path) -> list[str]:
    """Entries of a fortune file read line by line (a line holding only % ends an entry), empty ones skipped."""
    entries, lines = [], []
    for line in path.read_text(errors="replace").splitlines() + ["%"]:
        if line == "%":
            if "\n".join(lines).strip():
                entries.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    return entries


def test_document_ids_name_their_documents(embedded_tasks):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    from pydoc_data.topics import topics
    for name, task in embedded_tasks.items():
        for ids, texts in ((task.collect_ids, task.collect), (task.evaluate_ids, task.evaluate)):
            assert len(ids) == len(texts) and len(set(ids)) == len(ids)
            for doc_id, text in zip(ids, texts):
                if name == "code":
                    assert text == (stdlib / doc_id).read_text(encoding="utf-8", errors="replace")
                elif name == "docs":
                    assert text == topics[doc_id]
                elif name == "licenses":
                    assert text == (data.LICENSES_DIR / doc_id).read_text(errors="replace")   # whole files
                else:
                    category, n = doc_id.split(":")
                    assert category == name and text == _fortune_entries(data.FORTUNES_DIR / name)[int(n)]


def test_licence_families_stay_on_one_side(embedded_tasks):
    for seed in range(6):
        task = text_tasks(["licenses"], seed=seed)["licenses"] if seed else embedded_tasks["licenses"]
        side = {i: "c" for i in task.collect_ids} | {i: "e" for i in task.evaluate_ids}
        gnu = [i for i in side if i.split("-")[0] in ("GPL", "LGPL", "GFDL")]
        assert len(gnu) == 8 and len({side[i] for i in gnu}) == 1            # GPL-1..3, LGPL-2..3, GFDL-1.2/1.3
        assert side["MPL-1.1"] == side["MPL-2.0"]
        # every licence file is read once, under its own name (GPL -> GPL-3 is not a second copy)
        files = {p.name for p in data.LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink()}
        assert set(side) == files
    assert data.license_family("GPL-2") == data.license_family("LGPL-2.1") == "GNU"
    assert data.license_family("Apache-2.0") == "Apache" and data.license_family("CC0-1.0") == "CC0"


def _shared_passages(left: list[str], right: list[str], n: int = 200) -> list[tuple[int, int]]:
    """(left, right) text pairs that share an n-character substring (independent of data.document_groups).

    The right texts are cut into chunks of n // 2 at that stride: a shared n-character passage holds one whole
    chunk, so looking up the chunk at every offset of the left texts finds it, and extending the match
    character by character both ways measures the common run."""
    k = n // 2
    chunks = collections.defaultdict(list)
    for j, text in enumerate(right):
        for start in range(0, len(text) - k + 1, k):
            chunks[text[start:start + k]].append((j, start))
    found = set()
    for i, x in enumerate(left):
        for a in range(len(x) - k + 1):
            for j, b in chunks.get(x[a:a + k], ()):
                y = right[j]
                if (i, j) in found:
                    continue
                before = 0
                while a - before > 0 and b - before > 0 and x[a - before - 1] == y[b - before - 1]:
                    before += 1
                after = k
                while a + after < len(x) and b + after < len(y) and x[a + after] == y[b + after]:
                    after += 1
                if before + after >= n:
                    found.add((i, j))
    return sorted(found)


def test_shared_passage_check_finds_what_it_should():
    rng = np.random.default_rng(1)
    words = [bytes(rng.integers(97, 123, 700, dtype=np.uint8)).decode() for _ in range(4)]
    left = [words[0], words[1][:300] + words[3][100:300] + "é" + words[1][300:]]
    right = [words[2], "x" + words[3][100:300] + "y", "z" + words[3][100:299] + "w"]
    assert _shared_passages(left, right) == [(1, 1)]          # 200 shared characters found, 199 not


@pytest.mark.parametrize("name", ["docs", "law", "licenses"])
def test_document_groups_are_the_components_of_shared_passages(name):
    docs = [Document(d.id, d.text) for d in embedded_documents(name)]          # families left out here
    texts = [d.text for d in docs]
    component = list(range(len(docs)))                     # connected components of the pairs, by relabelling
    for a, b in _shared_passages(texts, texts):
        if a != b:
            old, new = component[a], component[b]
            component = [new if c == old else c for c in component]
    groups = document_groups(docs)
    assert len(set(component)) < len(docs)                 # the domain has shared passages to find
    for i in range(len(docs)):
        for j in range(len(docs)):
            assert (groups[i] == groups[j]) == (component[i] == component[j]), (docs[i].id, docs[j].id)


@pytest.mark.parametrize("name", EMBEDDED_TEXT_DOMAINS)
def test_no_statistics_document_shares_a_passage_with_evaluation(name, embedded_tasks):
    task = embedded_tasks[name]
    leaks = _shared_passages(task.collect, task.evaluate, 200)
    assert not leaks, [(task.collect_ids[a], task.evaluate_ids[b]) for a, b in leaks[:10]]


@pytest.fixture(scope="module")
def real_tokenizer(smollm):
    return smollm.tokenizer


def test_statistics_documents_are_a_seeded_sample_of_the_domain(real_tokenizer):
    for name in ("code", "docs", "science"):
        everything = [d.id for d in embedded_documents(name)]          # the domain's own (sorted / file) order
        used = {}
        for seed in (0, 1):
            task = text_tasks([name], seed=seed)[name]
            used[seed] = tasks_record({name: task}, real_tokenizer, 2048, 512, 128)[name]["statistics"]
        again = tasks_record(text_tasks([name], seed=0), real_tokenizer, 2048, 512, 128)[name]["statistics"]
        assert again == used[0] and used[0] != used[1]
        for ids in used.values():
            positions = sorted(everything.index(i) for i in ids)
            assert positions != list(range(len(ids)))                                       # not a prefix
            assert positions[0] < len(everything) / 4 and positions[-1] > 3 * len(everything) / 4  # spread out
            assert len(ids) >= 16


@pytest.mark.parametrize("name", ["code", "docs", "licenses", "science"])
def test_budget_spread_over_documents(name, real_tokenizer, embedded_tasks):
    task = embedded_tasks[name]
    pairs = document_windows(real_tokenizer, task.collect, ctx=128, max_tokens=2048)
    per_doc = collections.Counter()
    for d, window in pairs:
        per_doc[d] += len(window)
    assert sum(per_doc.values()) == 2048
    lengths = [_token_count(real_tokenizer, t) for t in task.collect]
    if sum(min(n, 128) for n in lengths) >= 2048:          # one window per document covers the budget
        assert max(per_doc.values()) <= 128 and len(per_doc) >= 16
    else:                                                  # a second round: every document takes part
        assert len(per_doc) == sum(1 for n in lengths if n > 0)
    wide = document_windows(real_tokenizer, task.collect, ctx=128, max_tokens=2048, doc_tokens=512)
    wide_docs = collections.Counter()
    for d, window in wide:
        wide_docs[d] += len(window)
    assert all(len(w) <= 128 for _, w in wide) and len(wide_docs) >= 4
    if sum(min(n, 512) for n in lengths) >= 2048:
        assert max(wide_docs.values()) <= 512


@functools.lru_cache(maxsize=None)
def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _expected_used(tokenizer, texts, budget, ctx):
    """Documents a budget reads, counted from token lengths alone: rounds of one window per document."""
    lengths = [_token_count(tokenizer, t) for t in texts]
    used, left, r = [], budget, 0
    while left > 0 and any(n > r * ctx for n in lengths):
        for i, n in enumerate(lengths):
            take = min(ctx, n - r * ctx)
            if take >= 2 or (take == 1 and r == 0):
                used.append(i)
                left -= take
                if left <= 0:
                    break
        r += 1
    return list(dict.fromkeys(used))


@pytest.mark.parametrize("budgets", [(2048, 512, 128), (4096, 300, 64), (20000, 5000, 256)])
def test_tasks_record_names_exactly_the_documents_used(budgets, real_tokenizer, embedded_tasks):
    stats_tokens, eval_tokens, ctx = budgets
    names = ["code", "licenses", "medicine"]
    record = tasks_record({n: embedded_tasks[n] for n in names}, real_tokenizer, stats_tokens, eval_tokens, ctx)
    assert list(record) == names
    for name in names:
        task = embedded_tasks[name]
        assert record[name]["source"] == "embedded"
        want_stats = [task.collect_ids[i] for i in _expected_used(real_tokenizer, task.collect, stats_tokens, ctx)]
        want_eval = [task.evaluate_ids[i] for i in _expected_used(real_tokenizer, task.evaluate, eval_tokens, ctx)]
        assert record[name]["statistics"] == want_stats
        assert record[name]["evaluation"] == want_eval
        assert not set(want_stats) & set(want_eval)


def test_tasks_record_and_text_task_reject_bad_input(real_tokenizer):
    with pytest.raises(TypeError, match="TextTask"):
        tasks_record({"Bag": ["Bag"]}, real_tokenizer, 10, 10, 8)
    with pytest.raises(ValueError, match="collect_ids"):
        TextTask("t", ["a", "b"], ["c"], "embedded", collect_ids=["x"])
    assert TextTask("t", ["a", "b"], ["c"], "embedded").collect_ids == ["0", "1"]
    with pytest.raises(ValueError, match="doc_tokens"):
        document_windows(real_tokenizer, ["a b"], ctx=8, doc_tokens=1)


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
    assert rows == windows_in_rounds(texts, 5)          # one window of every document, then the next ones
    assert rows != windows_of(texts, 5)
    # a document's whole text per round reads the documents one after the other
    assert _rows(lm_batches(tokenizer, texts, ctx=5, batch_size=3, doc_tokens=10**6)) == windows_of(texts, 5)
    assert all(len(b[0]) <= 3 for b in batches)
    assert all(b[0].shape[1] <= 5 for b in batches)


def test_lm_batches_by_length_hold_the_same_windows_with_less_padding(tokenizer):
    texts = random_texts(9, seed=1, max_len=13)
    plain = list(lm_batches(tokenizer, texts, ctx=5, batch_size=3, with_documents=True, with_weights=True,
                            skip_positions=(0,), equal_positions=True))
    sorted_ = list(lm_batches(tokenizer, texts, ctx=5, batch_size=3, with_documents=True, with_weights=True,
                              skip_positions=(0,), equal_positions=True, by_length=True))
    lengths = [len(r) for r in windows_in_rounds(texts, 5)]
    expected = data.position_weights(lengths, 5, skip_positions=(0,), equal_positions=True)

    def pairs(batches):          # (window, its document, its weights) of every row
        return sorted((tuple(ids[r, :int(m[r].sum())].tolist()), int(d[r]), tuple(w[r, :int(m[r].sum())].tolist()))
                      for ids, m, d, w in batches for r in range(len(ids)))
    assert pairs(sorted_) == pairs(plain)           # the same windows, each with its document and weights
    rows = [int(n) for _, m, _, _ in sorted_ for n in m.sum(1)]
    assert rows == sorted(lengths, reverse=True)    # longest first
    for ids, mask, _, w in sorted_:
        assert torch.equal(w, mask * expected[:ids.shape[1]])
    cells = lambda batches: sum(ids.numel() for ids, *_ in batches)       # noqa: E731
    assert cells(sorted_) <= cells(plain) and sum(rows) == sum(lengths)


def test_position_weights_leave_out_skipped_positions_and_weigh_the_others_alike():
    lengths = [2, 4, 4, 1]                   # windows reaching positions 0..3: 4, 3, 2, 2
    assert data.position_weights(lengths, 5).tolist() == [1, 1, 1, 1, 0]          # position 4: no window
    assert data.position_weights(lengths, 5, skip_positions=(0,)).tolist() == [0, 1, 1, 1, 0]
    # 7 counted tokens at positions 1..3 (3 + 2 + 2): each position gets 7 / 3 in all, shared by its windows
    # no window reaches position 4: weighing the others alike cannot make up for it, and a warning says so
    with pytest.warns(RuntimeWarning, match="longer than 4 tokens.*set lm.ctx"):
        w = data.position_weights(lengths, 5, skip_positions=(0,), equal_positions=True)
    assert w.tolist() == pytest.approx([0, 7 / 9, 7 / 6, 7 / 6, 0])
    reach = torch.tensor([4, 3, 2, 2, 0])
    assert float((w * reach).sum()) == pytest.approx(7)                           # the counted tokens
    assert (w * reach)[1:4].tolist() == pytest.approx([7 / 3] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # every position reached: nothing to warn about
        assert data.position_weights(lengths, 4, skip_positions=(0,), equal_positions=True).tolist() == \
            pytest.approx([0, 7 / 9, 7 / 6, 7 / 6])


def test_lm_batches_weights_cover_the_real_tokens_only(tokenizer):
    texts = random_texts(9, seed=1, max_len=13)
    plain = list(lm_batches(tokenizer, texts, ctx=5, batch_size=3, with_documents=True))
    weighted = list(lm_batches(tokenizer, texts, ctx=5, batch_size=3, with_documents=True, with_weights=True,
                               skip_positions=(0,), equal_positions=True))
    lengths = [len(r) for r in windows_in_rounds(texts, 5)]
    expected = data.position_weights(lengths, 5, skip_positions=(0,), equal_positions=True)
    for (ids, mask, docs), (ids2, mask2, docs2, w) in zip(plain, weighted, strict=True):
        assert torch.equal(ids, ids2) and torch.equal(mask, mask2) and torch.equal(docs, docs2)
        assert torch.equal(w, mask * expected[:ids.shape[1]])       # 0 at padding and at position 0
        assert (w[:, 0] == 0).all() and (w[mask.bool()][w[mask.bool()] == 0].numel() == mask.shape[0])


@pytest.mark.parametrize("max_tokens", [1, 7, 23, 40])
def test_lm_batches_max_tokens_exact(tokenizer, max_tokens):
    texts = random_texts(12, seed=2, max_len=13)
    rows = _rows(lm_batches(tokenizer, texts, ctx=6, batch_size=4, max_tokens=max_tokens))
    assert sum(len(r) for r in rows) == max_tokens
    # the tokens are the first max_tokens of the unlimited stream, in order
    flat = [t for w in windows_in_rounds(texts, 6) for t in w]
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


def test_a_tokenizers_ids_are_read_once_and_the_windows_stay_the_same():
    """document_windows keeps each tokenizer's ids of the texts it has read (a study windows its documents again for
    every cache key): the second windowing calls the tokenizer no more and gives the same windows."""
    tokenizer = make_tokenizer()
    calls = []
    original = tokenizer.__class__.__call__

    class Counting(tokenizer.__class__):
        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return original(self, *args, **kwargs)

    tokenizer.__class__ = Counting
    texts = random_texts(5, seed=3)
    first = document_windows(tokenizer, texts, ctx=8, max_tokens=60)
    n = len(calls)
    assert n > 0
    assert document_windows(tokenizer, texts, ctx=8, max_tokens=60) == first
    assert len(calls) == n == len(set(calls)) == len(set(texts))
