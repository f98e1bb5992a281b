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
