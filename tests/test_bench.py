"""The benchmark's accelerator section, run at tiny sizes on the CPU: the same code path the GPU run takes
(model built on the device, statistics against the plain forward, the reference collector, k-means)."""
from __future__ import annotations

import math

import torch

from modsep_nb import bench


def test_gpu_section_runs_at_tiny_size_on_cpu():
    results = bench.bench_gpu("tiny", device="cpu", dtype=torch.float32)
    lm, vit, km = results["mistral_7b_shape"], results["vit_b16"], results["kmeans_mistral_scale"]
    z = bench.GPU_SIZES["tiny"]
    assert lm["tokens"] == 4 * z["batch"] * z["seq"] and lm["layers"] == z["layers"]
    for row in (lm, vit):
        assert row["plain_s"] > 0 and row["stats_s"] > 0 and math.isfinite(row["ratio"])
    assert lm["throughput_ratio_vs_reference"] > 0
    n, _, k = z["kmeans"]
    assert km["balanced"] and km["shape"] == list(z["kmeans"]) and 0 < km["inertia"] < n
    text = bench.table({"gpu": results})
    assert "GPU stats / plain forward, mistral_7b_shape" in text and "GPU balanced k-means" in text
    assert f"{km['speedup_vs_theirs_cpu']:.0f}x" in text
