"""Neurons you can look at (neurons.py): the running top-k equals sorting every activation captured by hand
(text and images), contexts stop at window and document edges and never show padding, histograms count every
position, the running state stays k per neuron whatever the data length, HTML is escaped, and the static
pages' links resolve."""
from __future__ import annotations

import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from browser import assert_links_resolve
from conftest import VOCAB, encode, random_texts
from modsep_nb import collect_stats, load_model
from modsep_nb import neurons as N
from modsep_nb.neuron_collection import _TaskTopK
from modsep_nb.neuron_pages import _shown
from modsep_nb.files import file_name
from modsep_nb.index_page import write_index
from modsep_nb.params import load_params
from modsep_nb.study import Study

ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}
NEURONS = [(1, 3), (0, 5), (1, 0), (0, 23)]


def windows_with_documents(texts, ctx):
    """(document, window ids) in the order the statistics read them: round r takes tokens [r*ctx, (r+1)*ctx)
    of every document in turn (a one-token piece after a document's start dropped). Independent of data.py."""
    encoded = [encode(t) for t in texts]
    out = []
    for r in range(max(math.ceil(len(e) / ctx) for e in encoded)):
        for d, ids in enumerate(encoded):
            piece = ids[r * ctx:(r + 1) * ctx]
            if len(piece) >= 2 or (r == 0 and piece):
                out.append((d, piece))
    return out


def brute_force(handle, items, neurons, rank="abs", counted=None):
    """Every activation of every (layer, neuron), one item per forward (no padding); items are LM windows
    (ids lists) or images [C, H, W]. Returns per neuron every candidate (score, item, position, value,
    activations of the whole item) sorted by (-score, item, position), an image only at its best token, and
    all counted values."""
    acts = []
    with torch.no_grad():
        for item in items:
            with handle.capture() as cap:
                if handle.kind == "lm":
                    handle.model(input_ids=torch.tensor([item]))
                else:
                    handle.image_logits(item[None])
            acts.append({l: cap[l][0][0].double() for l, _ in neurons})
    ranked, values = [], []
    for l, u in neurons:
        rows = []
        for i, a in enumerate(acts):
            for p, v in enumerate(a[l][:, u].tolist()):
                if counted is None or counted(p):
                    rows.append((-(abs(v) if rank == "abs" else v), i, p, v))
        rows.sort()
        values.append(np.array([r[3] for r in rows]))
        if handle.kind == "image":           # each image once, at its best token
            seen = set()
            rows = [r for r in rows if not (r[1] in seen or seen.add(r[1]))]
        ranked.append([(-s, i, p, v, acts[i][l][:, u]) for s, i, p, v in rows])
    return ranked, values


