"""Evaluation (docs/method.md §4): LM and image metrics equal a direct computation from logits; perplexity is
exp(mean cross-entropy); skip_top; the cross-task matrix with fixed fractions and with bisection."""
from __future__ import annotations

import collections
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import BOS_ID, WORDS, windows_in_rounds, windows_of
from modsep_nb import ARCHITECTURES, Architecture, NeuronStats, evaluate, load_model
from modsep_nb.evaluation import _bisect_frac, cross_task_matrix, matched_random_mask
from modsep_nb.pruning import select_neurons, task_scores
from modsep_nb.data import ImageDataset


# -- language models ---------------------------------------------------------------------------------------
def hand_lm(handle, texts, ctx, skip=frozenset()):
    """Per-target cross-entropy, top-1 and top-10 hits, computed window by window (no padding at all)."""
    ces, top1, top10 = [], 0, 0
    with torch.no_grad():
        for w in windows_of(texts, ctx):
            logits = handle.model(input_ids=torch.tensor([w])).logits[0].double()
            for t in range(1, len(w)):
                target = w[t]
                if target == BOS_ID or target in skip:
                    continue
                row = logits[t - 1]
                ces.append(-(row - torch.logsumexp(row, 0))[target].item())
                rank = int((row > row[target]).sum())
                top1 += rank == 0
                top10 += rank < 10
    return np.array(ces), top1, top10


def _texts_with_inner_bos(seed):
    rng = random.Random(seed)
    docs = []
    for _ in range(10):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 25))]
        if len(words) > 4:
            words.insert(rng.randint(1, len(words) - 1), "[BOS]")     # a BOS target in the middle
        docs.append(" ".join(words))
    return docs


def test_lm_metrics_equal_direct_computation(tiny_llama):
    texts = _texts_with_inner_bos(0)
    got = evaluate(tiny_llama, texts, ctx=7, batch_size=3)
    ces, top1, top10 = hand_lm(tiny_llama, texts, 7)
    n_bos_targets = sum(w[1:].count(BOS_ID) for w in windows_of(texts, 7))
    assert n_bos_targets > 0                                     # the case is exercised
    assert got["n"] == len(ces)
    assert got["top1"] == pytest.approx(top1 / len(ces), abs=1e-12)
    assert got["top10"] == pytest.approx(top10 / len(ces), abs=1e-12)
    assert 0 < top1 < top10 < len(ces)                            # a non-trivial case
    assert got["loss"] == pytest.approx(ces.mean(), rel=1e-5)
    # perplexity is exp(mean CE) -- not the mean of per-token exp(CE), which the reference computed
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert got["perplexity"] == pytest.approx(math.exp(ces.mean()), rel=1e-5)
    wrong = np.exp(ces).mean()
    assert wrong > got["perplexity"] * 1.01


def test_top1_only_gives_the_same_hits_without_the_vocabulary_work(tiny_llama):
    """The ablation matrices read only top-1 hits: the top1_only path (one max in the logits' dtype) gives the
    hand computation's top-1 and n, and per-document hits equal to the full path's, skipped targets included."""
    texts = _texts_with_inner_bos(2)
    _, top1, _ = hand_lm(tiny_llama, texts, 7)
    full = evaluate(tiny_llama, texts, ctx=7, batch_size=3, per_document=True, skip_top=2)
    fast = evaluate(tiny_llama, texts, ctx=7, batch_size=3, per_document=True, skip_top=2, top1_only=True)
    assert set(fast) == {"top1", "n", "documents"}                 # no loss, no top-10 computed
    assert (fast["top1"], fast["n"]) == (full["top1"], full["n"])
    for k in ("n", "top1"):
        np.testing.assert_array_equal(fast["documents"][k], full["documents"][k])
    plain = evaluate(tiny_llama, texts, ctx=7, batch_size=3, top1_only=True)
    assert plain["top1"] == pytest.approx(top1 / plain["n"], abs=1e-12)
    assert 0 < top1 < plain["n"]


