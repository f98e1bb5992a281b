"""Localisers (notebook 07): each one finds a planted task neuron on a tiny model where the answer is known, and
does not rank first a neuron that fires equally on every task; the attribution is checked against a finite
difference of the task's loss, and the LAPE / t scores against hand computations from the statistics."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VOCAB, VOCAB_SIZE, WORDS, llama_to_plant, make_tokenizer, random_texts
from modsep_nb import collect_stats, load_model
from modsep_nb.data import lm_batches
from modsep_nb.evidence import bootstrap_masks, pipeline_masks
from modsep_nb.pruning import (IMPORTANCES, LOCALISERS, attribution_scores, auroc_scores, collect_attribution,
                               importance, lape_scores, select_neurons, task_scores, ttest_scores)
from modsep_nb.statistics import BlockStats, NeuronStats, bootstrap_weights, collect_block_stats

TASK_WORDS = {"planted": WORDS[:6], "a": WORDS[6:24], "b": WORDS[24:42]}
PLANTED, EVERYWHERE = 5, 9          # layer-0 neurons: fires on the planted task's tokens only / on every token
D_MODEL, D_MLP, CTX = 16, 32, 32


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A one-layer Llama (attention output zeroed, so the MLP sees each token's normalised embedding). Every
    embedding row has the same norm, so after RMSNorm a coordinate set equally in every row is the same for
    every token. Coordinate 0 is 4 on the planted task's words only, coordinate 1 is 3 on every token; neuron
    PLANTED reads coordinate 0 (silu(c)·c > 0 on planted words, exactly 0 elsewhere), neuron EVERYWHERE reads
    coordinate 1 (one constant > 0 on every token). PLANTED writes along coordinate 2, which the unembedding
    reads as +3 for the planted words and -3 for the rest: it lowers the planted task's loss. EVERYWHERE writes
    nothing (its direct effect is 0). The other neurons are random (weights 10 x the initialiser's)."""
    model = llama_to_plant(D_MODEL, D_MLP, n_layers=1)
    gen = torch.Generator().manual_seed(1)
    planted_ids = [VOCAB[w] for w in TASK_WORDS["planted"]]
    with torch.no_grad():
        rest = torch.randn(VOCAB_SIZE, D_MODEL - 3, generator=gen)
        rest = rest / rest.norm(dim=1, keepdim=True)
        emb = torch.zeros(VOCAB_SIZE, D_MODEL)
        emb[:, 1] = 3.0
        emb[:, 3:] = 5.0 * rest                        # norm² 9 + 25 = 34 ...
        emb[planted_ids, 0] = 4.0
        emb[planted_ids, 3:] = 3.0 * rest[planted_ids]   # ... and 16 + 9 + 9 = 34 for planted words
        model.model.embed_tokens.weight.copy_(emb)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        mlp = layer.mlp
        for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            proj.weight.mul_(10.0)                     # the other neurons: activations and effects of O(0.1)
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[:, :3] = 0.0
            proj.weight[PLANTED] = 0.0
            proj.weight[PLANTED, 0] = 1.0
            proj.weight[EVERYWHERE] = 0.0
            proj.weight[EVERYWHERE, 1] = 1.0
        mlp.down_proj.weight[2, :] = 0.0
        mlp.down_proj.weight[:, PLANTED] = 0.0
        mlp.down_proj.weight[2, PLANTED] = 0.3
        mlp.down_proj.weight[:, EVERYWHERE] = 0.0
        model.lm_head.weight[:, 2] = -3.0
        model.lm_head.weight[planted_ids, 2] = 3.0
    directory = tmp_path_factory.mktemp("planted_localisers")
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    handle = load_model(directory)
    texts = {t: random_texts(16, seed=20 + k, min_len=6, max_len=24, words=words)
             for k, (t, words) in enumerate(TASK_WORDS.items())}
    stats = {t: collect_stats(handle, docs, ctx=CTX, progress=False) for t, docs in texts.items()}
    return handle, texts, stats


