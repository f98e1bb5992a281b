"""Checks that need a CUDA device (skipped without one; run by `make gpu-check` on a GPU machine):
the fused statistics path, k-means, ablation and device_map="auto" on the GPU agree with the CPU."""
from __future__ import annotations

import pytest
import torch

from conftest import random_texts
from modsep_nb import ablate, balanced_kmeans, collect_stats, evaluate, load_model, select_neurons
from modsep_nb.moefication import inertia, normalize_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = random_texts(16, seed=9, min_len=1, max_len=30)      # ragged: batches carry padding


def test_fused_statistics_on_gpu_equal_cpu(llama_dir, recwarn):
    cpu, gpu = load_model(llama_dir), load_model(llama_dir, device="cuda")
    a = collect_stats(cpu, TEXTS, batch_size=4, ctx=12, progress=False)
    b = collect_stats(gpu, TEXTS, batch_size=4, ctx=12, progress=False)      # fused: compiled, on the device
    # only the project's own warning: libraries may mention torch.compile in their deprecation notices
    assert not [w for w in recwarn if "statistics reduction failed" in str(w.message)], \
        "the fused reduction did not compile"
    assert torch.equal(a.count, b.count)
    for name in ("mean", "mean_abs", "mean_sq", "frac_pos", "mean_sqrt"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-5)


def test_bf16_statistics_on_gpu_close_to_float32(llama_dir):
    a = collect_stats(load_model(llama_dir, device="cuda"), TEXTS, ctx=12, progress=False)
    b = collect_stats(load_model(llama_dir, device="cuda", dtype="bfloat16"), TEXTS, ctx=12, progress=False)
    assert torch.equal(a.count, b.count)
    rel = (b.mean_abs - a.mean_abs).abs() / a.mean_abs.clamp_min(1e-3)
    assert float(rel.median()) < 0.05


def test_ablation_on_gpu_equals_cpu(llama_dir):
    cpu, gpu = load_model(llama_dir), load_model(llama_dir, device="cuda")
    stats = collect_stats(cpu, TEXTS, ctx=12, progress=False)
    mask = select_neurons(stats.mean_abs, 0.25)
    with ablate(cpu, mask, mode="mean", means=stats.mean):
        expected = evaluate(cpu, TEXTS)
    with ablate(gpu, mask, mode="mean", means=stats.mean):
        got = evaluate(gpu, TEXTS)
    assert got["n"] == expected["n"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-4)


def test_balanced_kmeans_on_gpu_matches_cpu():
    x = normalize_rows(torch.randn(960, 48, generator=torch.Generator().manual_seed(1)))
    cpu = balanced_kmeans(x, 30, seed=0)
    gpu = balanced_kmeans(x, 30, seed=0, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(torch.bincount(gpu.cpu(), minlength=30), torch.full((30,), 32))
    assert inertia(x, gpu.cpu()) <= inertia(x, cpu) * 1.001


def test_device_map_auto_places_the_model_on_the_gpu(llama_dir):
    handle = load_model(llama_dir, device_map="auto")
    assert handle.device.type == "cuda"
    a = collect_stats(load_model(llama_dir), TEXTS, ctx=12, progress=False)
    b = collect_stats(handle, TEXTS, ctx=12, progress=False)
    torch.testing.assert_close(b.mean_abs, a.mean_abs, rtol=1e-4, atol=1e-5)


def test_random_init_of_a_model_sharded_over_gpu_and_cpu(llama_dir):
    """Layers on the GPU and the head offloaded to the CPU: the random model is dispatched the same way and
    equals the one-device random model of the same seed."""
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": "cpu"}
    plain = load_model(llama_dir, random_init=True, seed=3)
    sharded = load_model(llama_dir, device_map=device_map, random_init=True, seed=3)
    assert sharded.device.type == "cuda" and sharded.model.hf_device_map == device_map
    a = collect_stats(plain, TEXTS, ctx=12, progress=False)
    b = collect_stats(sharded, TEXTS, ctx=12, progress=False)
    torch.testing.assert_close(b.mean_abs, a.mean_abs, rtol=1e-4, atol=1e-5)