def test_top1_only_still_refuses_non_finite_logits(tiny_llama):
    ids, mask = torch.tensor([[2, 10, 11, 12]]), torch.ones(1, 4, dtype=torch.long)
    logits = torch.randn(1, 4, 30, generator=torch.Generator().manual_seed(0))
    from modsep_nb.evaluation import lm_token_metrics
    assert lm_token_metrics(logits, ids, mask, top1_only=True)["finite"]
    for bad in (float("nan"), float("inf")):
        hurt = logits.clone()
        hurt[0, 1, 7] = bad                                       # one entry of one counted row, not its maximum
        assert not lm_token_metrics(hurt, ids, mask, top1_only=True)["finite"]
    with torch.no_grad():
        tiny_llama.model.lm_head.weight[3, 0] = float("nan")      # one token's logit NaN (a fresh handle per test)
    with pytest.raises(FloatingPointError, match="task 'code'.*NaN or infinite"):
        evaluate(tiny_llama, _texts_with_inner_bos(3), ctx=7, top1_only=True, task="code")


def test_top1_reads_the_vocabulary_in_slices(tiny_llama, monkeypatch):
    """top1_only takes top-1 from the last hidden states, the unembedding a slice of the vocabulary at a time:
    the full logits' largest value and token for every row, slices of 7 rows of a vocabulary of 30 (the last
    short; tokens compared where no two logits are within float error), an exact tie between slices going to
    the earlier token as max gives it, a NaN in a late slice kept; and the same per-document hits as the full
    path."""
    from modsep_nb import models
    monkeypatch.setattr(models, "TOP1_CHUNK", 7)
    head = tiny_llama.model.lm_head
    assert tiny_llama.unembedding is head and head.weight.shape[0] % 7 != 0
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(50, head.weight.shape[1], generator=gen)
    with torch.no_grad():
        best, top = tiny_llama.top1(rows)
        full = head(rows)
    want_best, want_top = full.max(-1)
    torch.testing.assert_close(best, want_best, rtol=1e-6, atol=1e-6)
    gap = full.topk(2, -1).values.diff(dim=-1).abs().squeeze(-1)
    clear = gap > 1e-4                                   # the slices' products may differ in the last bits
    assert clear.sum() > 40 and torch.equal(top[clear], want_top[clear])
    texts = _texts_with_inner_bos(4)
    full = evaluate(tiny_llama, texts, ctx=7, batch_size=3, per_document=True)
    fast = evaluate(tiny_llama, texts, ctx=7, batch_size=3, per_document=True, top1_only=True)
    for k in ("n", "top1"):
        np.testing.assert_array_equal(fast["documents"][k], full["documents"][k])
    with torch.no_grad():                                # small integers: every logit exact, so the tie is one
        head.weight.copy_(torch.randint(-3, 4, head.weight.shape, generator=gen).float())
        head.weight[2] = head.weight[9] = 4.0            # tokens 2 and 9 tie, in the first and second slices
        ones = torch.ones(3, head.weight.shape[1])
        assert tiny_llama.top1(ones)[1].tolist() == [2, 2, 2] == head(ones).max(-1).indices.tolist()
        head.weight[25, 0] = float("nan")                # the last slice: one token's logit NaN in every row
        assert tiny_llama.top1(rows)[0].isnan().all()
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        evaluate(tiny_llama, texts, ctx=7, top1_only=True, task="code")