def _first(scores: torch.Tensor) -> int:
    """Index (layer 0) of the top score, ties to the lower index as select_neurons breaks them."""
    flat = scores.flatten()
    return int(torch.nonzero(flat == flat.max())[0])


def test_planted_model_is_as_described(planted):
    _, _, stats = planted
    assert float(stats["planted"].frac_pos[0, PLANTED]) > 0.8                 # BOS positions are not planted words
    assert float(stats["a"].mean_abs[0, PLANTED]) == 0 == float(stats["b"].mean_abs[0, PLANTED])
    for st in stats.values():                                                 # one constant on every token
        assert float(st.frac_pos[0, EVERYWHERE]) == 1.0
        assert float(st.std[0, EVERYWHERE]) < 1e-2 * float(st.mean[0, EVERYWHERE])   # float32 sums' rounding


@pytest.mark.parametrize("name", IMPORTANCES + LOCALISERS)
def test_every_statistics_localiser_ranks_the_planted_neuron_first(planted, name):
    _, _, stats = planted
    scores = task_scores(stats, importance=name)
    assert _first(scores["planted"]) == PLANTED
    for task, s in scores.items():                 # the neuron that fires alike everywhere leads no task
        assert _first(s) != EVERYWHERE, task


def test_lape_matches_a_hand_computation(planted):
    _, _, stats = planted
    scores = lape_scores(stats)
    assert float(scores["planted"][0, PLANTED]) == pytest.approx(1.0)       # fires on one task only: H = 0
    assert float(scores["a"][0, PLANTED]) == 0.0
    assert float(scores["planted"][0, EVERYWHERE]) == pytest.approx(0.0, abs=1e-12)   # H = log 3
    p = [float(stats[t].frac_pos[0, 11]) for t in stats]                      # any other neuron, by hand
    q = [x / sum(p) for x in p]
    h = -sum(x * math.log(x) for x in q if x > 0)
    assert float(scores["b"][0, 11]) == pytest.approx(q[2] * (1 - h / math.log(3)))


def test_lape_of_a_neuron_that_never_fires_is_zero():
    def stats(frac):
        z = torch.zeros(1, 2, dtype=torch.float64)
        return NeuronStats(torch.ones(1), z, z, z, torch.tensor([frac], dtype=torch.float64), z)
    scores = lape_scores({"x": stats([0.0, 0.5]), "y": stats([0.0, 0.0])})
    assert scores["x"].tolist() == [[0.0, 1.0]] and scores["y"].tolist() == [[0.0, 0.0]]


def test_ttest_matches_welch_on_the_tokens(planted):
    """t from the sums against Welch's t from the raw activations of the same tokens (captured)."""
    handle, texts, stats = planted
    acts = {}
    for t, docs in texts.items():
        with handle.capture([0]) as captured:
            for ids, mask in lm_batches(handle.tokenizer, docs, ctx=CTX, batch_size=8):
                handle.lm_logits(ids, mask)
        acts[t] = torch.cat([x.reshape(-1, D_MLP)[m.reshape(-1).bool()] for x, (_, m) in
                             zip(captured[0], lm_batches(handle.tokenizer, docs, ctx=CTX, batch_size=8))]).double()
    scores = ttest_scores(stats)
    for neuron in (3, 11, 20):
        x, y = acts["a"][:, neuron], torch.cat([acts["planted"], acts["b"]])[:, neuron]
        welch = (x.mean() - y.mean()) / (x.var() / len(x) + y.var() / len(y)).sqrt()
        assert float(scores["a"][0, neuron]) == pytest.approx(float(welch), rel=1e-4)
    # one constant on every token: the difference and its SE are both float32 rounding, so t is no evidence either
    # way (|t| well below 1; how far below depends on how tokens were batched) and far from the planted neuron's
    assert abs(float(scores["planted"][0, EVERYWHERE])) < 0.5 < 10 < float(scores["planted"][0, PLANTED])


