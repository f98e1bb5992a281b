"""Results other tools can read (issue #29, 3): the tidy per-neuron table and the masks with TransformerLens
site names, checked against a Study's own tensors; the smoke run's exports read back; the README's
TransformerLens and nnsight snippets (neither library is installed here) checked for syntax."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modsep_nb.export import (COLUMNS, STATISTICS, load_masks, neuron_table, score_ranks, site_name,
                              write_exports)
from modsep_nb.params import load_params
from modsep_nb.pruning import ablate, n_selected, select_neurons, task_scores
from modsep_nb.statistics import NeuronStats
from modsep_nb.study import Study

README = Path(__file__).resolve().parent.parent / "README.md"


def _ranks_by_hand(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Python's sort on (-score, index): the order select_neurons takes neurons in."""
    rows = [scores.flatten().tolist()] if mode == "global" else scores.tolist()
    out = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        ranks = [0] * len(row)
        for r, i in enumerate(order, 1):
            ranks[i] = r
        out.append(ranks)
    return torch.tensor(out).reshape(scores.shape)


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_ranks_follow_select_neurons_order_ties_included(mode):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (3, 10), generator=gen).double()        # many ties
    ranks = score_ranks(scores, mode)
    assert torch.equal(ranks, _ranks_by_hand(scores, mode))
    for frac in (0.1, 0.3, 0.5):
        k = n_selected(scores.numel() if mode == "global" else scores.shape[1], frac)
        assert torch.equal(select_neurons(scores, frac, mode), ranks <= k)
    with pytest.raises(ValueError, match="unknown selection mode 'layer'"):
        score_ranks(scores, "layer")


def _study(tmp_path, llama_dir, mode="global"):
    params = load_params(None, {"cache_dir": str(tmp_path / "cache"), "device": "cpu",
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law", "licenses"],
                                       "stats_tokens": 48, "eval_tokens": 24, "ctx": 16, "batch_size": 4},
                                "pruning": {"mode": mode}})
    return Study.from_params(params, "lm")


def check_exported(table: pd.DataFrame, record: dict, stats: dict, scores: dict, frac: float, mode: str,
                   model: str) -> None:
    """An exported table and masks record hold these statistics and scores (computed by the caller from the
    study's own tensors), the top-`frac` sets by `mode`, and the ranks in select_neurons' order."""
    tasks = list(stats)
    n_layers, d_mlp = next(iter(stats.values())).mean.shape
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(tasks) * len(STATISTICS) * n_layers * d_mlp
    assert set(table["model"]) == {model} and set(table["task"]) == set(tasks)
    masks = load_masks_record(record)
    assert record["site"] == "blocks.{layer}.mlp.hook_post" and record["frac"] == frac and record["mode"] == mode
    for task in tasks:
        st, expected_mask = stats[task], select_neurons(scores[task], frac, mode)
        assert torch.equal(masks[task], expected_mask)
        n = st.count.unsqueeze(1)           # tokens (images) per layer; std is the unbiased sample std
        by_hand = {"score": scores[task], "mean": st.mean, "mean_abs": st.mean_abs, "mean_sq": st.mean_sq,
                   "frac_pos": st.frac_pos, "mean_sqrt": st.mean_sqrt,
                   "std": ((st.mean_sq - st.mean ** 2) * n / (n - 1)).clamp_min(0).sqrt()}
        rows = table[table["task"] == task]
        for statistic in STATISTICS:
            part = rows[rows["statistic"] == statistic]
            grid = np.full((n_layers, d_mlp), np.nan)
            grid[part["layer"].to_numpy(), part["neuron"].to_numpy()] = part["value"].to_numpy()
            np.testing.assert_allclose(grid, by_hand[statistic].numpy(), rtol=1e-12, atol=0, err_msg=statistic)
            selected = np.zeros((n_layers, d_mlp), dtype=bool)
            selected[part["layer"].to_numpy(), part["neuron"].to_numpy()] = part["selected"].to_numpy()
            assert np.array_equal(selected, expected_mask.numpy())
            rank = np.zeros((n_layers, d_mlp), dtype=np.int64)
            rank[part["layer"].to_numpy(), part["neuron"].to_numpy()] = part["rank"].to_numpy()
            assert np.array_equal(rank, _ranks_by_hand(scores[task], mode).numpy())


