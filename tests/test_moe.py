"""Real mixture-of-experts models (modsep_nb.moe, issue #29): tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
saved into temporary folders; expert-unit statistics, routing counts and weights, and ablation inside experts
checked against hand computations from the models' own weights; the section end to end on params/smoke_moe.yaml."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BOS_ID, PAD_ID, VOCAB, VOCAB_SIZE, make_tokenizer, perturb_, random_texts
from modsep_nb import load_model
from modsep_nb.moe import (MoeSection, ablate_units, collect_moe_stats, moe_layers, permutation_null,
                           router_alignment, run_section, shape, unit_name)
from modsep_nb.params import load_params

ROOT = Path(__file__).resolve().parent.parent
E, K = 4, 2           # experts, experts per token


def _configs():
    import transformers
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=VOCAB["[EOS]"],
                num_experts_per_tok=K)
    return {  # class: (config, units per expert, MoE layers, top-k weights renormalised)
        "MixtralForCausalLM": (lambda: transformers.MixtralConfig(**base, intermediate_size=8, num_local_experts=E),
                               8, [0, 1], True),
        # layer 0 dense (mlp_only_layers), a shared expert beside the routed ones
        "Qwen2MoeForCausalLM": (lambda: transformers.Qwen2MoeConfig(
            **base, intermediate_size=12, moe_intermediate_size=4, shared_expert_intermediate_size=8, num_experts=E,
            mlp_only_layers=[0], norm_topk_prob=False), 4, [1], False),
        "Qwen3MoeForCausalLM": (lambda: transformers.Qwen3MoeConfig(
            **base, head_dim=8, intermediate_size=12, moe_intermediate_size=12, num_experts=E, norm_topk_prob=True),
            12, [0, 1], True),
        "OlmoeForCausalLM": (lambda: transformers.OlmoeConfig(**base, intermediate_size=8, num_experts=E,
                                                              norm_topk_prob=False), 8, [0, 1], False),
    }


MOE_CLASSES = tuple(_configs())


def save_moe(directory: Path, class_name: str, seed: int = 0) -> Path:
    import transformers
    torch.manual_seed(seed)
    model = perturb_(getattr(transformers, class_name)(_configs()[class_name][0]()), seed)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return Path(directory)


def char_tokenizer():
    """One id per printable ASCII character (the word-level test tokenizer reads the embedded domains as [UNK])."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """A tiny random Mixtral reading characters, for the section on the embedded text domains."""
    import transformers
    directory = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=8, num_local_experts=E,
                                        num_experts_per_tok=K, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = perturb_(transformers.MixtralForCausalLM(config), 0)
    with torch.no_grad():       # the logits follow the sign of one coordinate: " " or "e", so top-1 is not 0
        model.model.norm.weight[1:] = 0.01
        model.lm_head.weight[4 + ord(" ") - 32, 0], model.lm_head.weight[4 + ord("e") - 32, 0] = 20.0, -20.0
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("class_name", MOE_CLASSES)
def test_family_loads_with_its_experts(class_name, tmp_path):
    _, units, layers, _ = _configs()[class_name]
    handle = load_model(save_moe(tmp_path, class_name))
    assert type(handle.model).__name__ == class_name and handle.arch.moe == "mlp"
    assert moe_layers(handle) == layers and shape(handle) == (E, units, K)
    with pytest.raises(TypeError, match="mixture of experts.*modsep_nb.moe"):
        handle.neuron_module(0)             # the dense readers refuse, rather than read [T, d] as neurons
    assert unit_name(3, 1, 7) == "L3/E1/U7"


def _by_hand(handle, class_name, texts, skip_first: bool):
    """Per MoE layer and document: counted tokens, routed counts [E], routing weight sums [E], and the units
    [n, E, I] with a routed mask [n, E]; from the MoE block's input and the model's weights, not modsep_nb.moe."""
    _, units, layers, renorm = _configs()[class_name]
    tok = handle.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True)
    block_in = {}
    hooks = [handle.model.model.layers[l].mlp.register_forward_pre_hook(
        lambda m, a, l=l: block_in.__setitem__(l, a[0].detach().clone())) for l in layers]
    with torch.no_grad():
        handle.model(**enc)
    for h in hooks:
        h.remove()
    counted = enc["attention_mask"].bool()
    if skip_first:
        counted[:, 0] = False
    out = {}
    for l in layers:
        mlp = handle.model.model.layers[l].mlp
        x = block_in[l]                                          # [docs, seq, d]
        probs = torch.softmax(x @ mlp.gate.weight.T, -1)
        top, idx = probs.topk(K, -1)
        if renorm:
            top = top / top.sum(-1, keepdim=True)
        w = torch.zeros_like(probs).scatter(-1, idx, top)        # [docs, seq, E] routing weight, 0 if not chosen
        gate_up = torch.einsum("bsd,eid->bsei", x, mlp.experts.gate_up_proj)
        h = F.silu(gate_up[..., :units]) * gate_up[..., units:]    # [docs, seq, E, I]
        out[l] = (counted, w, h)
    return out


@pytest.mark.parametrize("class_name", MOE_CLASSES)
def test_statistics_and_routing_match_hand_computation(class_name, tmp_path):
    handle = load_model(save_moe(tmp_path, class_name))
    texts = random_texts(4, seed=1, min_len=5, max_len=12)      # one window each (ctx 32), docs 0-1 / 2-3 a block
    st = collect_moe_stats(handle, texts, ctx=32, batch_size=4, skip_positions=(0,), n_blocks=2)
    hand = _by_hand(handle, class_name, texts, skip_first=True)
    units = _configs()[class_name][1]
    for i, l in enumerate(st.layers):
        counted, w, h = hand[l]
        chosen = w > 0
        for block, docs in enumerate(([0, 1], [2, 3])):
            c = counted[docs]
            assert st.tokens[block, i] == c.sum()
            assert torch.equal(st.routed[block, i], chosen[docs][c].sum(0).double())
            torch.testing.assert_close(st.weight[block, i], w[docs][c].sum(0).double(), rtol=1e-5, atol=1e-6)
        flat_c = counted.reshape(-1)
        freq = chosen.reshape(-1, E)[flat_c].double().mean(0)
        torch.testing.assert_close(st.choice_frequency()[i], freq)
        assert torch.allclose(st.choice_frequency()[i].sum(), torch.tensor(float(K), dtype=torch.float64))
        rows_w = w.reshape(-1, E)[flat_c]
        rows_h = h.reshape(-1, E, units)[flat_c]
        ns = st.neuron_stats()
        for e in range(E):
            sel = rows_w[:, e] > 0
            torch.testing.assert_close(st.mean_weight()[i, e].float(), rows_w[sel, e].mean(), rtol=1e-5, atol=1e-6)
            mine = slice(e * units, (e + 1) * units)
            torch.testing.assert_close(ns.mean[i, mine].float(), rows_h[sel, e].mean(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ns.mean_abs[i, mine].float(), rows_h[sel, e].abs().mean(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ns.frac_pos[i, mine].float(), (rows_h[sel, e] > 0).float().mean(0))


@pytest.mark.parametrize("class_name", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_ablation_equals_zeroed_down_projection_columns(class_name, tmp_path):
    """Zeroing units inside experts gives the logits of a copy whose down_proj columns of those units are 0."""
    handle = load_model(save_moe(tmp_path, class_name))
    n_experts, units, _ = shape(handle)
    layers = moe_layers(handle)
    mask = torch.zeros(len(layers), n_experts * units, dtype=torch.bool)
    mask[0, [0, 3, units + 1, 3 * units + 2]] = True            # units of experts 0, 1 and 3
    mask[-1, 2 * units:2 * units + units // 2] = True           # half of expert 2
    enc = handle.tokenizer(random_texts(3, seed=2, min_len=6, max_len=10), return_tensors="pt", padding=True)
    zeroed = copy.deepcopy(handle.model)
    with torch.no_grad():
        for i, l in enumerate(layers):
            down = zeroed.model.layers[l].mlp.experts.down_proj        # [E, d, I]
            for e in range(n_experts):
                down[e][:, mask[i, e * units:(e + 1) * units]] = 0.0
        expected = zeroed(**enc).logits
        intact = handle.model(**enc).logits
        with ablate_units(handle, mask):
            ablated = handle.model(**enc).logits
        after = handle.model(**enc).logits
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(ablated[keep], expected[keep], rtol=1e-4, atol=1e-5)
    assert (ablated[keep] - intact[keep]).abs().max() > 1e-3      # the ablation changed something
    assert torch.equal(after, intact)                              # and the hooks are gone
    with pytest.raises(ValueError, match="MoE layers, experts x units"):
        with ablate_units(handle, mask[:, :-1]):
            pass


def test_router_alignment_and_its_permutation_null():
    counts = torch.tensor([[2.0, 0.0], [0.0, 1.0]])       # task units: 2 in L0/E0, 1 in L1/E1
    share = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    # E x mean routing share of the units' experts: 2 * (2 * 0.75 + 1 * 0.5) / 3
    assert router_alignment(counts, share) == pytest.approx(4 / 3)
    null = permutation_null(counts, share, 200, seed=0)
    # layer 0 kept or swapped (layer 1 is symmetric): 4/3 or 2 * (2 * 0.25 + 0.5) / 3
    assert set(np.round(null, 6)) == {round(4 / 3, 6), round(2 / 3, 6)}
    assert null.mean() == pytest.approx(1.0, abs=0.15)           # chance is 1 under any permutation


def test_section_skipped_in_one_line(capsys):
    params = load_params(ROOT / "params" / "smoke_moe.yaml")
    assert run_section(params) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "lm.moe_model" in out[0] and "skipped" in out[0]


NOTEBOOK_05 = ROOT / "notebooks" / "05_layerwise_correspondence.ipynb"


def test_section_end_to_end_on_smoke_moe(mixtral_dir, tmp_path, capsys):
    import json
    from modsep_nb.report import Report
    report = Report("05_layerwise_correspondence", ROOT / "params" / "smoke_moe.yaml", tmp_path / "s9-moe",
                    {"lm": {"moe_model": str(mixtral_dir)}})
    params = report.params
    # notebook 05's own MoE cell, run as the notebook runs it (its params and report)
    cell = next("".join(c["source"]) for c in json.loads(NOTEBOOK_05.read_text())["cells"]
                if c["cell_type"] == "code" and "run_section(params, report)" in "".join(c["source"]))
    namespace = {"params": params, "report": report}
    exec(cell, namespace)
    moe = namespace["moe"]
    assert isinstance(moe, MoeSection)
    res = moe.results()
    tasks = params["lm"]["tasks"]
    assert res["tasks"] == tasks and res["layers"] == [0, 1] and (res["n_experts"], res["top_k"]) == (E, K)
    for t in tasks:
        torch.testing.assert_close(res["choice_frequency"][t].sum(1), torch.full((2,), float(K), dtype=torch.float64))
        n_sel = int(moe.masks[t].sum())
        assert n_sel == int(round(0.05 * 2 * E * 8)) and all(n.startswith("L") for n in res["top_units"][t])
    assert all(res["unpruned_top1"][t] > 0 for t in tasks)        # seeded: a ratio for every task
    assert res["ablation"].shape == (len(tasks), len(tasks)) and np.isfinite(res["ablation"]).all()
    assert res["ablation_random"].shape == (len(tasks), len(tasks))
    claim = res["claim"]
    assert claim["id"] == "moe_router_neurons" and claim["null"] == 1.0 and set(claim["per_task"]) == set(tasks)
    lo, hi = claim["ci"]
    assert lo <= hi and claim["p"] >= 1 / 51
    # the estimate is the mean over tasks of their alignment, each recomputed from the masks and routing shares
    by_hand = np.mean([router_alignment(moe.masks[t].view(2, E, 8).sum(-1).double(),
                                        moe.stats[t].routing_share()) for t in tasks])
    assert claim["estimate"] == pytest.approx(by_hand)
    assert "Router alignment" in capsys.readouterr().out
    assert [c.id for c in report.claims] == ["moe_router_neurons"]       # in the notebook's family
    saved = json.loads(report.save({"moe": res}).read_text())
    assert saved["moe"]["top_k"] == K and saved["claims"][0]["id"] == "moe_router_neurons"


def test_moe_model_must_be_a_name_or_folder_of_a_mixture_of_experts(tmp_path):
    from conftest import save_hf_lm
    from modsep_nb.params import ParamsError
    with pytest.raises(ParamsError, match="lm.moe_model"):
        load_params(ROOT / "params" / "smoke_moe.yaml", {"lm": {"moe_model": 5}})
    dense = save_hf_lm(tmp_path / "llama", "LlamaForCausalLM")
    params = load_params(ROOT / "params" / "smoke_moe.yaml", {"lm": {"moe_model": str(dense)}})
    with pytest.raises(TypeError, match="not a mixture of experts.*lm.moe_model"):
        MoeSection(params)
