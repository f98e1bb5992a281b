"""docs/method.md §11 is a contract: notebooks, users and outside checks call these names with these meanings."""
import inspect

import torch

import modsep_nb
import modsep_nb as ms


def test_public_names_exist_with_their_signatures():
    for name in ("load_model", "collect_stats", "prune_scores", "select_neurons", "ablate", "evaluate",
                 "overlap", "balanced_kmeans", "NeuronStats", "ModelHandle"):
        assert hasattr(modsep_nb, name), name
    params = inspect.signature(ms.load_model).parameters
    assert {"device", "dtype", "random_init", "seed"} <= set(params)
    assert {"max_tokens", "batch_size"} <= set(inspect.signature(ms.collect_stats).parameters)
    assert inspect.signature(ms.prune_scores).parameters["importance"].default == "abs"
    assert inspect.signature(ms.prune_scores).parameters["eps"].default == 1e-3
    assert inspect.signature(ms.select_neurons).parameters["mode"].default == "global"
    assert inspect.signature(ms.balanced_kmeans).parameters["seed"].default == 0


def test_overlap_function_per_spec():
    a = torch.zeros(2, 10, dtype=torch.bool)
    b = torch.zeros(2, 10, dtype=torch.bool)
    a[0, :4] = True            # |A| = 4
    b[0, 2:5] = True           # |B| = 3, |A∩B| = 2, |A∪B| = 5
    assert ms.overlap(a, b) == 2 / 3
    assert ms.overlap(a, b, metric="jaccard") == 2 / 5
    per_layer = ms.overlap(a, b, per_layer=True)
    assert per_layer[0] == 2 / 3 and torch.isnan(per_layer[1])
    names, m = ms.overlaps.overlap_matrix({"a": a, "b": b})     # the module of overlap tools
    assert names == ["a", "b"] and m[0, 1] == 2 / 3


def test_handle_and_stats_attributes(tiny_llama, tokenizer):
    h = tiny_llama
    assert h.kind == "lm" and h.tokenizer is not None and isinstance(h.model, torch.nn.Module)
    assert h.w_in(0).shape[0] == h.d_mlp and h.n_layers >= 1
    stats = ms.collect_stats(h, ["w01 w02 w03", "w04 w05"], progress=False)
    for name in ("count", "mean", "mean_abs", "mean_sq", "frac_pos", "mean_sqrt"):
        t = getattr(stats, name)
        assert t.dtype == torch.float64
        assert t.shape == ((h.n_layers,) if name == "count" else (h.n_layers, h.d_mlp))
    assert stats.std.shape == stats.rms.shape == (h.n_layers, h.d_mlp)