@pytest.fixture(scope="module")
def planted_blocks(planted):
    """The planted model's statistics kept per document (16 blocks of one document per task)."""
    handle, texts, _ = planted
    return {t: collect_block_stats(handle, docs, 16, ctx=CTX, progress=False) for t, docs in texts.items()}


def test_auroc_ranks_the_planted_neuron_first(planted_blocks):
    scores = task_scores(planted_blocks, importance="auroc")
    assert float(scores["planted"][0, PLANTED]) == 1.0      # > 0 on every planted document, exactly 0 on the rest
    assert float(scores["a"][0, PLANTED]) == pytest.approx(16 / 2 / 32)   # 0 on a and b alike: ties count half
    assert _first(scores["planted"]) == PLANTED
    for task, s in scores.items():                 # the neuron that fires alike everywhere leads no task
        assert _first(s) != EVERYWHERE, task


def test_auroc_is_mann_whitney_on_the_documents_means(planted_blocks):
    """Against scipy's Mann-Whitney U / (n1 n2) on each document's mean activation, computed here from the sums."""
    from scipy.stats import mannwhitneyu
    scores = auroc_scores(planted_blocks)
    means = {t: (b.sums[:, 0, 0] / b.count[:, :1]) for t, b in planted_blocks.items()}    # [16, d_mlp], layer 0
    for neuron in (3, 11, 20):
        x = means["b"][:, neuron].numpy()
        y = torch.cat([means["planted"], means["a"]])[:, neuron].numpy()
        u = mannwhitneyu(x, y).statistic
        assert float(scores["b"][0, neuron]) == pytest.approx(u / (len(x) * len(y)))


def _blocks(values):
    """BlockStats of one layer and one neuron whose blocks' mean activations are `values` (one token each)."""
    n = len(values)
    sums = torch.zeros(n, 5, 1, 1, dtype=torch.float64)
    sums[:, 0, 0, 0] = torch.tensor(values, dtype=torch.float64)
    return BlockStats(torch.ones(n, 1, dtype=torch.float64), sums, torch.ones(n))


def test_auroc_counts_ties_half_by_hand():
    # task x: 1, 2, 2 against the rest 2, 0: pairs won 0 + 1, 0.5 + 1, 0.5 + 1 = 4 of 6
    scores = auroc_scores({"x": _blocks([1.0, 2.0, 2.0]), "y": _blocks([2.0, 0.0])})
    assert float(scores["x"][0, 0]) == pytest.approx(4 / 6)
    assert float(scores["y"][0, 0]) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="BlockStats"):
        auroc_scores({"x": _blocks([1.0]).merged(), "y": _blocks([2.0]).merged()})


def test_auroc_bootstrap_repeats_the_drawn_blocks(planted_blocks):
    """A bootstrap resample of a block localiser ranks the drawn blocks, repeated as often as drawn."""
    pipeline = dict(frac=0.05, mode="global", importance="auroc")
    got = next(bootstrap_masks(planted_blocks, 1, seed=3, **pipeline))
    from modsep_nb.evidence import child_seeds
    drawn = {t: planted_blocks[t].subset(torch.repeat_interleave(torch.arange(16), w[0].long()))
             for t, w in zip(planted_blocks, (bootstrap_weights(16, 1, s) for s in child_seeds(3, 3)))}
    expected = {t: select_neurons(s, 0.05, "global") for t, s in auroc_scores(drawn).items()}
    assert all(torch.equal(got[t], expected[t]) for t in planted_blocks)
    assert pipeline_masks(planted_blocks, **pipeline)["planted"][0, PLANTED]


def test_attribution_ranks_the_planted_neuron_first_and_is_zero_where_it_is_silent(planted):
    handle, texts, _ = planted
    attr = {t: collect_attribution(handle, docs, ctx=CTX, batch_size=8)["attribution"] for t, docs in texts.items()}
    assert float(attr["planted"][0, PLANTED]) > 0                 # zeroing it raises the planted task's loss
    for name in (False, True):
        scores = attribution_scores(attr, contrast=name)
        assert _first(scores["planted"]) == PLANTED
        assert all(_first(s) != EVERYWHERE for s in scores.values())
    assert float(attr["a"][0, PLANTED]) == 0.0 == float(attr["b"][0, PLANTED])        # activation exactly 0
    assert float(attr["a"][0, EVERYWHERE]) == 0.0                                    # writes nothing