def expected_histogram(values, edges):
    """Positions below edges[0], per bin [edges[i], edges[i+1]), at or above edges[-1] (numpy)."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


# The collector batches with padding, the brute force runs one item per forward: on some CPUs (AVX512-BF16)
# the two differ in the last bits, so activations that tie in one need not tie in the other. What must hold
# is what the arithmetic cannot move: the top-k scores (to a tolerance), and each kept entry a real, distinct
# candidate with that score; among candidates whose scores agree to the tolerance any order is right.
RTOL, ATOL = 1e-5, 1e-6


def close(a, b) -> bool:
    return abs(a - b) <= ATOL + RTOL * abs(b)


def assert_top_k_matches(kept, ranked, k, matches):
    """kept: the collector's [(score, value, entry)] best first; ranked: the brute force's candidates (score,
    item, position, value, activations) best first; matches(entry, candidate) says whether the kept entry
    shows that candidate (its document, position and context)."""
    want = [c[0] for c in ranked[:k]]
    np.testing.assert_allclose([s for s, _, _ in kept], want, rtol=RTOL, atol=ATOL)
    used = set()
    for score, value, entry in kept:
        found = [n for n, c in enumerate(ranked) if n not in used and close(score, c[0]) and close(value, c[3])
                 and matches(entry, c)]
        assert found, f"kept entry {entry} (score {score}) is no candidate of the brute force"
        used.add(found[0])


def assert_histogram_matches(hist, values, edges):
    """The same counts as numpy's, except for values within the tolerance of a bin edge, which may fall on
    either side of it."""
    expected = expected_histogram(values, edges)
    assert hist.sum() == expected.sum()
    near = sum(bool(np.any(np.abs(edges - v) <= ATOL + RTOL * np.abs(edges))) for v in values)
    assert np.abs(hist - expected).sum() <= 2 * near


@pytest.fixture
def text_tasks():
    return {"a": random_texts(9, seed=0, max_len=20), "b": random_texts(6, seed=1, max_len=20)}


def _edges(handle, data, neurons, bins=12, **options):
    stats = {t: collect_stats(handle, d, progress=False, **options) for t, d in data.items()}
    return N.histogram_edges(stats, neurons, bins), stats


@pytest.mark.parametrize("rank", ["abs", "value"])
def test_text_top_k_and_histograms_equal_a_brute_force_over_every_activation(tiny_llama, text_tasks, rank):
    ctx, k, w = 8, 5, 2
    edges, stats = _edges(tiny_llama, text_tasks, NEURONS, ctx=ctx)
    ex = N.collect_examples(tiny_llama, text_tasks, NEURONS, edges=edges, k=k, window=w, rank=rank, ctx=ctx,
                            batch_size=3, progress=False)
    score = (lambda v: abs(v)) if rank == "abs" else (lambda v: v)
    for task, texts in text_tasks.items():
        windows = windows_with_documents(texts, ctx)
        ranked, values = brute_force(tiny_llama, [ids for _, ids in windows], NEURONS, rank)
        for i in range(len(NEURONS)):
            def matches(j, candidate):
                _, item, p, _, acts = candidate
                ids = windows[item][1]
                cols = range(p - w, p + w + 1)
                want = [float(acts[c]) if 0 <= c < len(ids) else math.nan for c in cols]
                return (int(ex.document[task][i, j]) == windows[item][0] and int(ex.position[task][i, j]) == p
                        and ex.tokens[task][i][j] == [ID_TO_TOKEN[ids[c]] if 0 <= c < len(ids) else None
                                                      for c in cols]
                        and np.allclose(ex.context[task][i, j].numpy(), want, rtol=RTOL, atol=ATOL,
                                        equal_nan=True))
            kept = [(score(v), v, j) for j, v in enumerate(ex.value[task][i].tolist())]
            assert_top_k_matches(kept, ranked[i], k, matches)
            hist = ex.hist[task][i].numpy()
            assert hist.sum() == len(values[i]) == int(stats[task].count[0])       # every real token, once
            assert_histogram_matches(hist, values[i], edges[i].numpy())


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_image_top_k_grids_and_kept_images_equal_a_brute_force(family, vit_dir, timm_dir):
    handle = load_model(vit_dir if family == "hf" else timm_dir)
    gen = torch.Generator().manual_seed(0)
    shape = handle.image_shape
    data = {"x": torch.randn(11, *shape, generator=gen), "y": torch.randn(6, *shape, generator=gen)}
    k = 4
    for cls_only in (False, True):
        edges, stats = _edges(handle, data, NEURONS, cls_only=cls_only)
        ex = N.collect_examples(handle, data, NEURONS, edges=edges, k=k, cls_only=cls_only, batch_size=4,
                                progress=False)
        assert ex.grid_shape == (1, 4, 4)                       # CLS, then 4 x 4 patches (16/4 or 32/8 pixels)
        for task, images in data.items():
            ranked, values = brute_force(handle, list(images), NEURONS,
                                         counted=(lambda p: p == 0) if cls_only else None)
            for i in range(len(NEURONS)):
                def matches(j, candidate):
                    _, item, p, _, acts = candidate
                    return (int(ex.document[task][i, j]) == item and int(ex.position[task][i, j]) == p
                            and np.allclose(ex.grid[task][i, j].numpy(), acts.numpy(), rtol=RTOL, atol=ATOL)
                            and torch.equal(ex.images[task][item], images[item]))
                kept = [(abs(v), v, j) for j, v in enumerate(ex.value[task][i].tolist())]
                assert_top_k_matches(kept, ranked[i], k, matches)
                assert len(set(ex.document[task][i].tolist())) == k         # k different images
                hist = ex.hist[task][i].numpy()
                assert hist.sum() == len(values[i]) == int(stats[task].count[0])
                assert_histogram_matches(hist, values[i], edges[i].numpy())
            kept = set(ex.document[task][ex.document[task] >= 0].tolist())
            assert set(ex.images[task]) == kept                  # only the images shown are copied


def test_contexts_stop_at_document_edges_and_never_show_padding(tiny_llama):
    texts = ["w01 w02", "w03 w04 w05 w06 w07 w08 w09 w10 w11 w12 w13 w14", "w15"]
    lengths = [len(encode(t)) for t in texts]                  # 3, 13, 2: one window each at ctx 16
    w = 3
    edges, _ = _edges(tiny_llama, {"t": texts}, NEURONS, ctx=16)
    ex = N.collect_examples(tiny_llama, {"t": texts}, NEURONS, edges=edges, k=sum(lengths), window=w, ctx=16,
                            batch_size=3, progress=False)
    for i in range(len(NEURONS)):
        seen = set()
        for j in range(sum(lengths)):                          # every position is kept, so every edge is seen
            d, p = int(ex.document["t"][i, j]), int(ex.position["t"][i, j])
            ids = encode(texts[d])
            want = [ID_TO_TOKEN[ids[c]] if 0 <= c < len(ids) else None for c in range(p - w, p + w + 1)]
            assert ex.tokens["t"][i][j] == want
            assert np.isnan(ex.context["t"][i, j].numpy()[[c is None for c in want]]).all()
            seen.add((d, p))
        assert seen == {(d, p) for d, n in enumerate(lengths) for p in range(n)}
        assert "[PAD]" not in str(ex.tokens["t"][i])


def test_ties_go_to_the_earlier_position_and_the_same_input_gives_the_same_result(tiny_llama):
    texts = ["w05 w06 w07", "w05 w06 w07", "w08 w09"]       # 0 and 1 tie at every position, all three at BOS
    edges, _ = _edges(tiny_llama, {"t": texts}, NEURONS, ctx=16)
    run = lambda: N.collect_examples(tiny_llama, {"t": texts}, NEURONS, edges=edges, k=6, window=1,  # noqa: E731
                                     ctx=16, batch_size=1, progress=False)
    ex, again = run(), run()
    ties = 0
    for i in range(len(NEURONS)):
        values, docs, positions = ex.value["t"][i].tolist(), ex.document["t"][i].tolist(), ex.position["t"][i].tolist()
        for j in range(len(values) - 1):
            if values[j] == values[j + 1]:
                ties += 1
                assert (docs[j], positions[j]) < (docs[j + 1], positions[j + 1])
    assert ties >= len(NEURONS)                               # the tie-break was exercised
    for name in ("value", "document", "position", "hist", "context"):
        for task in ex.tasks:
            assert torch.equal(torch.nan_to_num(getattr(ex, name)[task]), torch.nan_to_num(getattr(again, name)[task]))
    assert ex.tokens == again.tokens


def test_running_state_is_k_per_neuron_whatever_the_data_length(tiny_llama, monkeypatch):
    sizes = []
    real = _TaskTopK.merge

    def spy(self, fields):
        real(self, fields)
        sizes.append(tuple(tuple(getattr(self, name).shape) for name in ("value", "signed", "document", "position",
                                                                          "ids", "context", "hist")))
    monkeypatch.setattr(_TaskTopK, "merge", spy)
    k, w = 3, 2
    for n_docs in (4, 40):
        texts = random_texts(n_docs, seed=n_docs, min_len=5)
        edges, _ = _edges(tiny_llama, {"t": texts}, NEURONS, ctx=8)
        ex = N.collect_examples(tiny_llama, {"t": texts}, NEURONS, edges=edges, k=k, window=w, ctx=8, batch_size=2,
                                progress=False)
        assert ex.value["t"].shape == (len(NEURONS), k) and len(ex.tokens["t"][0]) == k
    n = len(NEURONS)
    assert len(sizes) > 40 and set(sizes) == {((k, n), (k, n), (k, n), (k, n), (k, n, 2 * w + 1),
                                               (k, n, 2 * w + 1), (n, 14))}


def test_pick_neurons_takes_the_top_scored_selected_neurons_per_task():
    gen = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(3, 10, generator=gen), "b": torch.rand(3, 10, generator=gen)}
    scores["b"][2, 7] = scores["b"][0, 4] = 5.0                  # a tie: the lower (layer, neuron) first
    masks = {t: s > 0.5 for t, s in scores.items()}
    picked = N.pick_neurons(scores, masks, n=3)
    for t, s in scores.items():
        by_hand = sorted(((-float(s[l, u]), l, u) for l in range(3) for u in range(10) if masks[t][l, u]))[:3]
        assert picked[t] == [(l, u) for _, l, u in by_hand]
    assert picked["b"][:2] == [(0, 4), (2, 7)]
    with pytest.raises(ValueError, match="n .neurons per task"):
        N.pick_neurons(scores, masks, n=0)
    with pytest.raises(ValueError, match="without scores"):
        N.pick_neurons({"a": scores["a"]}, masks)


def test_bad_input_is_named(tiny_llama, text_tasks):
    edges, _ = _edges(tiny_llama, text_tasks, NEURONS, ctx=8)
    call = lambda **kw: N.collect_examples(tiny_llama, text_tasks, **{"neurons": NEURONS, "edges": edges,  # noqa
                                                                       "progress": False, **kw})
    with pytest.raises(ValueError, match="k must be"):
        call(k=0)
    with pytest.raises(ValueError, match="rank must be"):
        call(rank="max")
    with pytest.raises(IndexError, match="layer 5, neuron 0"):
        call(neurons=[(5, 0)], edges=edges[:1])
    with pytest.raises(ValueError, match="edges must be"):
        call(edges=edges[:2])
    with pytest.raises(ValueError, match="at least one"):
        call(neurons=[])


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.titles = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.titles += [v for k, v in attrs if k == "title"]

    def handle_data(self, data):
        self.text.append(data)


def test_html_escapes_tokens_and_task_names():
    row = {"task": "<i>t</i>", "document": 3, "value": 2.0, "tokens": [None, "<script>", "a&b", '"q"', "\n"],
           "context": np.array([math.nan, 0.5, -2.0, 2.0, 0.0])}
    page = N.context_html(row, scale=2.0, window=2)
    parsed = _Text()
    parsed.feed(page)
    assert set(parsed.tags) == {"div", "span"}                 # no tag from a token or a task name
    assert "".join(parsed.text) == "<i>t</i> · doc 3 · +2.000" + "<script>a&b\"q\"↵"
    assert parsed.titles == ["+0.500", "-2.000", "+2.000", "+0.000"]
    assert "rgba(31,119,180,1.000)" in page and "rgba(214,39,40,0.250)" in page   # blue negative, red positive


def test_static_export_writes_pages_whose_links_resolve(tmp_path, tiny_llama, text_tasks, vit_dir):
    edges, _ = _edges(tiny_llama, text_tasks, NEURONS, ctx=8)
    picked = {"a": NEURONS[:2], "b&<c>": NEURONS[1:]}         # a shared neuron; a name that needs escaping
    data = {"a": text_tasks["a"], "b&<c>": text_tasks["b"]}
    ex = N.collect_examples(tiny_llama, data, NEURONS, picked=picked, edges=edges, k=3, ctx=8, progress=False)
    handle = load_model(vit_dir)
    images = {"x": torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
              "y": torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(2))}
    image_edges, _ = _edges(handle, images, NEURONS)
    image_ex = N.collect_examples(handle, images, NEURONS, picked={"x": NEURONS[:1], "y": NEURONS[2:]},
                                  edges=image_edges, k=3, progress=False)
    pages = N.export(ex, tmp_path, "lm") + N.export(image_ex, tmp_path, "vit")
    assert sorted(p.name for p in pages) == ["lm-a.html", f"lm-{file_name('b&<c>')}.html", "vit-x.html", "vit-y.html"]
    for page in pages:
        links = assert_links_resolve(page)
        assert links.images, page
        for src in links.images:
            with Image.open(page.parent / src) as im:
                assert im.size[0] > 100
    text = (tmp_path / "neurons" / f"lm-{file_name('b&<c>')}.html").read_text()
    assert "Neurons of b&amp;&lt;c&gt;" in text and "<c>" not in text
    assert text.count("<section") == 3 and 'class="tok hit"' in text
    index = write_index(tmp_path)
    links = assert_links_resolve(index)
    assert {"neurons/lm-a.html", "neurons/vit-y.html"} <= set(links.links)


def test_study_shows_each_tasks_top_selected_neurons(tmp_path, llama_dir):
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law"], "stats_tokens": 40,
                                       "eval_tokens": 24, "ctx": 16, "batch_size": 4}})
    study = Study.from_params(params, "lm")
    scores = study.scores()
    masks = study.masks(0.1, scores=scores)
    ex = study.neuron_examples(masks, scores=scores, n=2, k=3, window=2, bins=10, progress=False, ablate=1,
                               ablation_budget=16)
    assert ex.picked == N.pick_neurons(scores, masks, 2)
    assert ex.tasks == ["docs", "law"] and len(ex.neurons) == len({n for ns in ex.picked.values() for n in ns})
    for task in ex.tasks:                                     # the statistics data: as many tokens as statistics
        # (the statistics' count is the sum of its position weights: the counted tokens to float32 rounding)
        assert (ex.hist[task].sum(1) == round(float(study.stats()[task].count[0]))).all()
    # documents named as tasks.json names them (the embedded domains: file names, pydoc topics, fortune ids)
    record = study.record()
    for task in ex.tasks:
        for row in ex.examples(ex.neurons[0], [task]):
            assert row["name"] == study.tasks[task].collect_ids[row["document"]]
            assert row["name"] in record[task]["statistics"]
    assert set(ex.direct) == set(ex.neurons)                  # Llama: a direct path for every neuron
    assert set(ex.ablation) == {ns[0] for ns in ex.picked.values()}     # only each task's top one is ablated
    for effects in ex.ablation.values():
        assert set(effects) == {"docs", "law"} and all(e["ci"][0] <= e["ci"][1] for e in effects.values())
    # a smaller budget reads the first tokens only: as many as the statistics of that budget count
    few = study.neuron_examples(masks, scores=scores, n=2, k=3, window=2, bins=10, progress=False, budget=20)
    for task in few.tasks:
        counted = round(float(study.stats(budget=20, progress=False)[task].count[0]))
        assert (few.hist[task].sum(1) == counted).all() and counted < ex.hist[task].sum(1)[0]


def test_explorer_is_skipped_headless_and_follows_its_controls(tiny_llama, text_tasks, monkeypatch):
    edges, _ = _edges(tiny_llama, text_tasks, NEURONS, ctx=8)
    ex = N.collect_examples(tiny_llama, text_tasks, NEURONS, picked={"a": [(1, 3), (0, 5), (1, 0)], "b": [(0, 23)]},
                            edges=edges, k=2, ctx=8, progress=False)
    monkeypatch.setenv("MODSEP_HEADLESS", "1")
    assert N.explorer(ex) is None
    monkeypatch.delenv("MODSEP_HEADLESS")
    box = N.explorer(ex)
    task, layer, neuron = box.children[0].children
    assert list(layer.options) == [0, 1] and list(neuron.options) == [5]
    layer.value = 1
    assert list(neuron.options) == [3, 0]
    task.value = "b"
    assert list(layer.options) == [0] and list(neuron.options) == [23]


# -- what a neuron does: direct effects and ablation effects ------------------------------------------------
def _tiny_lm(class_name: str, **config):
    """A tiny perturbed model of `class_name` built here (tie_word_embeddings etc. set by `config`)."""
    import transformers
    from conftest import _hf_lm_configs, make_tokenizer, perturb_
    cfg = _hf_lm_configs()[class_name]()
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return load_model(perturb_(getattr(transformers, class_name)(cfg), 1), tokenizer=make_tokenizer())


def _hand_logits(handle, layer, unit) -> torch.Tensor:
    """What one unit of the neuron adds to the logits through the final norm's elementwise weight and the
    head, from the model's own state dict (named by hand per family, not through models.READOUTS)."""
    sd = {k: v.double() for k, v in handle.model.state_dict().items()}
    name = type(handle.model).__name__
    if name == "LlamaForCausalLM":
        column = sd[f"model.layers.{layer}.mlp.down_proj.weight"][:, unit]
        head = sd["model.embed_tokens.weight"] if handle.model.config.tie_word_embeddings else sd["lm_head.weight"]
        return head @ (sd["model.norm.weight"] * column)
    if name == "GPT2LMHeadModel":                                # Conv1D: [d_mlp, d_model], tied to wte
        row = sd[f"transformer.h.{layer}.mlp.c_proj.weight"][unit]
        return sd["transformer.wte.weight"] @ (sd["transformer.ln_f.weight"] * row)
    if name == "Gemma2ForCausalLM":                              # RMSNorm scales by 1 + w; a norm after the MLP
        column = sd[f"model.layers.{layer}.mlp.down_proj.weight"][:, unit]
        post = 1 + sd[f"model.layers.{layer}.post_feedforward_layernorm.weight"]
        return sd["model.embed_tokens.weight"] @ ((1 + sd["model.norm.weight"]) * post * column)
    if name == "ViTForImageClassification":
        fc2 = handle.neuron_module(layer).weight.detach().double()
        return sd["classifier.weight"] @ (sd["vit.layernorm.weight"] * fc2[:, unit])
    assert name == "VisionTransformerDistilled"                  # the two heads averaged at inference
    head = (sd["head.weight"] + sd["head_dist.weight"]) / 2
    return head @ (sd["norm.weight"] * sd[f"blocks.{layer}.mlp.fc2.weight"][:, unit])