def load_masks_record(record: dict) -> dict:
    """The masks of a record, read by hand from its site names (independently of export.load_masks)."""
    out = {}
    for task, sites in record["masks"].items():
        mask = torch.zeros(record["n_layers"], record["d_mlp"], dtype=torch.bool)
        for site, neurons in sites.items():
            layer = int(re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", site).group(1))
            mask[layer, neurons] = True
        out[task] = mask
    return out


@pytest.mark.parametrize("mode", ["global", "per_layer"])
def test_exports_hold_the_studys_own_tensors(tmp_path, llama_dir, mode):
    study = _study(tmp_path, llama_dir, mode)
    paths = write_exports(study, tmp_path / "run", "02_mistral_pruning", 0.1)
    assert paths["neurons"] == tmp_path / "run" / "exports" / "02_mistral_pruning_neurons.parquet"
    table = pd.read_parquet(paths["neurons"])
    record = json.loads(paths["masks"].read_text())
    check_exported(table, record, study.stats(), study.scores(), 0.1, mode, study.label)
    assert all(torch.equal(m, study.masks(0.1)[t]) for t, m in load_masks(paths["masks"]).items())
    # in memory, the same table
    pd.testing.assert_frame_equal(neuron_table(study, 0.1), table, check_categorical=False)
    # the sites name the modules whose input they are (where nnsight or a torch hook attaches)
    assert record["modules"] == {site_name(l): f"model.layers.{l}.mlp.down_proj" for l in range(2)}
    assert not [p for p in paths["neurons"].parent.iterdir() if p.name.startswith(".")]     # no temporaries


def test_an_exported_mask_applied_by_plain_hooks_equals_ablate(tmp_path, llama_dir):
    """What the README does with TransformerLens or nnsight, done with torch hooks on the modules the record
    names: zeroing the listed neurons of each site gives exactly modsep's ablation."""
    study = _study(tmp_path, llama_dir)
    record = json.loads(write_exports(study, tmp_path / "run", "x", 0.2)["masks"].read_text())
    model, task = study.handle.model, "law"
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])

    def zero(neurons):
        def hook(module, args):
            x = args[0].clone()
            x[..., neurons] = 0.0
            return (x,)
        return hook
    handles = [model.get_submodule(record["modules"][site]).register_forward_pre_hook(zero(neurons))
               for site, neurons in record["masks"][task].items()]
    with torch.no_grad():
        try:
            hooked = model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
        with ablate(study.handle, study.masks(0.2)[task]):
            expected = model(input_ids=ids).logits
        clean = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, expected, rtol=0, atol=0)
    assert not torch.allclose(hooked, clean)


def test_readme_snippets_for_transformerlens_and_nnsight_are_valid_python():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    for library in ("transformer_lens", "nnsight"):
        snippets = [b for b in blocks if f"from {library}" in b or f"import {library}" in b]
        assert snippets, f"the README shows how to apply a modsep mask with {library}"
        for code in snippets:
            compile(ast.parse(code), f"README ({library})", "exec")
            assert "load_masks" in code or "_masks.json" in code


def check_run_exports(run: Path, params: dict) -> None:
    """A run folder's exports for notebooks 01 and 02 against the run's own saved statistics."""
    from modsep_nb.files import file_name
    pr = params["pruning"]
    for name, kind in (("01_vit_pruning", "vit"), ("02_mistral_pruning", "lm")):
        saved = json.loads((run / "statistics" / f"{name}.json").read_text())
        stats = {t: NeuronStats.load(run / "statistics" / f"{kind}-{file_name(t)}.safetensors") for t in saved["tasks"]}
        scores = task_scores(stats, importance=pr["importance"], eps=pr["eps"], eps_relative=pr["eps_relative"],
                             retain=pr["retain"])
        table = pd.read_parquet(run / "exports" / f"{name}_neurons.parquet")
        record = json.loads((run / "exports" / f"{name}_masks.json").read_text())
        check_exported(table, record, stats, scores, pr["frac"], pr["mode"], saved["model"])


def test_smoke_run_writes_exports_that_hold_its_statistics(smoke_run):
    from notebook_pipeline import SMOKE_PARAMS
    check_run_exports(smoke_run, load_params(SMOKE_PARAMS))