def test_attribution_is_the_first_order_change_of_the_loss(planted):
    """-Σ a·dL/da over a neuron's positions is -dL/dα at α = 1 when every neuron is scaled by its own α: checked
    against autograd through such a scaling (every neuron) and, for the planted neuron, a central difference of
    the summed cross-entropy; per target counted."""
    handle, texts, _ = planted
    handle.model.double()
    try:
        docs = texts["planted"][:6]
        got = collect_attribution(handle, docs, ctx=CTX, batch_size=4)

        def loss(alpha):
            total, n = 0.0, 0
            with handle.hooks({0: lambda x: x * alpha}):
                for ids, mask in lm_batches(handle.tokenizer, docs, ctx=CTX, batch_size=4):
                    logits = handle.lm_logits(ids, mask)[:, :-1]
                    keep = (mask[:, 1:] * mask[:, :-1]).bool()
                    total = total + torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
                    n += int(keep.sum())
            return total, n
        alpha = torch.ones(D_MLP, dtype=torch.float64, requires_grad=True)
        total, n = loss(alpha)
        assert got["units"] == n
        grad, = torch.autograd.grad(total, alpha)
        torch.testing.assert_close(got["attribution"][0], -grad / n, rtol=1e-6, atol=1e-12)
        h = 1e-3        # LlamaRMSNorm computes in float32: a smaller step only measures its rounding
        with torch.no_grad():
            up, down = (float(loss(1 + torch.eye(D_MLP, dtype=torch.float64)[PLANTED] * s)[0]) for s in (h, -h))
        assert float(got["attribution"][0, PLANTED]) == pytest.approx(-(up - down) / (2 * h) / n, rel=1e-3)
    finally:
        handle.model.float()


def test_attribution_of_images_needs_labels(tiny_vit):
    with pytest.raises(ValueError, match="label"):
        collect_attribution(tiny_vit, torch.zeros(2, *tiny_vit.image_shape))


def test_localiser_names_are_refused_as_a_single_tasks_importance(planted):
    _, _, stats = planted
    with pytest.raises(ValueError, match="task_scores"):
        importance(stats["a"], "lape")
    with pytest.raises(ValueError, match="at least two tasks"):
        task_scores({"a": stats["a"]}, importance="ttest")


@pytest.mark.parametrize("section, message", [
    ({"methods": ["abs", "saliency"]}, "localisers.methods"), ({"methods": ["abs", "abs"]}, "localisers.methods"),
    ({"methods": []}, "localisers.methods"), ({"lm_tasks": 1}, "localisers.lm_tasks"),
    ({"random_seeds": []}, "localisers.random_seeds"), ({"attribution_tokens": 0}, "localisers.attribution_tokens"),
    ({"attribution_images": True}, "localisers.attribution_images"), ({"eval_images": -5}, "localisers.eval_images"),
    ({"eval_tokens": 1.5}, "localisers.eval_tokens"), ({"n_boot": 0}, "localisers.n_boot"),
    ({"methods": ["abs", "auroc", "kurtosis"]}, "localisers.methods"),
    ({"lm_methods": ["abs", "saliency"]}, "localisers.lm_methods"), ({"lm_methods": []}, "localisers.lm_methods"),
    ({"lm_methods": ["lape", "lape"]}, "localisers.lm_methods"), ({"lm_methods": "abs"}, "localisers.lm_methods")])
def test_localiser_params_are_checked(section, message):
    from modsep_nb.params import ParamsError, load_params
    smoke = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
    with pytest.raises(ParamsError, match=message):
        load_params(smoke, {"localisers": section})
    assert load_params(smoke, {"pruning": {"importance": "lape"}})["pruning"]["importance"] == "lape"
    assert load_params(smoke, {"localisers": {"methods": ["auroc", "attribution"], "eval_images": None}})
    assert load_params(smoke, {"localisers": {"lm_methods": None}})["localisers"]["lm_methods"] is None


