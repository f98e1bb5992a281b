"""benchmarks/peers.py (issue #30): modsep, nnsight and TransformerLens measure the same thing, on a tiny Llama.
And the README's snippets that apply an exported modsep mask with those libraries run and do what they say."""
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_texts, save_hf_lm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import peers  # noqa: E402

MISSING = peers.missing_peers()
needs_peers = pytest.mark.skipif(bool(MISSING), reason="; ".join(MISSING.values()) or "ok")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from modsep_nb import load_model
    handle = load_model(save_hf_lm(tmp_path_factory.mktemp("peers-llama"), "LlamaForCausalLM", seed=3))
    docs = random_texts(30, seed=5, min_len=3, max_len=25)
    batches = peers.windows(handle.tokenizer, docs, max_tokens=200, ctx=12, batch_size=4)
    return handle, docs, batches, peers.peer_models(handle.model, handle.tokenizer)


def expected_stats(handle, batches):
    """Independent of every collector: capture the down-projection inputs, drop padding and position 0 by
    hand, and average in float64."""
    rows = {layer: [] for layer in range(handle.n_layers)}
    for ids, mask, _ in batches:
        got = {}
        hooks = [handle.model.model.layers[l].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(l, a[0].detach())) for l in rows]
        with torch.no_grad():
            handle.model(input_ids=ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        for l in rows:
            for b in range(ids.shape[0]):
                n = int(mask[b].sum())
                rows[l].append(got[l][b, 1:n].double())     # right-padded: real tokens 0..n-1, skip position 0
    x = {l: torch.cat(r) for l, r in rows.items()}
    return {"mean": torch.stack([x[l].mean(0) for l in x]), "mean_abs": torch.stack([x[l].abs().mean(0) for l in x]),
            "mean_sq": torch.stack([(x[l] ** 2).mean(0) for l in x]),
            "frac_pos": torch.stack([(x[l] > 0).double().mean(0) for l in x])}


@needs_peers
def test_three_collectors_give_the_same_statistics(setup):
    handle, docs, batches, models = setup
    want = expected_stats(handle, batches)
    assert any(bool((m.sum(1) < m.shape[1]).any()) for _, m, _ in batches)   # padding is there to be left out
    got = {"modsep": peers.modsep_stats(handle, batches),
           "nnsight": peers.nnsight_stats(models["nnsight"], batches),
           "nnsight_saved": peers.nnsight_stats(models["nnsight"], batches, reduce_inside=False),
           "tl_hooks": peers.tl_stats(models["tl"], batches),
           "tl_cache": peers.tl_stats(models["tl"], batches, cache=True)}
    for name, stats in got.items():
        for key in peers.STATS:
            torch.testing.assert_close(stats[key].double(), want[key], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
    # and the windows are what the package's own entry point reads
    from modsep_nb import collect_stats
    pkg = collect_stats(handle, docs, max_tokens=200, ctx=12, batch_size=4, skip_positions=(0,), progress=False)
    torch.testing.assert_close(pkg.mean, want["mean"], rtol=1e-5, atol=1e-5)


@needs_peers
def test_three_ablations_give_the_same_accuracy(setup):
    handle, docs, batches, models = setup
    masks = peers.random_masks(handle.n_layers, handle.d_mlp, 3, frac=0.4, seed=1)
    masks[0][:] = False                                       # the unablated model among them
    bos = handle.tokenizer.bos_token_id

    def expected(mask):                                      # zero the weights' columns instead of hooking
        model = __import__("copy").deepcopy(handle.model)
        n = hits = 0
        with torch.no_grad():
            for l, row in enumerate(mask):
                model.model.layers[l].mlp.down_proj.weight[:, row] = 0
            for ids, attn, _ in batches:
                a, b = peers.top1_hits(model(input_ids=ids, attention_mask=attn).logits, ids, attn, bos)
                n, hits = n + a, hits + b
        return hits / n
    want = [expected(m) for m in masks]
    assert len(set(want)) > 1                                 # the masks change the accuracy: a real check
    assert peers.modsep_ablation(handle, batches, masks) == want
    assert peers.nnsight_ablation(models["nnsight"], batches, masks, bos) == want
    assert peers.tl_ablation(models["tl"], batches, masks, bos) == want
    from modsep_nb import ablate, evaluate
    with ablate(handle, masks[1]):
        assert evaluate(handle, docs, max_tokens=200, ctx=12, batch_size=4)["top1"] == pytest.approx(want[1])


def _readme_snippet(library: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if f"from {library}" in b)


@needs_peers
@pytest.mark.parametrize("library", ["transformer_lens", "nnsight"])
def test_readme_mask_snippets_run_and_zero_the_masked_neurons(library, tmp_path, monkeypatch):
    """The README's snippet, run as written except for the model (a tiny local Llama for the hub id) and the
    masks file (one written here): its logits are those of the model with the masked neurons' weights zeroed."""
    from transformers import AutoModelForCausalLM
    model_dir = save_hf_lm(tmp_path / "model", "LlamaForCausalLM", seed=4)
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    neurons = {"blocks.0.mlp.hook_post": [1, 5, 7], "blocks.1.mlp.hook_post": [0, 2]}
    masks = tmp_path / "outputs/default/exports/02_mistral_pruning_masks.json"
    masks.parent.mkdir(parents=True)
    masks.write_text(json.dumps({"masks": {"code": neurons},
                                 "modules": {s: f"model.layers.{s.split('.')[1]}.mlp.down_proj" for s in neurons}}))
    monkeypatch.chdir(tmp_path)
    code = _readme_snippet(library).replace('"mistralai/Mistral-7B-v0.1"', repr(str(model_dir)))
    assert str(model_dir) in code
    snippet = tmp_path / f"readme_{library}.py"           # nnsight reads a trace's body from its source file
    snippet.write_text(code)
    scope = runpy.run_path(str(snippet))
    model = scope["model"]                                    # the snippet's tokens: TransformerLens adds BOS itself
    tokens = (model.to_tokens("def add(a, b):") if library == "transformer_lens" else
              model.tokenizer("def add(a, b):", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        for site, idx in neurons.items():
            hf.model.layers[int(site.split(".")[1])].mlp.down_proj.weight[:, idx] = 0
        want = hf(input_ids=tokens).logits
    got = scope["logits"]
    got = getattr(got, "logits", got)
    assert got.shape[-2:] == want.shape[-2:]
    torch.testing.assert_close(got.reshape(want.shape).float(), want, rtol=1e-4, atol=1e-4)
