"""The benchmark's accelerator section, run at tiny sizes on the CPU: the same code path the GPU run takes
(model built on the device, statistics against the plain forward, the reference collector, k-means)."""
from __future__ import annotations

import math

import torch

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench  # noqa: E402


def test_gpu_section_runs_at_tiny_size_on_cpu():
    results = bench.bench_gpu("tiny", device="cpu", dtype=torch.float32)
    lm, vit, km = results["mistral_7b_shape"], results["vit_b16"], results["kmeans_mistral_scale"]
    z = bench.GPU_SIZES["tiny"]
    assert lm["tokens"] == 4 * z["batch"] * z["seq"] and lm["layers"] == z["layers"]
    for row in (lm, vit):
        assert row["plain_s"] > 0 and row["stats_s"] > 0 and row["read_s"] > 0 and math.isfinite(row["ratio"])
    assert lm["throughput_ratio_vs_reference"] > 0
    # the reduction timed alone and inside the collector, on one batch's layer-0 activations [rows, neurons]
    assert lm["reduction"]["rows_x_columns"] == [z["batch"] * z["seq"], z["mlp"]]
    assert vit["reduction"]["rows_x_columns"][1] == 4 * z["vit"]["embed_dim"]
    for row in (lm, vit):
        assert all(v > 0 for k, v in row["reduction"].items() if k.endswith("_ms"))
    n, _, k = z["kmeans"]
    assert km["balanced"] and km["shape"] == list(z["kmeans"]) and 0 < km["inertia"] < n


def test_reference_collector_computes_what_collect_stats_does(tiny_llama):
    """The baseline is a fair one: its per-token float64 updates give the same statistics on the same tokens."""
    from conftest import random_texts
    from modsep_nb import collect_stats
    texts = random_texts(6, seed=2, min_len=3, max_len=12)
    ref = bench.reference_collector(tiny_llama, texts, 40)
    ours = collect_stats(tiny_llama, texts, max_tokens=40, ctx=64, progress=False)
    assert ref["tokens"] == 40 and ours.count[0] == 40
    torch.testing.assert_close(ref["mean"], ours.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref["mean_abs"], ours.mean_abs, rtol=1e-5, atol=1e-6)


def test_correspondence_row_measures_the_notebook_shape():
    row = bench.bench_correspondence(quick=True)
    assert row["shape"] == [30, 1536, 48] and row["n_null"] == 100 and row["seconds"] > 0


def test_paper_grid_runs_at_tiny_size_and_counts_each_stage_s_passes():
    """benchmarks/paper_grid.py on the CPU: every stage of the pipeline, each with the forward passes its budgets
    imply (every synthetic document is one full window of ctx tokens), counted here from the settings alone."""
    import paper_grid
    result = paper_grid.run("tiny", "cpu")
    s, stages = result["settings"], {r["stage"].split(" (")[0].split(" at frac")[0]: r for r in result["stages"]}
    T, ctx, batch = s["tasks"], s["lm"]["ctx"], s["lm"]["batch_size"]
    assert list(stages) == ["statistics per task", "pseudo-task null domain", "overlap and its pseudo-task null",
                            "cross-task matrix", "cross-task matrix by bisection", "MoEfication of all 2 layers",
                            "layerwise correspondence"]
    windows = math.ceil(s["lm"]["stats_tokens"] / ctx)
    assert (stages["statistics per task"]["passes"], stages["statistics per task"]["tokens"]) == \
        (T * math.ceil(windows / batch), T * windows * ctx)
    assert stages["pseudo-task null domain"]["passes"] == math.ceil(T * windows / batch)
    per_eval = math.ceil(math.ceil(s["lm"]["eval_tokens"] / ctx) / batch)       # passes of one task's evaluation
    # unpruned accuracies, T rows of T, and per seed T evaluations of each distinct random set (same counts per layer)
    distinct = len({tuple(m.sum(1).tolist()) for m in result["masks"].values()})
    n_seeds = len(s["pruning"]["random_seeds"])
    assert stages["cross-task matrix"]["passes"] == per_eval * (T + T * T + n_seeds * distinct * T)
    # the bisection reuses the unpruned accuracies: T rows of T, plus at most 1 + max_steps evaluations per task
    bisection = stages["cross-task matrix by bisection"]["passes"]
    assert bisection % per_eval == 0
    assert T * T * per_eval <= bisection <= (T * T + T * (1 + s["pruning"]["max_steps"])) * per_eval
    for name in ("overlap and its pseudo-task null", "MoEfication of all 2 layers", "layerwise correspondence"):
        assert stages[name]["passes"] == 0 and stages[name]["seconds"] >= 0     # weights and statistics only
    assert result["total_s"] >= sum(r["seconds"] for r in result["stages"])
    assert "whole grid" in paper_grid.table(result)