def test_localiser_budgets_are_cut_never_raised():
    """07's own budgets: the first lm_tasks domains, and eval_tokens / eval_images only where below the section's."""
    from modsep_nb.localisers import localiser_params
    from modsep_nb.params import load_params
    smoke = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
    p = load_params(smoke, {"localisers": {"eval_images": 100, "eval_tokens": 10_000}})
    vit, lm = localiser_params(p, "vit"), localiser_params(p, "lm")
    assert vit["vit"]["eval_images"] == 100 and lm["lm"]["eval_tokens"] == p["lm"]["eval_tokens"] == 128
    assert lm["lm"]["tasks"] == p["lm"]["tasks"][:2] and vit["lm"]["tasks"] == p["lm"]["tasks"]
    assert p["vit"]["eval_images"] == 300                       # the params themselves are not changed


def test_the_lm_runs_its_own_localisers_and_the_vit_all_of_them():
    """localisers.lm_methods: the LM's list (the default leaves out ttest and attribution); null: every method, as
    the ViT always has."""
    from modsep_nb.localisers import localiser_params
    from modsep_nb.params import load_params
    smoke = Path(__file__).resolve().parent.parent / "params" / "smoke.yaml"
    p = load_params(smoke)
    assert localiser_params(p, "lm")["localisers"]["methods"] == ["abs", "lape", "auroc", "attribution_contrast"]
    assert localiser_params(p, "vit")["localisers"]["methods"] == p["localisers"]["methods"] == \
        ["abs", "lape", "ttest", "auroc", "attribution", "attribution_contrast"]
    every = load_params(smoke, {"localisers": {"lm_methods": None}})
    assert localiser_params(every, "lm")["localisers"]["methods"] == every["localisers"]["methods"]


