"""Streaming neuron statistics (docs/method.md §2): equal to float64 statistics of activations captured with our own
hooks, independent of batching, exactly mergeable, saved and loaded intact; std and rms as defined; clear
errors for NaN activations and wrong inputs."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import capture_neuron_inputs, random_texts, windows_in_rounds, windows_of
from modsep_nb import NeuronStats, collect_stats
from modsep_nb.statistics import MEANS, NonFiniteActivationError

FIELDS = ("count", *MEANS)


def reference_from_rows(rows_per_layer: list[torch.Tensor]) -> dict:
    """count / mean / mean_abs / mean_sq / frac_pos / mean_sqrt in float64 from [n, d] activations per layer."""
    out = {k: [] for k in FIELDS}
    for x in rows_per_layer:
        x = x.to(torch.float64)
        out["count"].append(float(x.shape[0]))
        out["mean"].append(x.mean(0))
        out["mean_abs"].append(x.abs().mean(0))
        out["mean_sq"].append((x * x).mean(0))
        out["frac_pos"].append((x > 0).to(torch.float64).mean(0))
        out["mean_sqrt"].append(x.abs().sqrt().mean(0))
    return {k: (torch.tensor(v, dtype=torch.float64) if k == "count" else torch.stack(v)) for k, v in out.items()}


def lm_reference(handle, texts, ctx):
    """Run every window alone (no padding at all) and capture the neuron inputs with our own hooks."""
    with capture_neuron_inputs(handle) as records, torch.no_grad():
        for w in windows_of(texts, ctx):
            ids = torch.tensor([w])
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return reference_from_rows([torch.cat([r[0] for r in records[l]]) for l in range(handle.n_layers)])


def assert_stats_close(stats: NeuronStats, ref: dict, rtol=1e-5, atol=1e-7):
    for k in FIELDS:
        got = getattr(stats, k)
        assert got.dtype == torch.float64, k
        assert got.shape == ref[k].shape, k
        torch.testing.assert_close(got, ref[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# documents of very different lengths, so batches carry a lot of right padding
TEXTS = random_texts(11, seed=5, min_len=1, max_len=30)


def test_lm_stats_equal_reference_with_padding(tiny_llama):
    stats = collect_stats(tiny_llama, TEXTS, batch_size=4, ctx=12, progress=False)
    ref = lm_reference(tiny_llama, TEXTS, ctx=12)
    n_real = sum(len(w) for w in windows_of(TEXTS, 12))
    assert stats.count.tolist() == [float(n_real)] * tiny_llama.n_layers      # padding never counted
    assert_stats_close(stats, ref)
    # a meaningful comparison: activations are not all of one sign, and not tiny
    assert 0.1 < ref["frac_pos"].mean() < 0.9 and ref["mean_abs"].mean() > 1e-2


@pytest.mark.parametrize("max_tokens, doc_tokens", [(50, None), (150, None), (170, 24), (60, 5)])
def test_lm_stats_max_tokens(tiny_llama, max_tokens, doc_tokens):
    stats = collect_stats(tiny_llama, TEXTS, max_tokens=max_tokens, batch_size=3, ctx=12, progress=False,
                          doc_tokens=doc_tokens)
    assert stats.count.tolist() == [float(max_tokens)] * 2
    # the first max_tokens real tokens: whole windows, one per document and round, then the head of the next one
    # (the head is causal, so exact)
    rows = {l: [] for l in range(2)}
    left = max_tokens
    with capture_neuron_inputs(tiny_llama) as records, torch.no_grad():
        for w in windows_in_rounds(TEXTS, 12, doc_tokens):
            if left <= 0:
                break
            ids = torch.tensor([w[:left]])
            tiny_llama.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            left -= len(w[:left])
    ref = reference_from_rows([torch.cat([r[0] for r in records[l]]) for l in range(2)])
    assert_stats_close(stats, ref)


def test_batch_size_does_not_matter(tiny_llama):
    one = collect_stats(tiny_llama, TEXTS, batch_size=1, ctx=12, progress=False)
    seven = collect_stats(tiny_llama, TEXTS, batch_size=7, ctx=12, progress=False)
    assert torch.equal(one.count, seven.count)
    # padding changes the shapes of the float32 matmuls, so activations agree to float32 rounding (values are O(1))
    for k in MEANS:
        torch.testing.assert_close(getattr(one, k), getattr(seven, k), rtol=1e-6, atol=1e-6)


def test_merge_equals_union(tiny_llama):
    a, b = TEXTS[:6], TEXTS[6:]
    # batch_size=1: every window is computed alone, so the three runs see bit-identical activations
    sa = collect_stats(tiny_llama, a, batch_size=1, ctx=12, progress=False)
    sb = collect_stats(tiny_llama, b, batch_size=1, ctx=12, progress=False)
    sab = collect_stats(tiny_llama, a + b, batch_size=1, ctx=12, progress=False)
    merged = sa.merge(sb)
    assert torch.equal(merged.count, sab.count)
    for k in MEANS:
        torch.testing.assert_close(getattr(merged, k), getattr(sab, k), rtol=1e-12, atol=1e-15)
    # merging is symmetric
    for k in FIELDS:
        torch.testing.assert_close(getattr(sb.merge(sa), k), getattr(merged, k), rtol=1e-12, atol=1e-15)


def test_merge_synthetic_exact():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(37, 2, 5, generator=gen, dtype=torch.float64)
    x2 = torch.randn(11, 2, 5, generator=gen, dtype=torch.float64) * 3 + 1

    def stats_of(x):
        ref = reference_from_rows([x[:, l] for l in range(x.shape[1])])
        return NeuronStats(ref["count"], *[ref[m] for m in MEANS])
    merged = stats_of(x1).merge(stats_of(x2))
    whole = reference_from_rows([torch.cat([x1, x2])[:, l] for l in range(2)])
    for k in FIELDS:
        torch.testing.assert_close(getattr(merged, k), whole[k], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        stats_of(x1).merge(stats_of(torch.randn(4, 3, 5, dtype=torch.float64)))


def test_save_load_round_trip(tiny_llama, tmp_path):
    stats = collect_stats(tiny_llama, TEXTS[:4], ctx=12, task="code", progress=False)
    stats.meta["note"] = {"nested": [1, 2.5, "x"]}
    path = tmp_path / "sub" / "code.safetensors"
    stats.save(path)
    back = NeuronStats.load(path)
    for k in FIELDS:
        assert torch.equal(getattr(back, k), getattr(stats, k)), k
        assert getattr(back, k).dtype == torch.float64
    assert back.meta == json.loads(json.dumps(stats.meta))
    assert back.meta["task"] == "code" and back.meta["note"] == {"nested": [1, 2.5, "x"]}
    assert [p.name for p in path.parent.iterdir()] == ["code.safetensors"]     # no temporary leftovers


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="NeuronStats"):
        NeuronStats.load(tmp_path / "w.safetensors")


def test_std_is_sample_standard_deviation_and_rms():
    gen = np.random.default_rng(0)
    x = gen.normal(5.0, 3.0, size=(50, 3, 4))         # mean 5, sd 3: var (about 9) != 1, rms (about 5.8) != std
    ref = reference_from_rows([torch.from_numpy(x[:, l]) for l in range(3)])
    stats = NeuronStats(ref["count"], *[ref[m] for m in MEANS])
    expected_std = torch.from_numpy(x.std(axis=0, ddof=1))
    torch.testing.assert_close(stats.std, expected_std, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.std ** 2, stats.var, rtol=1e-10, atol=1e-12)
    assert (stats.std - stats.var).abs().min() > 1.0           # the reference stored var under the name std
    torch.testing.assert_close(stats.rms, torch.from_numpy(np.sqrt((x ** 2).mean(axis=0))), rtol=1e-10,
                               atol=1e-12)
    assert (stats.rms - stats.std).abs().min() > 1.0


def test_nan_activations_name_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.blocks[1].mlp.up_proj.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError) as err:
        collect_stats(tiny_llama, TEXTS[:3], ctx=12, task="songs", progress=False)
    msg = str(err.value)
    layers = re.search(r"layers? \[([\d, ]*)\]", msg)
    assert layers is not None and layers.group(1) == "1", msg
    assert "songs" in msg


def test_inf_in_first_layer_names_both_layers(tiny_llama):
    with torch.no_grad():
        tiny_llama.blocks[0].mlp.gate_proj.weight[0, :] = float("inf")
    with pytest.raises(NonFiniteActivationError) as err:
        collect_stats(tiny_llama, TEXTS[:3], ctx=12, progress=False)
    assert "0" in re.search(r"\[([\d, ]*)\]", str(err.value)).group(1)


def test_lm_rejects_non_text(tiny_llama):
    with pytest.raises(TypeError):
        collect_stats(tiny_llama, torch.zeros(2, 3), progress=False)
    with pytest.raises(TypeError):
        collect_stats(tiny_llama, "one string, not a list", progress=False)
    with pytest.raises(ValueError):
        collect_stats(tiny_llama, [], progress=False)


# -- images --------------------------------------------------------------------------------------------------
IMAGES = torch.randn(13, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def vit_reference(handle, images, cls_only=False):
    with capture_neuron_inputs(handle) as records, torch.no_grad():
        for i in range(len(images)):                     # one image per forward
            handle.image_logits(images[i:i + 1])
    rows = []
    for layer in range(handle.n_layers):
        x = torch.cat(records[layer])                    # [N, tokens, d]
        rows.append(x[:, 0] if cls_only else x.reshape(-1, x.shape[-1]))
    return reference_from_rows(rows)


def test_vit_stats_equal_reference(tiny_vit):
    stats = collect_stats(tiny_vit, IMAGES, batch_size=5, progress=False)
    ref = vit_reference(tiny_vit, IMAGES)
    assert stats.count.tolist() == [13.0 * 17] * 2          # 16 patches + CLS per image
    assert_stats_close(stats, ref)


def test_vit_cls_only(tiny_vit):
    stats = collect_stats(tiny_vit, IMAGES, batch_size=4, cls_only=True, progress=False)
    assert stats.count.tolist() == [13.0, 13.0]
    assert_stats_close(stats, vit_reference(tiny_vit, IMAGES, cls_only=True))


def test_timm_stats_and_cls_only(timm_dir):
    from modsep_nb import load_model
    handle = load_model(timm_dir)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_stats_close(collect_stats(handle, images, batch_size=2, progress=False), vit_reference(handle, images))
    cls = collect_stats(handle, images, batch_size=2, cls_only=True, progress=False)
    assert cls.count.tolist() == [5.0, 5.0]
    assert_stats_close(cls, vit_reference(handle, images, cls_only=True))


def test_image_dataset_and_max_images(tiny_vit):
    from modsep_nb.data import ImageDataset
    ds = ImageDataset(IMAGES, torch.zeros(13, dtype=torch.long), ["a"], "toy")
    stats = collect_stats(tiny_vit, ds, max_tokens=6, progress=False)
    assert stats.count.tolist() == [6.0 * 17] * 2
    assert_stats_close(stats, vit_reference(tiny_vit, IMAGES[:6]))


def test_wrong_image_shape_is_a_clear_error(tiny_vit):
    with pytest.raises(ValueError) as err:
        collect_stats(tiny_vit, torch.randn(2, 3, 16, 16), progress=False)
    msg = str(err.value)
    assert "[3, 16, 16]" in msg and "[1, 16, 16]" in msg
    with pytest.raises(ValueError):
        collect_stats(tiny_vit, torch.randn(2, 1, 28, 28), progress=False)
    with pytest.raises(TypeError):
        collect_stats(tiny_vit, torch.randn(1, 16, 16), progress=False)
    with pytest.raises(TypeError):
        collect_stats(tiny_vit, ["not", "images"], progress=False)
    with pytest.raises(TypeError):
        collect_stats(tiny_vit, torch.zeros(2, 1, 16, 16, dtype=torch.uint8), progress=False)
    assert math.isfinite(collect_stats(tiny_vit, IMAGES[:1], progress=False).mean.sum().item())


# -- the reduction paths: compiled (default, tested above), eager masked (accelerators without a compiler),
# -- eager gather (CPU without a compiler, or fused=False) ----------------------------------------------------
@pytest.fixture
def masked_eager(monkeypatch):
    """The masked reduction run eagerly, as on an accelerator where torch.compile is unavailable."""
    from modsep_nb import statistics
    monkeypatch.setitem(statistics._COMPILED, "reduce", statistics._masked_reduce)


def test_masked_eager_path_equals_reference_with_padding(tiny_llama, masked_eager):
    stats = collect_stats(tiny_llama, TEXTS, batch_size=4, ctx=12, progress=False)
    n_real = sum(len(w) for w in windows_of(TEXTS, 12))
    assert stats.count.tolist() == [float(n_real)] * tiny_llama.n_layers
    assert_stats_close(stats, lm_reference(tiny_llama, TEXTS, ctx=12))


def test_masked_eager_path_images_cls_only(tiny_vit, masked_eager):
    images = torch.randn(9, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    for cls_only in (False, True):
        stats = collect_stats(tiny_vit, images, batch_size=4, cls_only=cls_only, progress=False)
        assert_stats_close(stats, vit_reference(tiny_vit, images, cls_only=cls_only))


def test_eager_gather_path_equals_reference(tiny_llama):
    stats = collect_stats(tiny_llama, TEXTS, batch_size=4, ctx=12, progress=False, fused=False)
    assert_stats_close(stats, lm_reference(tiny_llama, TEXTS, ctx=12))


def test_without_a_compiler_the_eager_path_serves_with_a_warning(tiny_llama, monkeypatch):
    from modsep_nb import statistics

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C compiler found")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.delitem(statistics._COMPILED, "reduce", raising=False)
    # test_gpu.py looks for "statistics reduction failed": the message names the toolchain's own error too
    with pytest.warns(RuntimeWarning, match="statistics reduction failed.*no C compiler found"):
        stats = collect_stats(tiny_llama, TEXTS, batch_size=4, ctx=12, progress=False)
    assert statistics._COMPILED["reduce"] is False
    assert_stats_close(stats, lm_reference(tiny_llama, TEXTS, ctx=12))
    monkeypatch.delitem(statistics._COMPILED, "reduce")


@pytest.mark.parametrize("path", ["compiled", "masked eager"])
def test_nan_in_padding_is_ignored_and_flagged_elsewhere(tiny_llama, monkeypatch, path):
    from modsep_nb import statistics
    from modsep_nb.statistics import StatsCollector
    if path == "masked eager":
        monkeypatch.setitem(statistics._COMPILED, "reduce", statistics._masked_reduce)
    x = torch.randn(2, 5, tiny_llama.d_mlp)
    padded = x.clone()
    padded[1, 3:] = float("nan")                      # padding positions hold garbage
    positions = torch.ones(2, 5, dtype=torch.bool)
    positions[1, 3:] = False
    collector = StatsCollector(tiny_llama, layers=[0])
    collector.positions = positions
    collector._reader(0)(padded)
    collector._fold()
    assert not collector.nonfinite
    expected = reference_from_rows([x[positions]])
    assert collector.count[0] == 8
    torch.testing.assert_close(collector.totals[0, 1] / 8, expected["mean_abs"][0], rtol=1e-6, atol=1e-7)
    collector.positions = None                        # now the NaN rows count
    collector._reader(0)(padded)
    collector._fold()
    assert collector.nonfinite == {0}


def test_compiled_reduction_equals_eager(recwarn, monkeypatch):
    from torch._dynamo.utils import counters
    from modsep_nb import statistics
    # the two-stage layout serves accelerators only; here it takes every activation of at least two chunks' rows
    monkeypatch.setattr(statistics, "_two_stage", lambda x: x.shape[0] >= 2 * statistics.ROW_CHUNKS)
    # a fresh compile: earlier tests in this process (many shapes and dtypes) may have used up dynamo's
    # recompile budget, after which the reduction falls back to eager for the rest of the process
    monkeypatch.setattr(statistics, "_COMPILED", {})
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    c = statistics.ROW_CHUNKS
    # plain (few rows) and two-stage layouts, the latter with and without rows left over past whole chunks
    for n in (37, 300, 2 * c, 2 * c + 1, 3 * c - 1, 5 * c + 17, 40 * c + 200):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, 24, generator=gen).to(dtype)
            keep = torch.rand(n, generator=gen) > 0.3
            for k in (keep, None):
                rows = (x if k is None else x[k]).double()     # independent: gathered rows, float64
                expected = torch.stack([rows.sum(0), rows.abs().sum(0), (rows * rows).sum(0),
                                        (rows > 0).sum(0).double(), rows.abs().sqrt().sum(0)])
                for fn in (statistics._compiled_reduce, statistics._masked_reduce):
                    got = fn(x, k)
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
                    assert torch.equal(got[3], expected[3])      # counts exactly
    if shutil.which("cc") or shutil.which("gcc"):     # a C compiler is all torch.compile needs on the CPU
        assert statistics._COMPILED["reduce"] not in (False, statistics._masked_reduce)
        assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
        # one graph per layout, dtype and mask or none, whatever the number of rows: no recompile per shape
        assert counters["stats"]["unique_graphs"] == 2 * 2 * 2


def test_two_stage_layout_where_a_plain_column_sum_leaves_a_gpu_idle():
    """ViT-B/16 at batch 256 (50,432 rows x 3,072 columns) on an accelerator: two stages; a 7B model's 14,336
    columns, few rows, or the CPU: the plain column sums (so the CPU's statistics are those of before)."""
    from modsep_nb.statistics import _two_stage
    assert _two_stage(torch.empty(256 * 197, 3072, device="meta"))
    assert not _two_stage(torch.empty(8 * 1024, 14336, device="meta"))
    assert not _two_stage(torch.empty(16 * 64, 1536, device="meta"))
    assert not _two_stage(torch.empty(1, 3072, dtype=torch.bfloat16).expand(256 * 197, 3072))


def test_reading_passes_stop_after_the_last_hooked_layer(tiny_llama, tiny_vit):
    """Statistics and neuron examples never compute what they do not read: no unembedding, no layer after the
    last hooked one; evaluation still computes the logits. Statistics stay equal to the full forward's
    (the reference above runs the whole model), and no hook is left behind, also after an error."""
    from collections import Counter

    from modsep_nb import evaluate
    from modsep_nb import neurons as N

    def watch(handle, modules):
        calls = Counter()
        removers = [m.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))   # started
                    for name, m in modules.items()]
        return calls, removers

    lm = tiny_llama
    last = lm.n_layers - 1
    modules = {"head": lm.model.lm_head, "norm": lm.model.model.norm, "last block": lm.blocks[last],
               "first block": lm.blocks[0]}
    calls, removers = watch(lm, modules)
    stats = collect_stats(lm, TEXTS, batch_size=4, ctx=12, progress=False)
    assert calls["head"] == calls["norm"] == 0 and calls["first block"] > 0
    assert_stats_close(stats, lm_reference(lm, TEXTS, ctx=12))
    calls.clear()
    edges = N.histogram_edges({"t": stats}, [(0, 1)], 4)
    N.collect_examples(lm, {"t": TEXTS}, [(0, 1)], edges=edges, k=2, window=1, ctx=12, batch_size=4, progress=False)
    assert calls["first block"] > 0 and calls["last block"] == calls["head"] == 0     # only layer 0 is read
    calls.clear()
    evaluate(lm, TEXTS, ctx=12, progress=False)
    assert calls["head"] > 0 and calls["last block"] > 0
    for remover in removers:
        remover.remove()
    assert not lm._hooked
    with pytest.raises(RuntimeError, match="reader failed"), lm.hooks({0: lambda x: (_ for _ in ()).throw(
            RuntimeError("reader failed"))}):
        lm.read_forward(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    assert not lm._hooked

    vit = tiny_vit
    calls, removers = watch(vit, {"classifier": vit.model.classifier})
    images = torch.randn(3, *vit.image_shape, generator=torch.Generator().manual_seed(0))
    collect_stats(vit, images, progress=False)
    assert calls["classifier"] == 0
    vit.image_logits(images)
    assert calls["classifier"] == 1


# -- counted positions (issue #26 item 2): position 0 out, every other position weighing alike --------------------
def lm_positions_reference(handle, texts, ctx, skip=(0,), equal=True) -> dict:
    """Each window run alone; the rows at `skip` dropped; with `equal`, each position's own mean over the windows
    reaching it, then the plain mean of those over the positions present (every position weighs the same)."""
    with capture_neuron_inputs(handle) as records, torch.no_grad():
        for w in windows_of(texts, ctx):
            ids = torch.tensor([w])
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out = {k: [] for k in FIELDS}
    for layer in range(handle.n_layers):
        per_position = {}
        for r in records[layer]:
            for p, row in enumerate(r[0]):
                if p not in skip:
                    per_position.setdefault(p, []).append(row)
        rows = [torch.stack(v) for v in per_position.values()]
        if equal:
            ref = reference_from_rows(rows)
            for k in MEANS:
                out[k].append(ref[k].mean(0))
            out["count"].append(ref["count"].sum())
        else:
            ref = reference_from_rows([torch.cat(rows)])
            for k in FIELDS:
                out[k].append(ref[k][0])
    return {k: (torch.tensor(v, dtype=torch.float64) if k == "count" else torch.stack(v)) for k, v in out.items()}


@pytest.mark.parametrize("skip, equal", [((0,), True), ((0,), False), ((0, 3), True), ((), True)])
def test_skipped_and_equally_weighted_positions_equal_a_reference(tiny_llama, skip, equal):
    from modsep_nb.shards import collect_blocks
    from modsep_nb.statistics import collect_block_stats
    ref = lm_positions_reference(tiny_llama, TEXTS, 12, skip, equal)
    stats = collect_stats(tiny_llama, TEXTS, batch_size=4, ctx=12, progress=False, skip_positions=skip,
                          equal_positions=equal)
    assert stats.meta["skip_positions"] == list(skip) and stats.meta["equal_positions"] == equal
    assert_stats_close(stats, ref)
    # the same per block of documents; a block's weights are the whole task's, not its own few windows'
    for collect in (collect_block_stats, collect_blocks):
        blocks = collect(tiny_llama, TEXTS, 4, batch_size=3, ctx=12, progress=False, skip_positions=skip,
                         equal_positions=equal)
        assert_stats_close(blocks.merged(), ref)


def test_skipping_position_0_removes_exactly_the_first_tokens(tiny_llama):
    every = collect_stats(tiny_llama, TEXTS, ctx=12, progress=False)
    skipped = collect_stats(tiny_llama, TEXTS, ctx=12, progress=False, skip_positions=(0,))
    windows = windows_of(TEXTS, 12)
    assert every.count[0] - skipped.count[0] == len(windows)          # one first token per window
    assert every.meta["skip_positions"] == [] and every.meta["equal_positions"] is False