@pytest.mark.parametrize("case", ["llama-untied", "llama-tied", "gpt2", "gemma2", "vit", "deit"])
def test_direct_effect_equals_a_hand_computation_through_the_models_own_weights(case, vit_dir, tmp_path):
    from conftest import save_timm
    if case == "vit":
        handle = load_model(vit_dir)
    elif case == "deit":
        handle = load_model(save_timm(tmp_path, "VisionTransformerDistilled"))
    else:
        handle = _tiny_lm({"llama-untied": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM",
                           "gpt2": "GPT2LMHeadModel", "gemma2": "Gemma2ForCausalLM"}[case],
                          **({"tie_word_embeddings": case != "llama-untied"} if case.startswith("llama") else {}))
    model = handle.model
    if handle.kind == "lm":          # the case is what it says: the unembedding is (not) the input embedding
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (case != "llama-untied")
    top = 4
    neurons = [(0, 3), (1, 0), (1, 5)]
    effects, caption = N.direct_effects(handle, neurons, top)
    names = N.output_names(handle, int(_hand_logits(handle, 0, 0).shape[0]))
    for layer, unit in neurons:
        hand = _hand_logits(handle, layer, unit)
        for side, sign in (("up", 1), ("down", -1)):
            got = effects[(layer, unit)][side]
            want = min(top, len(names) // 2)                     # the timm DeiT has 5 classes: 2 a side
            assert len(got) == want and len({n for n, _ in got}) == want
            np.testing.assert_allclose([v for _, v in got], sorted(hand.tolist(), key=lambda v: -sign * v)[:want],
                                       rtol=1e-4, atol=1e-5)
            for output, value in got:                            # each shown output has its own hand value
                assert value == pytest.approx(float(hand[names.index(output)]), rel=1e-4, abs=1e-5)
    assert "Not its total effect" in caption and "elementwise weight" in caption
    if case == "llama-tied":
        assert "tied to the input embedding" in caption
    if case == "vit":                # 10 classes: asked for 8, each side lists 5, none on both sides
        wide = N.direct_effects(handle, neurons[:1], 8)[0][neurons[0]]
        assert len(wide["up"]) == len(wide["down"]) == 5
        assert {n for n, _ in wide["up"]} | {n for n, _ in wide["down"]} == set(names)
    if handle.kind == "image":
        assert names[:2] == [str(model.config.id2label[i]) for i in range(2)] if case == "vit" else \
            names[:2] == ["class 0", "class 1"]


def test_every_architecture_has_a_readout_and_models_without_a_path_say_why():
    from modsep_nb.models import ARCHITECTURES, READOUTS
    assert set(ARCHITECTURES) <= set(READOUTS), "add the new classes' final norm and head to models.READOUTS"
    handle = _tiny_lm("BertModel")
    effects, note = N.direct_effects(handle, [(0, 1)])
    assert effects == {} and "no output head" in note


def test_ablation_effect_equals_a_brute_force_evaluation_with_the_neuron_zeroed_by_hand(tiny_llama, text_tasks):
    from modsep_nb.evaluation import evaluate
    from modsep_nb.statistics import bootstrap_weights
    ctx, n_boot, seed = 8, 50, 3

    def hits():
        return {t: evaluate(tiny_llama, texts, ctx=ctx, per_document=True)["documents"]
                for t, texts in text_tasks.items()}
    neurons = [(0, 5), (1, 3), (1, 7)]
    got = N.ablation_effects(tiny_llama, hits, neurons, n_boot=n_boot, seed=seed)
    base = hits()
    moved = 0
    for layer, unit in neurons:
        # zeroed by hand: the neuron's column of the output projection (its input coordinate) set to 0
        weight = tiny_llama.model.model.layers[layer].mlp.down_proj.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[:, unit] = 0
        zeroed = hits()
        with torch.no_grad():
            weight.copy_(saved)
        for i, task in enumerate(text_tasks):
            n, before, after = base[task]["n"], base[task]["top1"], zeroed[task]["top1"]
            e = got[(layer, unit)][task]
            assert e["delta"] == pytest.approx(after.sum() / n.sum() - before.sum() / n.sum(), abs=1e-12)
            assert e["base"] == pytest.approx(before.sum() / n.sum()) and e["n"] == len(n)
            w = bootstrap_weights(len(n), n_boot, seed + i).numpy()         # the same documents for both
            resampled = (w @ after - w @ before) / (w @ n)
            assert e["ci"] == pytest.approx(tuple(np.percentile(resampled, [2.5, 97.5])))
            moved += after.sum() != before.sum()
    assert moved > 0                                  # some zeroed neuron changed some task's accuracy
    assert all(np.array_equal(hits()[t]["top1"], base[t]["top1"]) for t in text_tasks)   # hooks removed: intact


class _Sections(HTMLParser):
    """Per <section>: its h3 titles, its tables as rows of cell texts, its captions and its context lines."""
    def __init__(self):
        super().__init__()
        self.sections, self._tag, self._cls = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._tag.append(tag)
        self._cls.append(attrs.get("class") or "")
        if tag == "section":
            self.sections.append({"h3": [], "tables": {}, "captions": [], "meta": []})
        elif tag == "table":
            self._table = self.sections[-1]["tables"].setdefault(attrs["class"].split()[-1], [])
        elif tag == "tr":
            self._table.append([])

    def handle_endtag(self, tag):
        while self._tag:                      # close up to the matching tag (<p>, <td> may be left open)
            self._cls.pop()
            if self._tag.pop() == tag:
                break

    def handle_data(self, data):
        if not self.sections or not self._tag:
            return
        s, tag, cls = self.sections[-1], self._tag[-1], self._cls[-1]
        if tag == "h3":
            s["h3"].append(data)
        elif tag in ("td", "th", "b") and "tr" in self._tag:
            s["tables"][list(s["tables"])[-1]][-1].append(data)
        elif tag == "p" and cls == "caption":
            s["captions"].append(data)
        elif cls == "meta":
            s["meta"].append(data)


def test_pages_show_direct_and_ablation_effects_and_name_documents(tmp_path, tiny_llama, text_tasks):
    edges, _ = _edges(tiny_llama, text_tasks, NEURONS, ctx=8)
    names = {t: [f"{t}-file-{d}.py" for d in range(len(texts))] for t, texts in text_tasks.items()}
    ex = N.collect_examples(tiny_llama, text_tasks, NEURONS, picked={"a": NEURONS[:2], "b": NEURONS[2:]}, edges=edges,
                            k=3, ctx=8, progress=False, names=names, direct=5)
    from modsep_nb.evaluation import evaluate
    hits = lambda: {t: evaluate(tiny_llama, x, ctx=8, per_document=True)["documents"]  # noqa: E731
                    for t, x in text_tasks.items()}
    N.add_ablations(ex, tiny_llama, hits, per_task=1, n_boot=20)
    page = N.export(ex, tmp_path, "lm")[0]                          # lm-a.html: neurons (1, 3), then (0, 5)
    parsed = _Sections()
    parsed.feed(page.read_text())
    assert len(parsed.sections) == 2
    for section, neuron in zip(parsed.sections, NEURONS[:2]):
        assert section["h3"][:2] == ["Direct effect on the outputs", "Ablation effect"]
        assert any("Not its total effect" in c for c in section["captions"])      # what it is and is not
        direct = section["tables"]["direct"]
        assert len(direct) == 1 + 5
        for row, (up, down) in zip(direct[1:], zip(ex.direct[neuron]["up"], ex.direct[neuron]["down"])):
            assert row == [_shown(up[0]), f"{up[1]:+.3f}", _shown(down[0]), f"{down[1]:+.3f}"]
        assert all(m.split(" · ")[1] in names[m.split(" · ")[0]] for m in section["meta"])   # named, not "doc N"
        assert section["meta"] and not any(" · doc " in m for m in section["meta"])
    first, second = parsed.sections
    ablation = first["tables"]["ablation"]                          # (1, 3) is a's top neuron: ablated
    assert [r[0] for r in ablation[1:]] == ["a", "b"]
    e = ex.ablation[(1, 3)]["b"]
    assert ablation[2][1:] == [str(e["n"]), f"{e['base']:.3f}", f"{e['delta']:+.4f}",
                               f"[{e['ci'][0]:+.4f}, {e['ci'][1]:+.4f}]"]
    assert "ablation" not in second["tables"]                       # (0, 5), a's second, is not ablated


def test_bad_effect_arguments_are_named(tiny_llama, text_tasks):
    with pytest.raises(ValueError, match="top .outputs shown"):
        N.direct_effects(tiny_llama, [(0, 1)], top=0)
    edges, _ = _edges(tiny_llama, text_tasks, NEURONS, ctx=8)
    ex = N.collect_examples(tiny_llama, text_tasks, NEURONS, edges=edges, k=1, ctx=8, progress=False, direct=0)
    assert ex.direct == {} and ex.direct_note == ""
    with pytest.raises(ValueError, match="per_task .neurons ablated"):
        N.add_ablations(ex, tiny_llama, lambda: {}, per_task=0)
    calls = iter([{"a": {"n": np.array([3, 2]), "top1": np.array([1, 1])}},
                  {"a": {"n": np.array([3]), "top1": np.array([1])}}])          # the second pass reads fewer
    with pytest.raises(ValueError, match="same documents"):
        N.ablation_effects(tiny_llama, lambda: next(calls), [(0, 1)])


def test_pages_import_the_collection_never_the_reverse_and_neurons_keeps_every_public_name():
    """neuron_collection computes, neuron_pages shows: loading the collection in a fresh interpreter must not load
    the pages (nor the neurons face that imports them), and every public name of either is importable from neurons."""
    import subprocess
    import sys
    from modsep_nb import neuron_collection, neuron_pages
    loaded = subprocess.run([sys.executable, "-c", "import sys, modsep_nb.neuron_collection; print(sorted(m for m in "
                             "sys.modules if m.startswith('modsep_nb.neuron')))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "['modsep_nb.neuron_collection']"
    assert neuron_pages.NeuronExamples is neuron_collection.NeuronExamples        # the pages read the collection's
    for module in (neuron_collection, neuron_pages):
        public = {name for name, value in vars(module).items() if not name.startswith("_")
                  and getattr(value, "__module__", module.__name__) == module.__name__ and name.isidentifier()
                  and (callable(value) or name.isupper())}
        assert public <= set(N.__all__), f"{module.__name__} defines {sorted(public - set(N.__all__))} not in neurons"
        for name in public:
            assert getattr(N, name) is getattr(module, name)