def test_localiser_agreement_against_hand_counts_and_a_bootstrap_over_tasks():
    """Two localisers on two tasks of two layers x 4 neurons, every number by hand. Task s: A = {0, 1} and
    B = {0, 2} in layer 0: overlap 1/2, layer-matched chance 2*2/4 / 2 = 1/2, excess 0. Task u: A = {0} in layer 0,
    B = {4} in layer 1: nothing shared, chance 0 (no layer in common), excess 0; task v: A = B = {5, 6}:
    overlap 1, chance 2*2/4 / 2 = 1/2, excess 1/2. Resampling three tasks, the mean excess takes the values k/6
    (k of the three draws are v), so the 95% interval of 4000 resamples is [0, 1/2] exactly (P(k = 0) = P(k = 3)
    = 8/27 > 2.5%)."""
    from modsep_nb.localisers import localiser_agreement

    def mask(*neurons):
        m = torch.zeros(2, 4, dtype=torch.bool)
        for n in neurons:
            m[n // 4, n % 4] = True
        return m
    masks = {"A": {"s": mask(0, 1), "u": mask(0), "v": mask(5, 6)},
             "B": {"s": mask(0, 2), "u": mask(4), "v": mask(5, 6)}}
    got = localiser_agreement(masks, 4000, seed=0)
    assert got["per_task_overlap"][0, 1].tolist() == [0.5, 0.0, 1.0]
    assert got["per_task_chance"][1, 0].tolist() == [0.5, 0.0, 0.5]
    assert got["overlap"][0, 1] == pytest.approx(0.5) and got["chance"][0, 1] == pytest.approx(1 / 3)
    assert got["excess_ci"][0, 1].tolist() == [0.0, 0.5]
    assert sorted(set(np.round(got["boot"][0, 1] * 6, 9))) == [0, 1, 2, 3]         # only the values k/6
    assert got["overlap"][0, 0] == 1.0


@pytest.mark.filterwarnings("ignore:task .* rests on 4 blocks", "ignore:the null domain has 4 blocks")
def test_attribution_blocks_are_the_attribution_of_their_documents(planted):
    """Kept per block (4 blocks of 4 documents), the attribution of one block is that of its documents alone, the
    blocks merged give the whole attribution, and they go through the overlap evidence's bootstrap and pseudo-task
    null as statistics blocks do."""
    from modsep_nb.evidence import overlap_evidence
    handle, texts, _ = planted
    runs = {t: collect_attribution(handle, docs, ctx=CTX, batch_size=8, n_blocks=4) for t, docs in texts.items()}
    blocks = runs["planted"]["blocks"]
    assert blocks.n_blocks == 4 and float(blocks.units.sum()) == runs["planted"]["units"]
    torch.testing.assert_close(blocks.merged(), runs["planted"]["attribution"], rtol=1e-5, atol=1e-9)
    alone = collect_attribution(handle, texts["planted"][4:8], ctx=CTX, batch_size=8)["attribution"]
    torch.testing.assert_close(blocks.subset([1]).merged(), alone, rtol=1e-4, atol=1e-7)
    ev = overlap_evidence({t: r["blocks"] for t, r in runs.items()}, runs["a"]["blocks"], frac=0.05, n_boot=5,
                          n_null=5, seed=0, importance="attribution_contrast")
    assert bool(ev["masks"]["planted"][0, PLANTED]) and ev["null"]["median"].shape == (5,)


def test_weighted_auroc_is_mann_whitney_on_the_blocks_repeated():
    """RankedBlocks scores a weighting of its blocks (each taken 0, 1, 2... times, as a bootstrap or a pseudo-task
    does) without sorting again: against scipy's Mann-Whitney U / (n1 n2) on the blocks' means repeated as often as
    weighted. Rows with distinct values, a neuron that never fires (all equal), rows of a few repeated values; an
    empty block weighs nothing; pseudo-tasks from one pool; two pools (a bootstrap of two tasks)."""
    from scipy.stats import mannwhitneyu
    from modsep_nb.pruning import RankedBlocks
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(14, 2, 12, generator=gen, dtype=torch.float64)              # [B, L, d]
    values[:, 0, 5] = 0.0
    values[:, 1, :6] = torch.randint(0, 3, (14, 6), generator=gen).double()
    pool = _token_blocks(values)
    pool.count[3] = 0                                          # a block that read nothing
    pool.sums[3] = 0
    weights = torch.randint(0, 3, (3, 14), generator=gen).double()          # three pseudo-tasks of one pool
    weights[:, 0] = 1
    ranked = RankedBlocks([pool])
    got = auroc_scores({f"p{k}": ranked.weighted(0, w) for k, w in enumerate(weights)})
    read = [b for b in range(14) if b != 3]
    for k in range(3):
        mine = np.repeat(read, weights[k, read].long().numpy())
        rest = np.concatenate([np.repeat(read, weights[j, read].long().numpy()) for j in range(3) if j != k])
        for layer, neuron in [(0, 5), (0, 7), (1, 0), (1, 3), (1, 9)]:
            x, y = values[mine, layer, neuron].numpy(), values[rest, layer, neuron].numpy()
            expected = mannwhitneyu(x, y).statistic / (len(x) * len(y))
            assert float(got[f"p{k}"][layer, neuron]) == pytest.approx(expected, abs=1e-12), (k, layer, neuron)
    # two pools (two tasks' own blocks): the same as their BlockStats repeated
    other = _token_blocks(values[:9] + 0.5)
    both = RankedBlocks([pool, other])
    w0, w1 = torch.randint(0, 3, (14,), generator=gen).double(), torch.randint(0, 3, (9,), generator=gen).double()
    w0[0] = w1[0] = 1
    got = auroc_scores({"a": both.weighted(0, w0), "b": both.weighted(1, w1)})
    repeated = auroc_scores({"a": pool.subset(torch.repeat_interleave(torch.arange(14), w0.long())),
                             "b": other.subset(torch.repeat_interleave(torch.arange(9), w1.long()))})
    for t in ("a", "b"):
        torch.testing.assert_close(got[t], repeated[t], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="weights must be 9"):
        both.weighted(1, torch.ones(14))


def _token_blocks(values: torch.Tensor) -> BlockStats:
    """BlockStats whose block b holds one token per neuron with value values[b] ([B, L, d]): sums of x, |x|, x²,
    1(x>0), sqrt|x| in MEANS' order."""
    x = values.double()
    sums = torch.stack([x, x.abs(), x ** 2, (x > 0).double(), x.abs().sqrt()], 1)
    return BlockStats(torch.ones(x.shape[0], x.shape[1], dtype=torch.float64), sums, torch.ones(x.shape[0]))


def test_a_null_extended_from_its_first_values_is_the_null_drawn_at_once():
    from modsep_nb.evidence import pseudo_task_null
    gen = torch.Generator().manual_seed(1)
    domain = _token_blocks(torch.rand(48, 2, 40, generator=gen))
    pipeline = dict(frac=0.05, mode="global", importance="abs", eps=1e-3, retain="rest")
    whole = pseudo_task_null(domain, [6, 6, 6], 30, 5, **pipeline)
    rest = pseudo_task_null([domain], [[6, 6, 6]], 30, 5, start=12, **pipeline)
    np.testing.assert_array_equal(rest["pairs"], whole["pairs"][12:])
    np.testing.assert_array_equal(rest["layer_matched"], whole["layer_matched"][12:])
    with pytest.raises(ValueError, match="cannot be extended"):
        pseudo_task_null([domain, domain], [[6, 6, 6]] * 2, 30, 5, start=12, **pipeline)
    with pytest.raises(ValueError, match="below n_null"):
        pseudo_task_null(domain, [6, 6, 6], 30, 5, start=30, **pipeline)


def _two_stage_trial(n_null: int):
    from modsep_nb.localisers import Localisers
    trial = Localisers.__new__(Localisers)       # _overlap reads only the params
    trial.params = {"seed": 3, "evidence": {"n_boot": 20, "n_null": 20}, "localisers": {"n_null": n_null}}
    return trial


@pytest.mark.parametrize("same_sets", [False, True])
def test_overlap_null_stops_after_its_first_stage_only_when_the_claim_cannot_pass(same_sets):
    """Localisers._overlap against overlap_evidence run directly. Tasks of one constant activation select the same
    (first) neurons (overlap 1, far above pseudo-tasks of a noisy domain): the whole null is drawn and the result is
    overlap_evidence's with n_null. Tasks each high on their own neurons select disjoint sets (overlap 0, below the
    null): the first 50 values already reach it, so only they are drawn, p is theirs ((1 + 50) / 51 = 1), and the
    floor the claim reports stays that of the whole null."""
    from modsep_nb.evidence import overlap_evidence
    from modsep_nb.localisers import NULL_FIRST
    gen = torch.Generator().manual_seed(0)
    if same_sets:
        tasks = {t: _token_blocks(torch.ones(8, 2, 50)) for t in "abcd"}
    else:
        tasks = {}
        for k, t in enumerate("abcd"):
            v = torch.rand(8, 2, 50, generator=gen)
            v[:, :, 10 * k:10 * k + 2] += 5.0          # task k's own neurons
            tasks[t] = _token_blocks(v)
    domain = _token_blocks(torch.rand(64, 2, 50, generator=gen))
    pipeline = dict(frac=0.02, mode="global", importance="abs", eps=1e-3, eps_relative=None, retain="rest")
    got = _two_stage_trial(200)._overlap((tasks, domain), pipeline)
    full = overlap_evidence(tasks, domain, n_boot=20, n_null=200, seed=3, **pipeline)
    assert got["claim"].p_floor == pytest.approx(1 / 201)
    if same_sets:
        assert got["median"] == 1.0 and got["null"]["median"].size == 200
        assert got["claim"].p == full["claim"].p == pytest.approx(1 / 201)
        for key in ("median", "pairs", "layer_matched", "domain"):      # the rest drawn after the first 50 kept
            np.testing.assert_array_equal(got["null"][key], full["null"][key])
        assert got["claim"].ci == full["claim"].ci and got["median_ci"] == full["median_ci"]
    else:
        first = overlap_evidence(tasks, domain, n_boot=20, n_null=NULL_FIRST, seed=3, **pipeline)
        assert got["median"] == 0.0 and got["null"]["median"].size == NULL_FIRST
        assert got["claim"].p == first["claim"].p == 1.0 and not got["claim"].supported
        np.testing.assert_array_equal(got["null"]["median"], full["null"]["median"][:NULL_FIRST])
        assert "stopped after 50" in got["claim"].floor_n


def test_every_localisers_matrix_shares_one_unpruned_pass(tmp_path, llama_dir, capsys):
    """The unpruned model is evaluated once (one pass per task), not once per localiser: every matrix holds the same
    per-document base hits, and the passes are T + the localisers' own (T² pruned, T per distinct random set)."""
    from modsep_nb.localisers import Localisers, localiser_params
    from modsep_nb.params import load_params
    from modsep_nb.study import Study
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law"], "stats_tokens": 40,
                                       "eval_tokens": 24, "ctx": 16, "batch_size": 4},
                                "localisers": {"lm_methods": ["abs", "lape"]}})
    study = Study.from_params(localiser_params(params, "lm"), "lm")
    calls = []
    hits = study.tasks.document_hits

    def counted(handle, names=None, **kw):
        calls.append(tuple(names or study.task_names))
        return hits(handle, names, **kw)
    study.tasks.document_hits = counted
    trial = Localisers(study, report=None)
    trial.scores()
    fixed = trial.cross_task()
    capsys.readouterr()
    tasks, seeds = study.task_names, params["localisers"]["random_seeds"]
    # per localiser: every pruned row on every task, and each distinct random set (count per layer, seed) once
    distinct = [len({tuple(m.sum(1).tolist()) for m in study.masks(trial.frac, scores=trial.all_scores[name]).values()})
                for name in ("abs", "lape")]
    assert len(calls) == len(tasks) + sum(len(tasks) ** 2 + d * len(seeds) * len(tasks) for d in distinct)
    first, second = (fixed[m].documents["base"] for m in ("abs", "lape"))
    for t in tasks:
        np.testing.assert_array_equal(first[t]["top1"], second[t]["top1"])
    assert fixed["abs"].base == fixed["lape"].base