@pytest.mark.parametrize("class_name", ["GPT2LMHeadModel", "Gemma2ForCausalLM"])
def test_top1_only_on_other_heads(class_name, tmp_path):
    """GPT-2 (tied unembedding) reads top-1 in slices; Gemma 2 soft-caps its logits after the unembedding, so
    its top-1 is read from the full logits (no unembedding offered); both give the full path's hits."""
    from conftest import save_hf_lm
    handle = load_model(str(save_hf_lm(tmp_path / "m", class_name)))
    assert (handle.unembedding is None) == (class_name == "Gemma2ForCausalLM")
    texts = _texts_with_inner_bos(5)
    full = evaluate(handle, texts, ctx=7, batch_size=3, per_document=True)
    fast = evaluate(handle, texts, ctx=7, batch_size=3, per_document=True, top1_only=True)
    for k in ("n", "top1"):
        np.testing.assert_array_equal(fast["documents"][k], full["documents"][k])
    if handle.unembedding is not None:         # every position's top token, not only the hits
        ids = torch.tensor([[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            best, top = handle.top1(handle.head_input(ids, mask).reshape(-1, 16))
            logits = handle.lm_logits(ids, mask).reshape(len(best), -1)
        want_best, want_top = logits.max(-1)
        torch.testing.assert_close(best, want_best, rtol=1e-6, atol=1e-6)
        clear = logits.topk(2, -1).values.diff(dim=-1).abs().squeeze(-1) > 1e-4     # no near-tie to flip
        assert clear.sum() >= 8 and torch.equal(top[clear], want_top[clear])


def test_a_logit_scale_in_the_config_turns_the_slices_off(tiny_llama):
    tiny_llama.model.config.logit_scale = 2.0           # logits scaled after the unembedding (Cohere-style)
    assert tiny_llama.unembedding is None
    with pytest.raises(TypeError, match="PLAIN_UNEMBEDDING"):
        tiny_llama.head_input(torch.tensor([[2, 10, 11]]), torch.ones(1, 3, dtype=torch.long))


def test_lm_metrics_do_not_depend_on_batching(tiny_llama):
    texts = _texts_with_inner_bos(1)
    a = evaluate(tiny_llama, texts, ctx=9, batch_size=1)
    b = evaluate(tiny_llama, texts, ctx=9, batch_size=5)
    assert a["n"] == b["n"] and a["top1"] == b["top1"] and a["top10"] == b["top10"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_skip_top_removes_most_frequent_targets(tiny_llama):
    rng = random.Random(3)
    docs = []
    for _ in range(6):
        words = ["w00"] * 6 + ["w01"] * 4 + ["w02"] * 2 + [rng.choice(WORDS[3:30]) for _ in range(4)]
        rng.shuffle(words)
        docs.append(" ".join(words))
    ctx = 8
    freq = collections.Counter(t for w in windows_of(docs, ctx) for t in w[1:])
    top2 = {t for t, _ in freq.most_common(2)}
    assert freq.most_common(3)[1][1] > freq.most_common(3)[2][1]      # no tie at the cut
    got = evaluate(tiny_llama, docs, ctx=ctx, batch_size=4, skip_top=2)
    ces, top1, top10 = hand_lm(tiny_llama, docs, ctx, skip=top2)
    full = evaluate(tiny_llama, docs, ctx=ctx, batch_size=4)
    assert full["n"] - got["n"] == sum(freq[t] for t in top2)
    assert got["n"] == len(ces)
    assert got["top1"] == pytest.approx(top1 / len(ces), abs=1e-12)
    assert got["top10"] == pytest.approx(top10 / len(ces), abs=1e-12)
    assert got["loss"] == pytest.approx(ces.mean(), rel=1e-5)


def test_lm_max_tokens(tiny_llama):
    texts = _texts_with_inner_bos(2)
    got = evaluate(tiny_llama, texts, ctx=7, max_tokens=30)
    # 30 real tokens: the first windows of the round-robin order, then a head; every non-first position is a
    # target unless it is BOS
    stream, left = [], 30
    for w in windows_in_rounds(texts, 7):
        if left <= 0:
            break
        stream.append(w[:left])
        left -= len(w[:left])
    assert got["n"] == sum(sum(1 for t in w[1:] if t != BOS_ID) for w in stream)


# -- images ------------------------------------------------------------------------------------------------
def test_image_metrics_equal_direct_computation(tiny_vit):
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(60, 1, 16, 16, generator=gen)
    with torch.no_grad():
        logits = tiny_vit.model(pixel_values=images).logits
    order = logits.argsort(-1, descending=True)
    # labels at known ranks so that top-1 and top-5 are neither 0 nor 1
    ranks = torch.tensor([0, 2, 7] * 20)
    labels = order[torch.arange(60), ranks]
    got = evaluate(tiny_vit, images, labels=labels, batch_size=16)
    assert got["n"] == 60
    assert got["top1"] == pytest.approx(1 / 3)
    assert got["top5"] == pytest.approx(2 / 3)
    for c in range(10):
        sel = labels == c
        if sel.any():
            assert got["per_class"][c] == pytest.approx((ranks[sel] == 0).double().mean().item())
    assert set(got["per_class"]) == set(labels.tolist())

    names = [f"class{i}" for i in range(10)]
    ds = ImageDataset(images, labels, names, "toy")
    by_name = evaluate(tiny_vit, ds, batch_size=7)
    assert by_name["per_class"] == {names[c]: v for c, v in got["per_class"].items()}
    # restricted to a task's classes
    task = [names[int(labels[0])], names[int(labels[1])]]
    keep = (labels == labels[0]) | (labels == labels[1])
    sub = evaluate(tiny_vit, ds, classes=task)
    assert sub["n"] == int(keep.sum())
    assert sub["top1"] == pytest.approx((ranks[keep] == 0).double().mean().item())
    assert sub["top5"] == pytest.approx((ranks[keep] < 5).double().mean().item())


def test_image_evaluation_takes_torch_and_hf_datasets(tiny_vit):
    """A TensorDataset of (image, label), a datasets.Dataset in torch format with pixel_values/label, and a
    tensor with labels all give the same metrics; statistics likewise."""
    import datasets
    from torch.utils.data import TensorDataset
    from modsep_nb import collect_stats
    gen = torch.Generator().manual_seed(8)
    images, labels = torch.randn(20, 1, 16, 16, generator=gen), torch.randint(0, 10, (20,), generator=gen)
    expected = evaluate(tiny_vit, images, labels=labels, batch_size=8)
    hf = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "label": labels.numpy()}).with_format("torch")
    for data in (TensorDataset(images, labels), hf):
        got = evaluate(tiny_vit, data, batch_size=8)
        assert got["n"] == 20 and got["per_class"] == expected["per_class"]
        assert (got["top1"], got["top5"]) == (expected["top1"], expected["top5"])
    a = collect_stats(tiny_vit, images, progress=False)
    b = collect_stats(tiny_vit, TensorDataset(images), progress=False)
    torch.testing.assert_close(b.mean_abs, a.mean_abs, rtol=0, atol=0)
    assert torch.equal(a.count, b.count)


def test_image_datasets_that_cannot_be_used_say_why(tiny_vit):
    import datasets
    from torch.utils.data import TensorDataset
    raw = datasets.Dataset.from_dict({"image": [[0.0]] * 3, "label": [0, 1, 2]})
    with pytest.raises(TypeError, match="pixel_values"):
        evaluate(tiny_vit, raw)
    with pytest.raises(TypeError, match="not an image tensor"):
        evaluate(tiny_vit, [("not an image", 0)])
    with pytest.raises(TypeError, match="map-style dataset"):
        evaluate(tiny_vit, (x for x in range(3)))
    with pytest.raises(ValueError, match="labels"):
        evaluate(tiny_vit, TensorDataset(torch.randn(3, 1, 16, 16)))
    with pytest.raises(ValueError, match="class ids"):
        evaluate(tiny_vit, torch.randn(3, 1, 16, 16), labels=[0, 1, 2], classes=["tops"])


def test_image_evaluation_needs_labels(tiny_vit):
    with pytest.raises(ValueError, match="labels"):
        evaluate(tiny_vit, torch.randn(3, 1, 16, 16))
    with pytest.raises(ValueError):
        evaluate(tiny_vit, torch.randn(3, 1, 16, 16), labels=torch.tensor([0, 1]))


# -- task scores and the cross-task matrix --------------------------------------------------------------------
def _stats(mean_abs: torch.Tensor) -> NeuronStats:
    n = torch.full((mean_abs.shape[0],), 100.0, dtype=torch.float64)
    return NeuronStats(n, mean_abs, mean_abs, mean_abs ** 2, mean_abs * 0 + 0.5, mean_abs.sqrt())


def test_task_scores_rest_and_general():
    gen = torch.Generator().manual_seed(0)
    ia, ib, ic, ig = (torch.rand(2, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    stats = {"a": _stats(ia), "b": _stats(ib), "c": _stats(ic)}
    scores = task_scores(stats)
    torch.testing.assert_close(scores["a"], ia / ((ib + ic) / 2 + 1e-3), rtol=1e-12, atol=0)
    torch.testing.assert_close(scores["c"], ic / ((ia + ib) / 2 + 1e-3), rtol=1e-12, atol=0)
    general = task_scores(stats, retain="general", general=_stats(ig), eps=0.1)
    torch.testing.assert_close(general["b"], ib / (ig + 0.1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        task_scores({"a": _stats(ia)})
    with pytest.raises(ValueError):
        task_scores(stats, retain="general")


L, D = 2, 100


class ToyNet(nn.Module):
    """blocks[i].fc1 makes the neuron vector (all ones: weight 0, bias 1); blocks[i].fc2 (identity) reads it.
    forward() returns the [L, d] neuron values as fc2 sees them, i.e. after any ablation hook."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(L):
            block = nn.Module()
            block.fc1, block.fc2 = nn.Linear(4, D), nn.Identity()
            nn.init.zeros_(block.fc1.weight)
            nn.init.ones_(block.fc1.bias)
            self.blocks.append(block)

    def forward(self):
        x = torch.ones(1, 4)
        return torch.stack([b.fc2(b.fc1(x))[0] for b in self.blocks])


@pytest.fixture
def toy(monkeypatch):
    """A handle on ToyNet through the documented extension point (an ARCHITECTURES entry), three tasks with
    positive per-neuron weights w_T, accuracy_T = scale_T · Σ w_T·neuron / Σ w_T (monotone in what is pruned)."""
    monkeypatch.setitem(ARCHITECTURES, "ToyNet", Architecture("lm", "blocks", "fc2", "fc1"))
    handle = load_model(ToyNet())
    gen = torch.Generator().manual_seed(7)
    tasks = ["a", "b", "c"]
    weights = {t: torch.rand(L, D, generator=gen, dtype=torch.float64) + 0.05 for t in tasks}
    scale = {"a": 0.9, "b": 0.6, "c": 0.75}
    scores = {t: weights[t] + 0.5 * torch.rand(L, D, generator=gen, dtype=torch.float64) for t in tasks}

    def accuracy(t):
        with torch.no_grad():
            values = handle.model().double()
        return scale[t] * float((weights[t] * values).sum() / weights[t].sum())
    evaluators = {t: (lambda t=t: accuracy(t)) for t in tasks}
    return handle, tasks, weights, scale, scores, evaluators


def _acc_after_pruning(weights, scale, scores_a, frac, t):
    """By hand: prune the round(frac·N) highest-scoring neurons (scores are distinct) and sum what is left."""
    flat = scores_a.flatten().numpy()
    k = max(1, int(round(frac * flat.size)))
    pruned = np.argsort(-flat, kind="stable")[:k]
    w = weights[t].flatten().numpy()
    return scale[t] * (w.sum() - w[pruned].sum()) / w.sum()


def test_cross_task_matrix_fixed_frac(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    result = cross_task_matrix(handle, scores, evaluators, frac=0.1, progress=False)
    assert result.tasks == tasks
    assert result.base == pytest.approx(scale)
    assert result.fracs == {t: 0.1 for t in tasks}
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            expected = _acc_after_pruning(weights, scale, scores[a], 0.1, b)
            assert result.pruned[i, j] == pytest.approx(expected, rel=1e-9)
            assert result.matrix[i, j] == pytest.approx(expected / scale[b], rel=1e-9)
    # pruning a task's own neurons hurts it most
    assert all(result.matrix[i, i] == result.matrix[:, i].min() for i in range(3))
    assert _n_hooks(handle) == [0] * L


def test_cross_task_matrix_one_callable_for_all_tasks(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    by_task = cross_task_matrix(handle, scores, evaluators, frac=0.05, progress=False)
    at_once = cross_task_matrix(handle, scores, lambda: {t: evaluators[t]() for t in tasks}, frac=0.05,
                                progress=False)
    np.testing.assert_array_equal(by_task.matrix, at_once.matrix)


def test_cross_task_matrix_target_bisection(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    tol = 0.02
    result = cross_task_matrix(handle, scores, evaluators, target=0.8, max_frac=0.5, tol=tol, progress=False)
    for i, a in enumerate(tasks):
        f = result.fracs[a]
        assert 0 < f <= 0.5
        own = _acc_after_pruning(weights, scale, scores[a], f, a)
        assert abs(own - 0.8 * scale[a]) <= tol * scale[a], (a, f, own / scale[a])
        assert result.pruned[i, i] == pytest.approx(own, rel=1e-9)
        assert abs(result.matrix[i, i] - 0.8) <= tol
    # an unreachable target reports the bound
    capped = cross_task_matrix(handle, scores, evaluators, target=0.1, max_frac=0.05, progress=False)
    assert capped.fracs == {t: 0.05 for t in tasks}
    assert _n_hooks(handle) == [0] * L


def test_target_row_reuses_the_bisections_own_measurement(toy):
    """The row at the fraction found reads the pruned task from the bisection's pass at that fraction: each task's
    own evaluator runs once per fraction tried (never twice at one), the others once each, and the matrix is the
    one evaluated afresh (the analytic accuracies)."""
    handle, tasks, weights, scale, scores, evaluators = toy
    calls = {t: [] for t in tasks}
    counting = {t: (lambda t=t: calls[t].append(1) or evaluators[t]()) for t in tasks}
    result = cross_task_matrix(handle, scores, counting, target=0.8, max_frac=0.5, tol=0.02, base=dict(scale),
                               progress=False)
    steps = {}
    for a in tasks:                     # the bisection alone, counted: the same fractions tried
        n = []
        _bisect_frac(handle, scores[a], lambda a=a: n.append(1) or evaluators[a](), scale[a], 0.8, mode="global",
                     ablation="zero", means=None, max_frac=0.5, tol=0.02, max_steps=12)
        steps[a] = len(n)
    for i, a in enumerate(tasks):
        assert len(calls[a]) == steps[a] + (len(tasks) - 1), a      # its own steps, and once in each other row
        for j, b in enumerate(tasks):
            assert result.pruned[i, j] == pytest.approx(
                _acc_after_pruning(weights, scale, scores[a], result.fracs[a], b), rel=1e-9)


def test_cross_task_matrix_reports_convergence(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    tol = 0.02
    # a fourth task whose accuracy no pruning changes: its target can never be reached
    gen = torch.Generator().manual_seed(11)
    scores = {**scores, "flat": torch.rand(L, D, generator=gen, dtype=torch.float64)}
    evaluators = {**evaluators, "flat": lambda: 0.5}
    result = cross_task_matrix(handle, scores, evaluators, target=0.8, max_frac=0.5, tol=tol, progress=False)
    assert result.converged == {"a": True, "b": True, "c": True, "flat": False}
    assert result.not_converged() == ["flat"]
    assert result.fracs["flat"] == 0.5 and result.reached["flat"] == 1.0
    for i, a in enumerate(tasks):
        own = _acc_after_pruning(weights, scale, scores[a], result.fracs[a], a) / scale[a]
        assert result.reached[a] == pytest.approx(own, rel=1e-9)
        assert result.reached[a] == pytest.approx(result.matrix[i, i], rel=1e-12)
        assert abs(result.reached[a] - 0.8) <= tol
    # out of reach within max_frac: not converged, and the accuracy reached at the bound is reported
    capped = cross_task_matrix(handle, scores, evaluators, target=0.1, max_frac=0.05, progress=False)
    assert capped.not_converged() == tasks + ["flat"]
    for a in tasks:
        assert capped.reached[a] == pytest.approx(_acc_after_pruning(weights, scale, scores[a], 0.05, a) / scale[a])
        assert capped.reached[a] > 0.1 + 0.02
    # a fixed fraction has no target: converged is None, reached is the own relative accuracy
    fixed = cross_task_matrix(handle, scores, evaluators, frac=0.1, progress=False)
    assert fixed.converged == {t: None for t in tasks + ["flat"]} and fixed.not_converged() == []
    assert [fixed.reached[t] for t in fixed.tasks] == pytest.approx(np.diag(fixed.matrix).tolist())


def test_bisection_of_a_task_the_model_never_gets_right(toy):
    """Unpruned accuracy 0 (a random-weight model): no fraction to find, so the bisection reports the bound, not
    converged, reached nan, after no evaluation of its own (it used to divide by the zero accuracy)."""
    handle, tasks, weights, scale, scores, evaluators = toy
    calls = []
    zero = {**evaluators, "a": lambda: calls.append(1) or 0.0}
    result = cross_task_matrix(handle, scores, zero, target=0.8, max_frac=0.5, progress=False)
    assert result.fracs["a"] == 0.5 and result.converged["a"] is False and np.isnan(result.reached["a"])
    assert len(calls) == 1 + len(tasks)            # its unpruned accuracy and its cell in each row, nothing else
    assert result.converged["b"] is True and result.converged["c"] is True


def test_matched_random_mask_keeps_per_layer_counts():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(4, 50, generator=gen)
    scores[1] += 1.0                                        # global selection piles into layer 1
    mask = select_neurons(scores, 0.3, "global")
    mask[0], mask[3] = False, True                          # an empty layer stays empty, a full one full
    counts = mask.sum(1)
    assert counts[0] == 0 and counts[1] == 50 and 0 < counts[2] < 50
    draws = [matched_random_mask(mask, seed) for seed in (0, 1, 2)]
    for r in draws:
        assert r.dtype == torch.bool and r.shape == mask.shape
        assert torch.equal(r.sum(1), counts)
    assert torch.equal(matched_random_mask(mask, 1), draws[1])        # seeded
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    partial = select_neurons(scores, 0.1, "per_layer")
    assert not torch.equal(matched_random_mask(partial, 0), partial)  # not the selection itself
    with pytest.raises(ValueError, match="bool"):
        matched_random_mask(scores, 0)


def _acc_after_mask(weights, scale, mask, t):
    w = weights[t].numpy()
    return scale[t] * (w.sum() - w[mask.numpy()].sum()) / w.sum()


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_cross_task_matrix_random_baseline(toy, mode):
    handle, tasks, weights, scale, scores, evaluators = toy
    seeds = (0, 1, 2)
    result = cross_task_matrix(handle, scores, evaluators, frac=0.1, mode=mode, random_seeds=seeds, progress=False)
    assert result.random_pruned.shape == (3, 3, 3)
    expected = np.zeros((3, 3, 3))
    for i, a in enumerate(tasks):
        mask = select_neurons(scores[a], 0.1, mode)
        for s, seed in enumerate(seeds):
            random_mask = matched_random_mask(mask, seed)
            for j, b in enumerate(tasks):
                expected[s, i, j] = _acc_after_mask(weights, scale, random_mask, b)
    np.testing.assert_allclose(result.random_pruned, expected, rtol=1e-9)
    assert len({tuple(result.random_pruned[:, 0, 0]), tuple(result.random_pruned[:, 0, 1])}) == 2  # seeds differ
    scale_row = np.array([scale[t] for t in tasks])
    np.testing.assert_allclose(result.random_matrix, expected.mean(0) / scale_row, rtol=1e-9)

    # the summary, by hand
    sel = result.selectivity()
    m, r = result.matrix, result.random_matrix
    for i, a in enumerate(tasks):
        others = [j for j in range(3) if j != i]
        assert sel["own"][i] == m[i, i] and sel["random_own"][i] == r[i, i]
        assert sel["others"][i] == pytest.approx((m[i, others[0]] + m[i, others[1]]) / 2)
        assert sel["random_others"][i] == pytest.approx((r[i, others[0]] + r[i, others[1]]) / 2)
        assert sel["selectivity"][i] == pytest.approx(sel["others"][i] - m[i, i])
        assert sel["random_selectivity"][i] == pytest.approx(sel["random_others"][i] - r[i, i])
        assert sel["own_vs_random"][i] == pytest.approx(m[i, i] / r[i, i])
        assert sel["others_vs_random"][i] == pytest.approx(
            (m[i, others[0]] / r[i, others[0]] + m[i, others[1]] / r[i, others[1]]) / 2)
    # the toy's scores follow each task's own weights: its own neurons hurt it more than random ones
    assert (sel["own_vs_random"] < 1).all() and (sel["selectivity"] > sel["random_selectivity"]).all()
    assert _n_hooks(handle) == [0] * L


def test_cross_task_matrix_without_random_seeds_has_no_baseline(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    result = cross_task_matrix(handle, scores, evaluators, frac=0.1, progress=False)
    assert result.random_pruned is None and result.random_matrix is None
    sel = result.selectivity()
    assert np.isnan(sel["random_selectivity"]).all() and np.isfinite(sel["selectivity"]).all()
    with pytest.raises(ValueError, match="distinct"):
        cross_task_matrix(handle, scores, evaluators, frac=0.1, random_seeds=(1, 1), progress=False)


def test_cross_task_matrix_arguments(toy):
    handle, tasks, weights, scale, scores, evaluators = toy
    with pytest.raises(ValueError):
        cross_task_matrix(handle, scores, evaluators, progress=False)
    with pytest.raises(ValueError):
        cross_task_matrix(handle, scores, evaluators, frac=0.1, target=0.8, progress=False)
    with pytest.raises(ValueError):
        cross_task_matrix(handle, scores, evaluators, target=1.2, progress=False)
    with pytest.raises(ValueError, match="c"):
        cross_task_matrix(handle, scores, {"a": evaluators["a"], "b": evaluators["b"]}, frac=0.1,
                          progress=False)


def _n_hooks(handle):
    return [len(handle.neuron_module(l)._forward_pre_hooks) for l in range(handle.n_layers)]


def test_cross_task_matrix_keeps_per_document_hits(toy):
    """Evaluators that give per-document hits produce the same matrix as accuracies, and the result keeps every
    ablation's hits, from which evidence.cross_task_intervals recovers the matrices without another pass."""
    from modsep_nb.evidence import cross_task_intervals
    handle, tasks, weights, scale, scores, evaluators = toy
    sizes = np.array([300.0, 500.0, 200.0])       # three documents of unequal length; the same accuracy in each

    def as_hits(t):
        acc = evaluators[t]()
        return {"n": sizes, "top1": acc * sizes}
    by_accuracy = cross_task_matrix(handle, scores, evaluators, frac=0.1, random_seeds=(0, 1), progress=False)
    by_hits = cross_task_matrix(handle, scores, {t: (lambda t=t: as_hits(t)) for t in tasks}, frac=0.1,
                                random_seeds=(0, 1), progress=False)
    np.testing.assert_allclose(by_hits.matrix, by_accuracy.matrix, rtol=1e-12)
    np.testing.assert_allclose(by_hits.random_matrix, by_accuracy.random_matrix, rtol=1e-12)
    assert by_accuracy.documents is None
    docs = by_hits.documents
    assert set(docs["pruned"]) == set(tasks) and len(docs["random"]) == 2
    np.testing.assert_allclose(docs["base"]["b"]["top1"], scale["b"] * sizes)
    intervals = cross_task_intervals(by_hits, n_boot=50, seed=0)
    np.testing.assert_allclose(intervals["selected"]["matrix"], by_hits.matrix, rtol=1e-12)
    np.testing.assert_allclose(intervals["random"]["matrix"], by_hits.random_matrix, rtol=1e-12)
    assert intervals["selected"]["samples"].shape == (50, 3, 3)
    with pytest.raises(ValueError, match="per-document hits"):
        cross_task_intervals(by_accuracy, n_boot=10, seed=0)
    # a bisection with hits evaluators finds the same fractions as with accuracies
    target_acc = cross_task_matrix(handle, scores, evaluators, target=0.8, max_frac=0.5, progress=False)
    target_hits = cross_task_matrix(handle, scores, {t: (lambda t=t: as_hits(t)) for t in tasks}, target=0.8,
                                    max_frac=0.5, progress=False)
    assert target_hits.fracs == pytest.approx(target_acc.fracs) and target_hits.documents is None


def test_image_rows_replaying_the_blocks_below_each_set_equal_rows_computed_afresh(tiny_vit):
    """A fixed fraction's rows replay the blocks below each set's first layer (and its matched random set's) from
    the passes before: every entry equals the row evaluated by hand with the set ablated and nothing replayed."""
    from modsep_nb.pruning import ablate
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(40, *tiny_vit.image_shape, generator=gen)
    labels = torch.randint(0, 2, (40,), generator=gen)
    tasks = {"a": labels == 0, "b": labels == 1}

    def per_task():                     # one pass over the images in batches of 16, every task from it
        with torch.no_grad():
            preds = torch.cat([tiny_vit.image_logits(images[i:i + 16]).argmax(-1) for i in range(0, 40, 16)])
        return {t: float((preds == labels)[m].float().mean()) for t, m in tasks.items()}
    n_layers, d = tiny_vit.n_layers, tiny_vit.d_mlp
    scores = {t: torch.rand(n_layers, d, generator=gen, dtype=torch.float64) for t in tasks}
    scores["a"][0] = -1.0               # a's set starts below the top, b's may not: both kinds of row
    result = cross_task_matrix(tiny_vit, scores, per_task, frac=0.1, random_seeds=(0,), progress=False)
    base = per_task()
    for i, a in enumerate(tasks):
        mask = select_neurons(scores[a], 0.1, "global")
        for which, m in (("pruned", mask), ("random", matched_random_mask(mask, 0))):
            with ablate(tiny_vit, m):
                row = per_task()
            got = result.pruned[i] if which == "pruned" else result.random_pruned[0, i]
            assert got.tolist() == [row[b] for b in tasks], (a, which)
    assert result.base == base
