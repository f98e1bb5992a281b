"""Past one machine (issue #27): block statistics collected in shards and merged are the cache entries one process
writes, bit for bit, and the notebooks' Study reads them without computing; the cost planner's counts."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import random_texts, save_hf_vit
from modsep_nb import shards
from modsep_nb.__main__ import main
from modsep_nb.params import load_params
from modsep_nb.statistics import collect_block_stats
from modsep_nb.study import Study, cache_entries


def test_blocks_batched_alone_read_what_one_pass_reads(tiny_llama, tiny_vit):
    """Each block's documents, batched on their own, give the tokens (images) and sums of collect_block_stats's
    single pass over the same budget: the same windows were read, only batched differently."""
    texts = random_texts(40, seed=3, max_len=60)
    one = collect_block_stats(tiny_llama, texts, 6, max_tokens=500, ctx=16, batch_size=4, progress=False)
    alone = shards.collect_blocks(tiny_llama, texts, 6, max_tokens=500, ctx=16, batch_size=4, progress=False)
    images = torch.randn(23, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    one_v = collect_block_stats(tiny_vit, images, 5, batch_size=4, progress=False)
    alone_v = shards.collect_blocks(tiny_vit, images, 5, batch_size=4, progress=False)
    for a, b in ((one, alone), (one_v, alone_v)):
        assert torch.equal(a.count, b.count) and torch.equal(a.n_documents, b.n_documents)
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-5, atol=1e-5)
        assert a.meta["tokens"] == b.meta["tokens"] and a.meta["documents"] == b.meta["documents"]
    assert alone.meta["tokens"] == 500


def _write_params(tmp_path, llama_dir, vit_dir, cache) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "cache_dir": str(cache), "device": "cpu", "notebooks": ["01", "02", "04"],
        "lm": {"model": str(llama_dir), "tasks": ["docs", "law", "licenses"], "stats_tokens": 120, "eval_tokens": 32,
               "ctx": 16, "batch_size": 4},
        "vit": {"model": str(vit_dir), "tasks": "groups", "stats_images": 10, "eval_images": 150, "batch_size": 4},
        "evidence": {"n_blocks": 3, "blocks_alone": True}, "random_init": {"seeds": [1]}}))
    return str(path)


def test_two_shards_merged_are_the_one_process_cache_bit_for_bit(tmp_path, llama_dir, monkeypatch, capsys):
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=28, patch_size=7)
    one_cache, merged_cache = tmp_path / "one", tmp_path / "merged"
    params_file = _write_params(tmp_path, llama_dir, vit_dir, one_cache)
    for i in (0, 1):
        assert main(["collect", params_file, "--shard", f"{i}/2", "--out", str(tmp_path / f"shard{i}")]) == 0
    assert main(["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(merged_cache)]) == 0
    # one process: what the notebooks compute (01/02: tasks, the general corpus of overlap.retain: general and the
    # ViT's pseudo-task null (vit.selectivity_null; lm's is off); 04: the random-init model's tasks)
    params = load_params(params_file)
    n_entries = 0
    for kind in ("lm", "vit"):
        study = Study.from_params(params, kind)
        null_domains = study.null_domains() if kind == "vit" else []      # overlap.null_domains of them
        n_entries += 2 * len(study.task_names) + 1 + len(null_domains)
        study.block_stats(progress=False)
        for domain in null_domains:
            study.null_block_stats(domain, progress=False)
        study.general_stats()
        study.with_random_init(1).block_stats(progress=False)
    one = sorted(p.name for p in (one_cache / "stats").iterdir())
    assert one == sorted(p.name for p in (merged_cache / "stats").iterdir())
    assert len(one) == n_entries == 7 + 14              # lm: 3 tasks; vit: Fashion-MNIST's 5 groups, 3 null domains
    for name in one:     # the same tensors, bit for bit (their SHA-256), and the same metadata, character for character
        # (not the files' bytes: safetensors writes its header's metadata entries in an arbitrary order)
        a, b = (safe_open(str(c / "stats" / name), "pt") for c in (one_cache, merged_cache))
        assert a.metadata() == b.metadata() and a.keys() == b.keys(), name
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # without blocks_alone the notebooks batch blocks together (faster), so collect refuses such a file
    with pytest.raises(ValueError, match="blocks_alone: true"):
        shards.collect(cache_entries(load_params(params_file, {"evidence": {"blocks_alone": False}})), (0, 2),
                       tmp_path / "refused", progress=False)
    # the notebooks' Study on the merged cache loads every entry: nothing is computed
    monkeypatch.setattr("modsep_nb.study.collect_blocks", lambda *a, **k: pytest.fail("recomputed a cached entry"))
    merged = load_params(params_file, {"cache_dir": str(merged_cache)})
    study = Study.from_params(merged, "lm")
    blocks = study.block_stats(progress=False)
    assert blocks["law"].meta["max_tokens"] == 120
    assert torch.equal(study.general_stats().count, Study.from_params(params, "lm").general_stats().count)


def test_merge_refuses_missing_or_mixed_shards(tmp_path, llama_dir):
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=28, patch_size=7)
    params = load_params(_write_params(tmp_path, llama_dir, vit_dir, tmp_path / "cache"), {"notebooks": ["02"]})
    shards.collect(cache_entries(params), (0, 2), tmp_path / "a", progress=False)
    with pytest.raises(shards.MergeError, match=r"blocks \[.*\] of .*found shards \[0\] of 2"):
        shards.merge([tmp_path / "a"], tmp_path / "out")
    shards.collect(cache_entries(params), (1, 3), tmp_path / "a", progress=False)
    with pytest.raises(shards.MergeError, match="different runs"):
        shards.merge([tmp_path / "a"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(shards.MergeError, match="no shard files"):
        shards.merge([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out" / "stats").exists()


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "0/0"])
def test_shard_must_be_i_of_n(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["collect", "params/smoke.yaml", f"--shard={text}", "--out", "x"])
    assert exit_.value.code == 2 and "--shard must be I/N with 0 <= I < N" in capsys.readouterr().err


# -- the cost planner ------------------------------------------------------------------------------------------
def _counting(handle):
    """Forward calls and real tokens through the model, counted at its input (independent of the planner)."""
    seen = {"passes": 0, "tokens": 0}

    def hook(module, args, kwargs):
        seen["passes"] += 1
        seen["tokens"] += int(kwargs["attention_mask"].sum())
    handle.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_plan_counts_what_statistics_and_the_cross_task_matrix_run(tmp_path, llama_dir):
    from modsep_nb import plan
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu", "notebooks": ["02"],
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law", "licenses"],
                                       "stats_tokens": 100, "eval_tokens": 40, "ctx": 16, "batch_size": 3},
                                "evidence": {"n_blocks": 4}, "pruning": {"random_seeds": [0, 1]}})
    stages = {s.what.split(",")[0]: s for s in plan.count(params)}
    assert "cross-task matrix by bisection (at most)" not in stages         # lm.bisection: false, never run
    with_bisection = load_params(None, {**params, "lm": {**params["lm"], "bisection": True}})
    bisection = {s.what: s for s in plan.count(with_bisection)}["cross-task matrix by bisection (at most)"]
    # by hand: 3 tasks x (the bound + 6 steps) own evaluations, then 3 rows of 3, each 40 evaluation tokens
    assert bisection.units == (3 * 7 + 3 * 3) * 40
    study = Study.from_params(params, "lm")
    seen = _counting(study.handle)
    study.block_stats(progress=False)
    # by hand: 100 tokens at ctx 16 are 7 windows (7 long documents): 3 batches of at most 3 (blocks share them)
    assert (seen["passes"], seen["tokens"]) == (3 * 3, 3 * 100)
    assert (stages["statistics"].passes, stages["statistics"].units) == (3 * 3, 3 * 100)
    before = dict(seen)
    study.null_block_stats(progress=False)
    null = stages["pseudo-task null domain"]
    # 300 tokens: 19 windows (documents hold 15 tokens plus a 1-token piece), 7 batches
    assert (seen["passes"] - before["passes"], seen["tokens"] - before["tokens"]) == (null.passes, null.units)
    assert null.units == 300
    alone = load_params(None, {**{k: params[k] for k in ("device", "notebooks", "lm")},
                               "cache_dir": str(tmp_path / "alone"), "evidence": {"n_blocks": 4, "blocks_alone": True},
                               "pruning": {"random_seeds": [0, 1]}})
    stage = {s.what.split(",")[0]: s for s in plan.count(alone)}["statistics"]
    study_alone = Study.from_params(alone, "lm")
    counted = _counting(study_alone.handle)
    study_alone.block_stats(progress=False)
    # blocks of 2, 2, 2, 1 windows, each batched alone: 1 batch each
    assert (counted["passes"], counted["tokens"]) == (stage.passes, stage.units) == (3 * 4, 3 * 100)
    before = dict(seen)
    study.cross_task(frac=0.1, progress=False)
    # base (3 evaluations) + 3 rows x 3 evaluations + per seed, 3 evaluations of each distinct random set (tasks
    # with the same count per layer share it), each 40 tokens = 3 windows = 1 batch of 3; the plan counts every
    # random set (its upper bound), which is the count when no two tasks share one
    distinct = len({tuple(m.sum(1).tolist()) for m in study.masks(0.1).values()})
    n_evals = 3 + 3 * 3 + 2 * distinct * 3
    base, fixed = stages["unpruned accuracy"], stages["cross-task matrix at a fixed fraction"]
    assert (seen["passes"] - before["passes"], seen["tokens"] - before["tokens"]) == (n_evals, 40 * n_evals)
    assert (base.passes + fixed.passes, base.units + fixed.units) == (3 + 3 * 3 * 3, 40 * (3 + 3 * 3 * 3))
    assert math.isclose(plan.GPU_FLOPS, 5.02e14, rel_tol=0.01)


def test_plan_prints_each_notebook_and_the_gpu_time_of_a_7b_model(tmp_path, capsys):
    """A Mistral-7B configuration (no weights): 7.24e9 parameters; its statistics tokens on the H200 take
    tokens / 34.7k tokens/s."""
    import transformers
    transformers.MistralConfig().save_pretrained(tmp_path / "mistral")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "notebooks": ["02"], "lm": {
        "model": str(tmp_path / "mistral"), "tasks": ["code", "docs"], "stats_tokens": 34_700 * 60, "ctx": 1024}}))
    assert main(["plan", str(path), "--no-measure"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("02  lm   statistics"))
    assert f"{2 * 34_700 * 60:,d} tokens" in line and line.rstrip().endswith(" 2 min")    # 2 tasks x 60 s
    assert "notebook 02:" in out and "all:" in out


def test_plan_counts_the_paper_vit_notebooks_without_the_dataset(tmp_path, capsys, monkeypatch):
    """params/paper_vit_cifar100.yaml with a timm ViT-B/16: the 20 superclasses are known without downloading
    CIFAR-100, the model's size comes from timm's architecture alone (86,567,656 parameters, 196 patches + CLS)."""
    from modsep_nb import data
    monkeypatch.setattr(data, "cifar100", lambda *a, **k: pytest.fail("plan downloaded CIFAR-100"))
    from pathlib import Path
    params = yaml.safe_load((Path(__file__).parent.parent / "params" / "paper_vit_cifar100.yaml").read_text())
    params["vit"]["model"] = "timm:vit_base_patch16_224"
    params["notebooks"] = ["01"]
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["plan", str(path), "--no-measure"]) == 0
    out = capsys.readouterr().out
    stats = next(x for x in out.splitlines() if x.startswith("01  vit  statistics"))
    # 20 tasks x 3000 images in batches of 256: 12 batches a task
    gpu_s = 2 * 86_567_656 * 197 * 20 * 3000 / (2 * 7.24e9 * 34_700)
    assert " 240 " in stats and "60,000 images" in stats and stats.rstrip().endswith(f"{gpu_s:.1f} s")
    base = next(x for x in out.splitlines() if "unpruned accuracy" in x)
    assert " 40 " in base and "10,000 images" in base       # 10,000 test images, 500 a task: 2 batches each
    assert "notebook 01:" in out and "02  lm" not in out
    from modsep_nb import plan
    from modsep_nb.params import ParamsError
    with pytest.raises(ParamsError, match="timm has no architecture of that name"):
        plan.model_size({"vit": {"model": "timm:no_such_vit"}}, "vit")