def test_lm_tasks_skip_domains_too_small_for_a_claim():
    """localisers.lm_tasks keeps the first domains (lm.tasks' order) with at least MIN_N statistics and MIN_N
    evaluation documents, counted here from the domains' own document lists: the licences (10 and 4) would leave
    the LM's claims resting on a handful of documents. Only when too few domains have enough are small ones taken."""
    from modsep_nb import data
    from modsep_nb.claims import MIN_N
    from modsep_nb.localisers import localiser_params
    from modsep_nb.params import load_params
    p = load_params(None, {"lm": {"tasks": ["licenses", "computers", "docs", "science"]}, "localisers": {"lm_tasks": 2}})
    split = data.text_tasks(p["lm"]["tasks"], seed=p["seed"])
    small = [t for t, d in split.items() if min(len(d.collect), len(d.evaluate)) < MIN_N]
    assert small == ["licenses"]
    assert localiser_params(p, "lm")["lm"]["tasks"] == ["computers", "docs"]
    assert localiser_params(p, "vit")["lm"]["tasks"] == p["lm"]["tasks"]        # only the LM's trial is cut
    four = load_params(None, {"lm": {"tasks": ["licenses", "computers", "docs", "science"]}, "localisers": {"lm_tasks": 4}})
    assert localiser_params(four, "lm")["lm"]["tasks"] == four["lm"]["tasks"]    # too few with enough: all, in order
    assert localiser_params(load_params(), "lm")["lm"]["tasks"] == ["code", "docs", "computers"]
