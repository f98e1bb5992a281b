"""Selective pruning (docs/method.md §3): scores find planted task-specific neurons; importances, eps, float64 scores
and index tie-breaking; selection checks; ablation by hooks that leave the model exactly as it was."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from conftest import VOCAB, VOCAB_SIZE, WORDS, make_tokenizer, random_texts
from modsep_nb import NeuronStats, ablate, collect_stats, load_model, prune_scores, select_neurons
from modsep_nb.pruning import IMPORTANCES

# -- planted neurons --------------------------------------------------------------------------------------
PLANTED_WORDS = WORDS[:5]
OTHER_WORDS = WORDS[5:]
PLANTED_NEURONS = [3, 17, 29]          # layer-0 neurons that fire on planted tokens only
D_MODEL, D_MLP, N_LAYERS = 16, 32, 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Llama whose layer-0 neurons PLANTED_NEURONS respond to PLANTED_WORDS and nothing else.

    Attention outputs are zeroed (o_proj = 0), so the MLP of layer 0 sees the (normalised) token embedding.
    Planted tokens have a component along u = e_0 that no other token has; the planted neurons' gate and up
    rows are 3·u, every other neuron's rows are orthogonal to u (and small). So a planted neuron is
    silu(3a)·3a > 0 on a planted token and exactly 0 on any other token."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=D_MODEL, intermediate_size=D_MLP,
                                      num_hidden_layers=N_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = torch.randn(VOCAB_SIZE, D_MODEL, generator=gen)
        emb[:, 0] = 0.0
        emb[[VOCAB[w] for w in PLANTED_WORDS], 0] = 4.0
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj.weight[:, 0] = 0.0
            layer.mlp.up_proj.weight[:, 0] = 0.0
        mlp0 = model.model.layers[0].mlp
        for n in PLANTED_NEURONS:
            for proj in (mlp0.gate_proj, mlp0.up_proj):
                proj.weight[n] = 0.0
                proj.weight[n, 0] = 3.0
    directory = tmp_path_factory.mktemp("planted")
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    handle = load_model(directory)
    planted_texts = random_texts(12, seed=10, min_len=5, max_len=25, words=PLANTED_WORDS)
    other_texts = random_texts(12, seed=11, min_len=5, max_len=25, words=OTHER_WORDS)
    forget = collect_stats(handle, planted_texts, ctx=32, progress=False)
    retain = collect_stats(handle, other_texts, ctx=32, progress=False)
    return handle, forget, retain


def test_planted_neurons_are_silent_on_other_tokens(planted):
    _, forget, retain = planted
    assert torch.all(retain.mean_abs[0, PLANTED_NEURONS] == 0)
    assert torch.all(forget.mean_abs[0, PLANTED_NEURONS] > 1.0)


def test_planted_neurons_selected_globally(planted):
    _, forget, retain = planted
    scores = prune_scores(forget, retain)
    mask = select_neurons(scores, len(PLANTED_NEURONS) / (N_LAYERS * D_MLP), mode="global")
    expected = torch.zeros(N_LAYERS, D_MLP, dtype=torch.bool)
    expected[0, PLANTED_NEURONS] = True
    assert torch.equal(mask, expected)


def test_planted_neurons_selected_per_layer(planted):
    _, forget, retain = planted
    scores = prune_scores(forget, retain)
    mask = select_neurons(scores, len(PLANTED_NEURONS) / D_MLP, mode="per_layer")
    assert torch.nonzero(mask[0]).flatten().tolist() == PLANTED_NEURONS
    assert mask.sum(1).tolist() == [len(PLANTED_NEURONS)] * N_LAYERS
    # layer 1's selection is its own top 3
    assert set(torch.nonzero(mask[1]).flatten().tolist()) == set(torch.topk(scores[1], 3).indices.tolist())


@pytest.mark.parametrize("name", IMPORTANCES)
def test_planted_neurons_found_by_every_importance(planted, name):
    _, forget, retain = planted
    scores = prune_scores(forget, retain, importance=name)
    top = torch.topk(scores.flatten(), len(PLANTED_NEURONS)).indices.tolist()
    assert sorted(top) == PLANTED_NEURONS                   # flat index == layer-0 index


def test_zero_ablation_of_planted_neurons_only_touches_planted_tokens(planted):
    handle, _, _ = planted
    mask = torch.zeros(N_LAYERS, D_MLP, dtype=torch.bool)
    mask[0, PLANTED_NEURONS] = True
    tok = handle.tokenizer
    other = tok(" ".join(OTHER_WORDS[:12]), return_tensors="pt")["input_ids"]
    plant = tok(" ".join(PLANTED_WORDS * 2), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = [handle.model(input_ids=x).logits for x in (other, plant)]
        with ablate(handle, mask):
            after = [handle.model(input_ids=x).logits for x in (other, plant)]
    assert torch.equal(before[0], after[0])                 # those neurons were 0 on other tokens anyway
    assert not torch.allclose(before[1][0, 1:], after[1][0, 1:])


# -- importances, eps, dtype and ties ----------------------------------------------------------------------
def _stats_from(x: np.ndarray) -> NeuronStats:
    """NeuronStats of raw activations x [n, L, d], computed directly in float64."""
    t = torch.from_numpy(x)
    count = torch.full((x.shape[1],), float(x.shape[0]), dtype=torch.float64)
    return NeuronStats(count, t.mean(0), t.abs().mean(0), (t * t).mean(0), (t > 0).double().mean(0),
                       t.abs().sqrt().mean(0))


def _importance_by_hand(x: np.ndarray, name: str) -> np.ndarray:
    return {"abs": np.abs(x).mean(0), "rms": np.sqrt((x ** 2).mean(0)), "std": x.std(0, ddof=1),
            "freq": (x > 0).mean(0), "sqrt": np.sqrt(np.abs(x)).mean(0)}[name]


@pytest.mark.parametrize("name", IMPORTANCES)
@pytest.mark.parametrize("eps", [1e-3, 0.25])
def test_each_importance_matches_its_statistic(name, eps):
    rng = np.random.default_rng(0)
    xf = rng.normal(0.5, 2.0, size=(40, 2, 6))
    xr = rng.normal(-0.3, 1.0, size=(60, 2, 6))
    scores = prune_scores(_stats_from(xf), _stats_from(xr), importance=name, eps=eps)
    expected = _importance_by_hand(xf, name) / (_importance_by_hand(xr, name) + eps)
    assert scores.dtype == torch.float64 and scores.shape == (2, 6)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10)


def test_default_importance_and_eps():
    rng = np.random.default_rng(1)
    f, r = _stats_from(rng.normal(size=(30, 2, 4))), _stats_from(rng.normal(size=(30, 2, 4)))
    np.testing.assert_allclose(prune_scores(f, r).numpy(), (f.mean_abs / (r.mean_abs + 1e-3)).numpy(), rtol=1e-12)


def test_eps_is_used_when_retain_is_silent():
    rng = np.random.default_rng(2)
    f = _stats_from(rng.normal(size=(20, 1, 5)))
    r = _stats_from(np.zeros((20, 1, 5)))
    for eps in (1e-3, 0.5):
        np.testing.assert_allclose(prune_scores(f, r, eps=eps).numpy(), f.mean_abs.numpy() / eps, rtol=1e-12)
    assert torch.isinf(prune_scores(f, r, eps=0.0)).all()
    with pytest.raises(ValueError):
        prune_scores(f, r, eps=-1e-3)
    with pytest.raises(ValueError):
        prune_scores(f, r, importance="l2")


def test_relative_eps_is_a_fraction_of_each_layers_median_retain_importance():
    rng = np.random.default_rng(4)
    xf = rng.normal(0, 1.0, size=(30, 3, 6))
    # layers on very different scales, as trained vs random-init models are
    xr = rng.normal(0, 1.0, size=(30, 3, 6)) * np.array([0.05, 1.0, 20.0])[None, :, None]
    f, r = _stats_from(xf), _stats_from(xr)
    i_r = np.abs(xr).mean(0)
    for rel in (0.1, 1.0):
        eps_l = rel * np.median(i_r, axis=1)                 # even d_mlp: the mean of the two middle values
        assert eps_l[2] > 100 * eps_l[0]
        expected = np.abs(xf).mean(0) / (i_r + eps_l[:, None])
        np.testing.assert_allclose(prune_scores(f, r, eps_relative=rel).numpy(), expected, rtol=1e-12)
        # eps is not used when eps_relative is given
        np.testing.assert_allclose(prune_scores(f, r, eps=0.5, eps_relative=rel).numpy(), expected, rtol=1e-12)
    odd = _stats_from(xr[:, :, :5])
    scores = prune_scores(odd, odd, eps_relative=1.0).numpy()
    np.testing.assert_allclose(scores, i_r[:, :5] / (i_r[:, :5] + np.median(i_r[:, :5], axis=1)[:, None]),
                               rtol=1e-12)
    # the relative eps follows the scale: scaling every activation leaves the scores unchanged
    scaled = prune_scores(_stats_from(xf * 7), _stats_from(xr * 7), eps_relative=0.1)
    np.testing.assert_allclose(scaled.numpy(), prune_scores(f, r, eps_relative=0.1).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="eps_relative"):
        prune_scores(f, r, eps_relative=-0.1)


def test_task_scores_pass_relative_eps():
    from modsep_nb.pruning import task_scores
    rng = np.random.default_rng(5)
    stats = {t: _stats_from(rng.normal(size=(20, 2, 4))) for t in "abc"}
    got = task_scores(stats, eps_relative=0.3)
    torch.testing.assert_close(got["b"], prune_scores(stats["b"], [stats["a"], stats["c"]], eps_relative=0.3),
                               rtol=0, atol=0)
    assert not torch.equal(got["b"], task_scores(stats)["b"])


def test_retain_list_is_pooled_with_equal_weight_per_task():
    rng = np.random.default_rng(3)
    f = _stats_from(rng.normal(size=(10, 2, 3)))
    small = rng.normal(0, 1, size=(5, 2, 3))            # very different token counts: equal weight anyway
    big = rng.normal(0, 4, size=(500, 2, 3))
    pooled = (np.abs(small).mean(0) + np.abs(big).mean(0)) / 2
    scores = prune_scores(f, [_stats_from(small), _stats_from(big)])
    np.testing.assert_allclose(scores.numpy(), f.mean_abs.numpy() / (pooled + 1e-3), rtol=1e-12)


def test_scores_are_float64_without_fp16_ties():
    # scores 1, 1+1e-5, 1+2e-5, ...: distinct in float64, but float16 (the reference) collapses them
    n = 100
    forget = torch.ones(2, n // 2, dtype=torch.float64) + torch.arange(n, dtype=torch.float64).view(2, -1) * 1e-5
    f = NeuronStats(torch.full((2,), 10.0, dtype=torch.float64), forget, forget, forget ** 2, forget, forget)
    base = torch.full((2, n // 2), 1.0 - 1e-3, dtype=torch.float64)
    r = NeuronStats(torch.full((2,), 10.0, dtype=torch.float64), base, base, base ** 2, base, base)
    scores = prune_scores(f, r)
    assert scores.dtype == torch.float64
    assert torch.unique(scores).numel() == n
    assert torch.unique(scores.half()).numel() < 5          # what fp16 would have made of them
    mask = select_neurons(scores, 0.1)
    assert mask.flatten().nonzero().flatten().tolist() == list(range(n - 10, n))   # the truly largest


def test_ties_broken_by_index():
    scores = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 2.0, 0.0, 0.0]])
    mask = select_neurons(scores, 0.3)                      # 3 of 10; five neurons tie at 3.0
    assert mask.flatten().nonzero().flatten().tolist() == [0, 2, 3]
    per_layer = select_neurons(scores, 0.4, mode="per_layer")   # 2 per layer
    assert per_layer.nonzero().tolist() == [[0, 0], [0, 2], [1, 0], [1, 1]]
    equal = torch.zeros(3, 10)
    for _ in range(3):                                       # deterministic
        assert select_neurons(equal, 0.2).flatten().nonzero().flatten().tolist() == list(range(6))
        assert select_neurons(equal.half(), 0.2).flatten().nonzero().flatten().tolist() == list(range(6))


def test_select_neurons_counts_and_validation():
    scores = torch.randn(4, 25, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for frac in (0.01, 0.1, 0.37, 0.99):
        assert select_neurons(scores, frac).sum() == max(1, round(frac * 100))
        assert select_neurons(scores, frac, "per_layer").sum(1).tolist() == [max(1, round(frac * 25))] * 4
        # the selected neurons are the top ones: every selected score >= every unselected score
        m = select_neurons(scores, frac)
        assert scores[m].min() >= scores[~m].max()
    for bad in (0, 1, 1.0, -0.1, 1.5, float("nan"), "0.1", None):
        with pytest.raises(ValueError, match="frac"):
            select_neurons(scores, bad)
    with pytest.raises(ValueError):
        select_neurons(scores, 0.1, mode="layerwise")
    with pytest.raises(ValueError):
        select_neurons(scores.flatten(), 0.1)
    nan_scores = scores.clone()
    nan_scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match="2"):
        select_neurons(nan_scores, 0.1)


# -- ablation --------------------------------------------------------------------------------------------
def _inputs(handle):
    tok = handle.tokenizer
    batch = tok([" ".join(random.Random(i).choice(WORDS) for _ in range(9)) for i in range(3)],
                return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _capture(handle, ids, mask):
    """Neuron-module inputs as the module sees them (our pre-hook is registered last, so it runs last)."""
    with handle.capture() as captured, torch.no_grad():
        logits = handle.model(input_ids=ids, attention_mask=mask).logits
    return {layer: rows[-1] for layer, rows in captured.items()}, logits


def _mask(handle, seed=0, frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(handle.n_layers, handle.d_mlp, generator=gen) < frac


def _n_hooks(handle):
    return [len(handle.neuron_module(l)._forward_pre_hooks) for l in range(handle.n_layers)]


def test_zero_ablation(tiny_llama):
    ids, am = _inputs(tiny_llama)
    clean, logits_before = _capture(tiny_llama, ids, am)
    mask = _mask(tiny_llama)
    assert mask[0].any() and mask[1].any()
    with ablate(tiny_llama, mask, "zero"):
        ablated, logits_inside = _capture(tiny_llama, ids, am)
    for layer in range(2):
        assert torch.all(ablated[layer][..., mask[layer]] == 0)
    assert torch.equal(ablated[0][..., ~mask[0]], clean[0][..., ~mask[0]])    # nothing else touched in layer 0
    assert not torch.equal(logits_inside, logits_before)
    # the same as deleting those neurons' columns of the output projections
    pruned = copy.deepcopy(tiny_llama.model)
    with torch.no_grad():
        for layer in range(2):
            pruned.model.layers[layer].mlp.down_proj.weight[:, mask[layer]] = 0.0
        expected = pruned(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(logits_inside, expected, rtol=1e-5, atol=1e-5)


def test_mean_ablation(tiny_llama):
    ids, am = _inputs(tiny_llama)
    clean, _ = _capture(tiny_llama, ids, am)
    mask = _mask(tiny_llama, seed=1)
    means = torch.randn(2, tiny_llama.d_mlp, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with ablate(tiny_llama, mask, "mean", means=means):
        ablated, _ = _capture(tiny_llama, ids, am)
    for layer in range(2):
        got = ablated[layer][..., mask[layer]]                       # [batch, seq, n_masked]
        want = means[layer][mask[layer]].float().expand_as(got)
        assert torch.equal(got, want)
    assert torch.equal(ablated[0][..., ~mask[0]], clean[0][..., ~mask[0]])


def test_model_is_exactly_restored_after_ablation(tiny_llama):
    ids, am = _inputs(tiny_llama)
    hooks_before = _n_hooks(tiny_llama)
    with torch.no_grad():
        before = tiny_llama.model(input_ids=ids, attention_mask=am).logits
    means = torch.randn(2, tiny_llama.d_mlp, dtype=torch.float64)
    with ablate(tiny_llama, _mask(tiny_llama), "zero"):
        pass
    with ablate(tiny_llama, _mask(tiny_llama, 2), "mean", means=means):
        assert _n_hooks(tiny_llama) != hooks_before
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(tiny_llama, _mask(tiny_llama, 4), "zero"):
            raise RuntimeError("boom")
    assert _n_hooks(tiny_llama) == hooks_before
    with torch.no_grad():
        after = tiny_llama.model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(before, after)


def test_ablate_validation(tiny_llama):
    good = _mask(tiny_llama)
    with pytest.raises(ValueError):
        with ablate(tiny_llama, good[:, :5]):
            pass
    with pytest.raises(ValueError, match="means"):
        with ablate(tiny_llama, good, "mean"):
            pass
    with pytest.raises(ValueError):
        with ablate(tiny_llama, good, "mean", means=torch.zeros(2, 3)):
            pass
    with pytest.raises(ValueError):
        with ablate(tiny_llama, good, "noise"):
            pass
    assert _n_hooks(tiny_llama) == [0, 0]


# -- iterative pruning --------------------------------------------------------------------------------------
def test_iterative_pruning_recollects_on_the_pruned_model(tiny_llama):
    import modsep_nb as ms
    from conftest import random_texts
    from modsep_nb.pruning import iterative_prune
    forget_docs, retain_docs = random_texts(12, seed=11), random_texts(12, seed=12)
    seen = []

    def collect_forget():
        seen.append(ms.collect_stats(tiny_llama, forget_docs, progress=False))
        return seen[-1]

    mask = iterative_prune(tiny_llama, collect_forget, lambda: ms.collect_stats(tiny_llama, retain_docs, progress=False),
                           frac=0.05, steps=3)
    n = tiny_llama.n_layers * tiny_llama.d_mlp
    k = max(1, round(0.05 * n))
    assert int(mask.sum()) == 3 * k and len(seen) == 3
    # step 1 is plain selective pruning on the unpruned model
    first = ms.select_neurons(ms.prune_scores(seen[0], ms.collect_stats(tiny_llama, retain_docs, progress=False)), 0.05)
    assert (mask & first).sum() == k
    # later steps were measured with the earlier selections ablated: those neurons read exactly zero
    assert torch.all(seen[1].mean_abs[first] == 0) and torch.all(seen[0].mean_abs[first] > 0)


def test_selection_is_the_one_route_from_statistics_to_masks():
    """pruning.Selection: scores I(F) / (I(R) + eps) against the pooled other tasks (or the general corpus), the
    top frac by mode; evidence.pipeline_masks is the same route."""
    from modsep_nb.evidence import pipeline_masks
    from modsep_nb.pruning import Selection
    from modsep_nb.statistics import weighted_pool
    gen = torch.Generator().manual_seed(0)
    stats = {t: NeuronStats.from_sums(torch.tensor([4.0, 4.0]), [torch.rand(2, 8, generator=gen, dtype=torch.float64)
                                                                 for _ in range(5)]) for t in "abc"}
    selection = Selection(0.25, "per_layer", "abs", eps=0.01)
    masks = selection.masks(stats)
    for t, st in stats.items():
        by_hand = st.mean_abs / (weighted_pool([s for u, s in stats.items() if u != t]).mean_abs + 0.01)
        expected = torch.zeros(2, 8, dtype=torch.bool)
        expected.scatter_(1, by_hand.argsort(dim=1, descending=True)[:, :2], True)      # 25% of 8 in each layer
        assert torch.equal(masks[t], expected)
    assert all(torch.equal(masks[t], m) for t, m in pipeline_masks(stats, **selection.kwargs()).items())
    with pytest.raises(ValueError, match="general corpus"):
        Selection(0.25, retain="general").masks(stats)
    general = Selection(0.25, retain="general", eps=0.01, general=stats["a"]).scores(stats)
    torch.testing.assert_close(general["b"], stats["b"].mean_abs / (stats["a"].mean_abs + 0.01))
    with pytest.raises(AttributeError):
        selection.frac = 0.5                           # frozen: one selection, not a settings bag that drifts


def test_layer_medians_are_each_rows_median_odd_and_even_widths():
    from modsep_nb.pruning import layer_medians
    gen = torch.Generator().manual_seed(0)
    for d in (7, 8, 1536):
        values = torch.randn(5, d, generator=gen, dtype=torch.float64)
        values[1] = 2.0                                    # a row of one value
        expected = torch.quantile(values, 0.5, dim=1, interpolation="midpoint")
        torch.testing.assert_close(layer_medians(values), expected, rtol=0, atol=1e-15)
