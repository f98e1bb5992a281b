"""Results other tools can read: a study's per-neuron scores, statistics and selected sets as one tidy table
(one row per model, layer, neuron, task and statistic; Parquet, or CSV), and its selected sets as masks whose
sites are named as TransformerLens names them (`blocks.{layer}.mlp.hook_post`: the MLP's hidden vector, the
input of its output projection, which is what modsep calls the neurons).

    write_exports(study, out_dir, "02_mistral_pruning", frac=0.01)   # exports/02_mistral_pruning_{neurons,masks}.*
    table = neuron_table(study, frac=0.01)                           # a pandas DataFrame
    masks = load_masks("exports/02_mistral_pruning_masks.json")     # {task: bool [n_layers, d_mlp]}
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from .files import atomic_file, write_text_atomic
from .pruning import SELECTION_MODES, as_mask

COLUMNS = ("model", "layer", "neuron", "task", "statistic", "value", "selected", "rank")
# "score": the selective-pruning score the sets are selected by; the rest are NeuronStats' per-neuron statistics
STATISTICS = ("score", "mean", "mean_abs", "mean_sq", "frac_pos", "mean_sqrt", "std")
SITE = "blocks.{layer}.mlp.hook_post"


def site_name(layer: int) -> str:
    """TransformerLens's name for layer `layer`'s MLP hidden vector."""
    return SITE.format(layer=layer)


def score_ranks(scores: torch.Tensor, mode: str = "global") -> torch.Tensor:
    """Rank [L, d_mlp] (int64, 1 = first) of each neuron in the order select_neurons takes them: by score,
    ties by lower index; over all neurons ("global") or within its layer ("per_layer"). So the top-k set of
    select_neurons is exactly rank <= k (k per layer for per_layer)."""
    if mode not in SELECTION_MODES:
        raise ValueError(f"unknown selection mode {mode!r}: choose one of {', '.join(SELECTION_MODES)}")
    rows = scores.detach().to(torch.float64)
    rows = rows.reshape(1, -1) if mode == "global" else rows
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices     # stable: lower index first on ties
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, rows.shape[1] + 1).expand_as(order).contiguous())
    return ranks.reshape(scores.shape)


def neuron_table(study, frac: float, *, masks: dict | None = None):
    """The tidy table of `study`: per task, layer, neuron and statistic (STATISTICS) its value, whether the
    neuron is in the task's selected set (`masks`, default study.masks(frac): the params' selection mode) and
    its rank by the task's score under that mode. A pandas DataFrame with COLUMNS, rows ordered by task,
    statistic, layer, neuron."""
    import pandas as pd
    stats, scores = study.stats(progress=False), study.scores()
    masks = study.masks(frac) if masks is None else masks
    mode = study.params["pruning"]["mode"]
    parts = []
    for task in study.task_names:
        st, mask = stats[task], as_mask(masks[task], f"masks[{task!r}]")
        n_layers, d_mlp = st.mean.shape
        values = {"score": scores[task], **{name: getattr(st, name) for name in STATISTICS[1:]}}
        n = n_layers * d_mlp
        parts.append(pd.DataFrame({
            "task": task, "statistic": np.repeat(STATISTICS, n),
            "layer": np.tile(np.repeat(np.arange(n_layers), d_mlp), len(STATISTICS)),
            "neuron": np.tile(np.arange(d_mlp), n_layers * len(STATISTICS)),
            "value": torch.cat([values[s].detach().to(torch.float64).flatten().cpu() for s in STATISTICS]).numpy(),
            "selected": np.tile(mask.flatten().cpu().numpy(), len(STATISTICS)),
            "rank": np.tile(score_ranks(scores[task], mode).flatten().numpy(), len(STATISTICS))}))
    table = pd.concat(parts, ignore_index=True)
    table.insert(0, "model", study.label)
    for column in ("model", "task", "statistic"):        # few distinct values: small in memory and on disk
        table[column] = table[column].astype("category")
    return table[list(COLUMNS)]


def mask_record(handle, masks: dict, **settings) -> dict:
    """Selected sets as JSON-able masks: {"masks": {task: {site: [neuron, ...]}}} with TransformerLens site
    names for every layer, "modules": {site: the transformers (or timm) module whose input is that vector}
    (where nnsight and plain torch hooks attach), the model's identity and `settings` (frac, mode, ...)."""
    names = {id(module): name for name, module in handle.model.named_modules()}
    record = {"model": handle.label, "class": type(handle.model).__name__, "kind": handle.kind,
              "n_layers": handle.n_layers, "d_mlp": handle.d_mlp, **settings, "site": SITE,
              "modules": {site_name(layer): names[id(handle.neuron_module(layer))] for layer in range(handle.n_layers)},
              "masks": {}}
    for task, mask in masks.items():
        mask = as_mask(mask, f"masks[{task!r}]")
        record["masks"][task] = {site_name(layer): torch.nonzero(mask[layer]).flatten().tolist()
                                 for layer in range(handle.n_layers)}
    return record


def load_masks(path) -> dict[str, torch.Tensor]:
    """The masks of an exported masks file: {task: bool [n_layers, d_mlp]}, for `ablate` and the like."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    out = {}
    for task, sites in record["masks"].items():
        mask = torch.zeros(record["n_layers"], record["d_mlp"], dtype=torch.bool)
        for layer in range(record["n_layers"]):
            mask[layer, sites[site_name(layer)]] = True
        out[task] = mask
    return out


def write_exports(study, out_dir, name: str, frac: float) -> dict[str, Path]:
    """Write out_dir/exports/<name>_neurons.parquet (.csv.gz where pyarrow is missing: the same table) and
    out_dir/exports/<name>_masks.json, the top-`frac` sets by the study's selection settings."""
    folder = Path(out_dir) / "exports"
    masks = study.masks(frac)
    table = neuron_table(study, frac, masks=masks)
    parquet = importlib.util.find_spec("pyarrow") is not None      # pyarrow comes with `datasets`
    table_path = folder / f"{name}_neurons.{'parquet' if parquet else 'csv.gz'}"
    with atomic_file(table_path) as tmp:          # a killed run never leaves half a table
        if parquet:
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, compression="gzip")
    pr = study.params["pruning"]
    record = mask_record(study.handle, masks, frac=frac, mode=pr["mode"], importance=pr["importance"],
                         retain=pr["retain"])
    masks_path = folder / f"{name}_masks.json"
    write_text_atomic(masks_path, json.dumps(record, indent=1))
    return {"neurons": table_path, "masks": masks_path}
