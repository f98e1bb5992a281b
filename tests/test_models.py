"""Model adapters (docs/method.md §1, §6, §9, §11): every architecture in ARCHITECTURES, loaded from a tiny random
model saved locally; clear errors for unknown architectures and unreachable hub ids; seeded random-init
controls; and the embedded LM."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import (HF_LM_CLASSES, TIMM_CLASSES, perturb_, save_hf_lm, save_hf_vit, save_timm)
from modsep_nb import ARCHITECTURES, load_model
from modsep_nb.models import ModelNotAvailableError, UnknownArchitectureError, get_attr

ALL_CLASSES = (*HF_LM_CLASSES, "ViTForImageClassification", *TIMM_CLASSES)

# where each family's activation function and (for gated MLPs) gate projection live, inside a block --
# used to recompute the neuron vector from the W_in projection's input, independently of the adapter
MLP_PARTS = {
    "MistralForCausalLM": ("mlp.act_fn", "mlp.gate_proj"), "LlamaForCausalLM": ("mlp.act_fn", "mlp.gate_proj"),
    "Qwen2ForCausalLM": ("mlp.act_fn", "mlp.gate_proj"), "GemmaForCausalLM": ("mlp.act_fn", "mlp.gate_proj"),
    "Gemma2ForCausalLM": ("mlp.act_fn", "mlp.gate_proj"), "GPT2LMHeadModel": ("mlp.act", None), "GPTNeoXForCausalLM": ("mlp.act", None),
    "Gemma3ForCausalLM": ("mlp.act_fn", "mlp.gate_proj"), "Qwen3ForCausalLM": ("mlp.act_fn", "mlp.gate_proj"),
    "Olmo2ForCausalLM": ("mlp.act_fn", "mlp.gate_proj"),
    # Phi-3 fuses [gate; up] in one Linear of 2 x 24 rows: the gate is its first 24 rows
    "Phi3ForCausalLM": ("mlp.activation_fn", ("mlp.gate_up_proj", slice(0, 24))),
    "T5EncoderModel": ("layer.1.DenseReluDense.act", "layer.1.DenseReluDense.wi_0"),
    "BertForMaskedLM": ("intermediate.intermediate_act_fn", None), "BertModel": ("intermediate.intermediate_act_fn",
                                                                                  None),
    "RobertaForMaskedLM": ("intermediate.intermediate_act_fn", None),
    "RobertaModel": ("intermediate.intermediate_act_fn", None),
    "ViTForImageClassification": ("intermediate.intermediate_act_fn|mlp.activation_fn", None),
    "VisionTransformer": ("mlp.act", None), "VisionTransformerDistilled": ("mlp.act", None),
}
D_MODEL = {**dict.fromkeys(HF_LM_CLASSES, 16), "ViTForImageClassification": 16,
           **dict.fromkeys(TIMM_CLASSES, 32)}
D_MLP = {**dict.fromkeys(HF_LM_CLASSES, 24), "ViTForImageClassification": 24, **dict.fromkeys(TIMM_CLASSES, 128)}


def _save(directory, class_name, seed=0):
    if class_name in HF_LM_CLASSES:
        return save_hf_lm(directory, class_name, seed=seed)
    if class_name == "ViTForImageClassification":
        return save_hf_vit(directory, seed=seed, num_channels=3)
    return save_timm(directory, class_name, seed=seed)


def _forward(handle):
    with torch.no_grad():
        if handle.kind == "lm":
            ids = torch.tensor([[2, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15, 16]])
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        else:
            handle.image_logits(torch.randn(2, *handle.image_shape, generator=torch.Generator().manual_seed(0)))


def test_every_architecture_is_covered_by_these_tests():
    from test_moe import MOE_CLASSES            # the mixtures of experts are tested there (modsep_nb.moe)
    assert set(ARCHITECTURES) == set(ALL_CLASSES) | set(MOE_CLASSES)


@pytest.mark.parametrize("class_name", ALL_CLASSES)
def test_adapter_shapes_and_neuron_location(class_name, tmp_path):
    handle = load_model(_save(tmp_path / class_name, class_name))
    assert type(handle.model).__name__ == class_name
    assert handle.kind == ("lm" if class_name in HF_LM_CLASSES else "image")
    assert handle.n_layers == 2
    assert handle.d_mlp == D_MLP[class_name]
    for layer in range(2):
        assert tuple(handle.w_in(layer).shape) == (D_MLP[class_name], D_MODEL[class_name])
    if handle.kind == "lm":
        assert handle.tokenizer is not None and handle.tokenizer.pad_token_id is not None

    _assert_hooked_vector_is_the_mlp_hidden_vector(handle, class_name, *MLP_PARTS[class_name])


def test_t5_v1_0_plain_mlp(tmp_path):
    """T5 v1.0's ungated MLP (wi, ReLU, wo) behind the same ARCHITECTURES entry as Flan-T5's gated one."""
    import transformers
    config = transformers.T5Config(vocab_size=64, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2,
                                   feed_forward_proj="relu", pad_token_id=0, eos_token_id=3)
    model = transformers.T5EncoderModel(config)
    assert not hasattr(model.encoder.block[0].layer[1].DenseReluDense, "wi_0")      # the plain variant
    save_hf_lm(tmp_path, "T5EncoderModel")       # for its tokenizer; the model is replaced below
    perturb_(model, 1).save_pretrained(tmp_path)
    handle = load_model(tmp_path)
    assert handle.d_mlp == 24 and torch.equal(handle.w_in(0), model.encoder.block[0].layer[1].DenseReluDense.wi.weight)
    _assert_hooked_vector_is_the_mlp_hidden_vector(handle, "T5EncoderModel", "layer.1.DenseReluDense.act", None)


def _assert_hooked_vector_is_the_mlp_hidden_vector(handle, class_name, act_path, gate_path):
    """The neuron vector captured by the handle equals act(W_in x + b), or act(W_gate x) * (W_in x) for gated
    MLPs, computed by hand from the model's own weights and the input x of its W_in projection. gate_path:
    a module path, or (path, row slice) for a gate fused with W_in in one Linear."""
    # capture the neuron vector (handle.capture), and the input of the W_in projection with a plain torch hook
    proj_in = {}
    hooks = [get_attr(handle.blocks[layer], ARCHITECTURES[class_name].w_in).register_forward_pre_hook(
        lambda m, a, layer=layer: proj_in.__setitem__(layer, a[0].detach().clone())) for layer in range(handle.n_layers)]
    mlp_in = {}
    try:
        with handle.capture() as captured, handle.hooks(
                {layer: (lambda x, layer=layer: mlp_in.__setitem__(layer, x.detach().clone()))
                 for layer in range(handle.n_layers)}, at="mlp_input"):
            _forward(handle)
    finally:
        for h in hooks:
            h.remove()
    neuron_in = {layer: rows[0] for layer, rows in captured.items()}
    for layer in range(handle.n_layers):          # handle.hooks(at="mlp_input") reads W_in's input
        assert torch.equal(mlp_in[layer], proj_in[layer]) and mlp_in[layer].shape[-1] == D_MODEL[class_name]
    assert sorted(neuron_in) == [0, 1] and all(len(rows) == 1 for rows in captured.values())
    for layer in range(handle.n_layers):
        assert neuron_in[layer].shape[-1] == handle.d_mlp
        # recompute the neuron vector: act(W_in x + b) or act(W_gate x) * (W_in x)
        block = handle.blocks[layer]
        w_in_module = get_attr(block, ARCHITECTURES[class_name].w_in)
        pre = F.linear(proj_in[layer], handle.w_in(layer), getattr(w_in_module, "bias", None))
        act = get_attr(block, act_path)
        if gate_path is None:
            expected = act(pre)
        else:
            path, rows = gate_path if isinstance(gate_path, tuple) else (gate_path, slice(None))
            expected = act(F.linear(proj_in[layer], get_attr(block, path).weight[rows])) * pre
        torch.testing.assert_close(neuron_in[layer], expected, rtol=1e-5, atol=1e-6)


def test_a_transformers_object_the_user_holds(tmp_path):
    """README: `load_model(model, tokenizer=tokenizer)` on a model loaded by transformers itself."""
    import transformers
    folder = save_hf_lm(tmp_path / "qwen3", "Qwen3ForCausalLM")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    handle = load_model(model, tokenizer=tokenizer)
    assert handle.model is model and handle.tokenizer is tokenizer and handle.name == "Qwen3ForCausalLM"
    assert torch.equal(handle.w_in(1), model.model.layers[1].mlp.up_proj.weight)
    _assert_hooked_vector_is_the_mlp_hidden_vector(handle, "Qwen3ForCausalLM", *MLP_PARTS["Qwen3ForCausalLM"])


def test_models_command_lists_every_supported_class(capsys):
    from modsep_nb.__main__ import main
    assert main(["models"]) == 0
    from test_moe import MOE_CLASSES
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{len(ALL_CLASSES) + len(MOE_CLASSES)} model classes")
    by_class = {line.split()[0]: line for line in lines[1:]}
    assert set(by_class) == set(ALL_CLASSES) | set(MOE_CLASSES)
    assert "neurons: per expert: mlp.experts's hidden units (layer/expert/unit" in by_class["OlmoeForCausalLM"]
    for name in ALL_CLASSES:
        kind = "lm" if name in HF_LM_CLASSES else "image"
        assert by_class[name].split()[1] == kind
    assert "neurons: input of mlp.down_proj; W_in: mlp.gate_up_proj (rows block 2 of 2)" in by_class["Phi3ForCausalLM"]
    assert "blocks encoder.block; neurons: input of layer.1.DenseReluDense.wo" in by_class["T5EncoderModel"]
    assert "neurons: input of output.dense or mlp.fc2" in by_class["ViTForImageClassification"]


def test_unknown_architecture_module_names_class_and_fix():
    class TinyMLPNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

    with pytest.raises(UnknownArchitectureError) as err:
        load_model(TinyMLPNet())
    msg = str(err.value)
    assert "TinyMLPNet" in msg and "ARCHITECTURES" in msg and "neuron_module" in msg


def test_unknown_architecture_folder_names_class(tmp_path):
    import transformers
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=24, num_hidden_layers=1,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnknownArchitectureError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "OPTForCausalLM" in msg and "ARCHITECTURES" in msg and "Add an entry" in msg


def test_unreachable_hub_id_names_it_and_how_to_provide_it(hub_offline):
    spec = "nonexistent-org/nonexistent-model-xyz"
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(spec)
    msg = str(err.value)
    assert spec in msg
    assert "download" in msg and "local" in msg.lower()


def test_hub_revisions_are_loaded_through_from_pretrained(tmp_path, monkeypatch):
    """Two local folders stand in for two training checkpoints of a hub model (Pythia's step1000, ...): every
    from_pretrained (config, weights, tokenizer) is answered from the folder of the revision it is asked for,
    so the handle must hold that revision's weights, and a revision that was not asked for is never read."""
    import transformers
    folders = {f"step{k}": save_hf_lm(tmp_path / f"step{k}", "GPTNeoXForCausalLM", seed=k) for k in (1, 2)}
    asked = []

    def from_folders(original):
        def load(spec, *args, revision=None, **kwargs):
            if spec != "org/pythia-tiny":       # transformers' own inner calls, on the folder already chosen
                return original(spec, *args, revision=revision, **kwargs)
            asked.append(revision)
            return original(str(folders[revision]), *args, **kwargs)
        return load
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.GPTNeoXForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", from_folders(cls.from_pretrained))
    for revision, folder in folders.items():
        asked.clear()
        handle = load_model("org/pythia-tiny", revision=revision)
        assert asked == [revision] * 3 and handle.name == f"org/pythia-tiny@{revision}"
        expected = load_model(folder)
        for layer in range(handle.n_layers):
            torch.testing.assert_close(handle.w_in(layer), expected.w_in(layer), rtol=0, atol=0)
    assert not torch.equal(load_model(folders["step1"]).w_in(0), load_model(folders["step2"]).w_in(0))


def test_revision_of_a_local_folder_is_refused(tmp_path, hub_offline):
    folder = save_hf_lm(tmp_path / "m", "GPTNeoXForCausalLM")
    with pytest.raises(ValueError, match="not a hub id"):
        load_model(folder, revision="step1000")
    with pytest.raises(ModelNotAvailableError, match="revision 'step1000'"):
        load_model("nonexistent-org/nonexistent-model-xyz", revision="step1000")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="nothere.gguf"):
        load_model(tmp_path / "nothere.gguf")


# -- random-initialisation controls ----------------------------------------------------------------------
@pytest.mark.parametrize("class_name", ["LlamaForCausalLM", "GPT2LMHeadModel", "ViTForImageClassification",
                                        "VisionTransformer", "VisionTransformerDistilled"])
def test_random_init_seeded(class_name, tmp_path):
    directory = _save(tmp_path / class_name, class_name, seed=3)
    trained = load_model(directory)
    r1 = load_model(directory, random_init=True, seed=1)
    r1_again = load_model(directory, random_init=True, seed=1)
    r2 = load_model(directory, random_init=True, seed=2)

    assert not trained.random_init and trained.label == trained.name
    for handle, seed in ((r1, 1), (r2, 2)):
        assert handle.random_init is True and handle.seed == seed
        extra = handle.label.replace(trained.name, "")       # what the label adds to the model's name
        assert "random" in extra and str(seed) in extra
        assert type(handle.model) is type(trained.model)

    st, s1, s1b, s2 = (h.model.state_dict() for h in (trained, r1, r1_again, r2))
    assert set(s1) == set(st)
    for key in st:
        assert s1[key].shape == st[key].shape, key        # the same architecture, not a default-sized one
        assert torch.equal(s1[key], s1b[key]), key        # reproducible per seed
    seed_dependent = [k for k in st if not torch.equal(s1[k], s2[k])]
    assert seed_dependent, "two seeds gave identical models"
    # the initialiser touched the MLPs (and those differ across seeds) ...
    w_in_name = ARCHITECTURES[class_name].w_in.split("|")
    assert any(any(part in k for part in w_in_name) and k.endswith("weight") for k in seed_dependent)
    # ... and every tensor it draws differs from the trained model's
    for key in seed_dependent:
        assert not torch.equal(s1[key], st[key]), key
    assert not torch.equal(r1.w_in(0), trained.w_in(0))
    assert r1.d_mlp == trained.d_mlp and r1.n_layers == trained.n_layers
    # the trained model is left as it was
    reloaded = load_model(directory).model.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in st.items())


# -- the embedded LM -----------------------------------------------------------------------------------
def test_embedded_lm_shape(smollm):
    assert type(smollm.model).__name__ == "LlamaForCausalLM"
    assert smollm.kind == "lm"
    assert smollm.n_layers == 30 and smollm.d_mlp == 1536
    assert tuple(smollm.w_in(0).shape) == (1536, 576)
    assert smollm.tokenizer is not None


def test_embedded_lm_predicts_code(smollm):
    """Next-token top-1 on held-out standard-library code, computed by hand from the logits."""
    from modsep_nb.data import text_tasks
    docs = text_tasks(["code"])["code"].evaluate
    ids = []
    for doc in docs:
        ids += smollm.tokenizer(doc)["input_ids"]
        if len(ids) >= 1200:
            break
    ids = torch.tensor(ids[:1200]).view(4, 300)
    with torch.no_grad():
        logits = smollm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    top1 = (logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item()
    assert top1 > 0.30, top1
    assert re.match(r"smollm2", smollm.label)


def test_model_sharded_with_device_map_gives_the_same_results(llama_dir):
    """A device_map that leaves layer 1 offloaded (accelerate keeps its weights on "meta" and loads them per
    forward): hooks still see every activation, W_in and the weights fingerprint read the real weights, and
    statistics, evaluation and ablation equal those of the model on one device."""
    from conftest import random_texts
    from modsep_nb import ablate, collect_stats, evaluate, select_neurons
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain, sharded = load_model(llama_dir), load_model(llama_dir, device_map=device_map)
    offloaded = [n for n, p in sharded.model.named_parameters() if p.is_meta]
    assert offloaded and all(".layers.1." in n for n in offloaded)
    texts = random_texts(12, seed=5)
    a, b = collect_stats(plain, texts), collect_stats(sharded, texts)
    assert torch.equal(a.count, b.count)
    for name in ("mean", "mean_abs", "mean_sq", "frac_pos", "mean_sqrt"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=1e-6)
    torch.testing.assert_close(sharded.w_in(1), plain.w_in(1), rtol=0, atol=0)
    assert sharded.identity()["fingerprint"] == plain.identity()["fingerprint"]
    assert sharded.device == torch.device("cpu") and sharded.dtype == torch.float32
    mask = select_neurons(a.mean_abs, 0.25)
    with ablate(plain, mask, mode="mean", means=a.mean):
        expected = evaluate(plain, texts)
    with ablate(sharded, mask, mode="mean", means=a.mean):
        got = evaluate(sharded, texts)
    assert got["n"] == expected["n"] and got["top10"] == expected["top10"]
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert expected["loss"] != pytest.approx(evaluate(plain, texts)["loss"], abs=1e-5)   # the ablation bit
    assert all(p.is_meta for n, p in sharded.model.named_parameters() if n in offloaded)   # offloaded again


def test_random_init_of_a_model_loaded_with_a_device_map(llama_dir):
    """One placement: the same random model as without a device_map; a part on disk: a clear error."""
    on_cpu = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "cpu"}
    a = load_model(llama_dir, random_init=True, seed=4)
    b = load_model(llama_dir, device_map=on_cpu, random_init=True, seed=4)
    assert b.random_init and b.seed == 4
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="disk"):
        load_model(llama_dir, device_map={**on_cpu, "model.layers": "disk"}, random_init=True, seed=4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit", "timm"])
def test_a_block_tape_replays_the_blocks_below_an_ablation_bit_for_bit(family, tmp_path):
    """Passes that zero a neuron of the last layer, replaying the blocks below it from the tape: the logits are
    those computed afresh (bit for bit), the blocks below run in the first pass only; other batches than the kept
    ones are computed and stop the tape; a tape with no room keeps nothing and still gives the same logits; the
    blocks are as before afterwards."""
    from modsep_nb.models import BlockTape
    from modsep_nb.pruning import ablate
    if family == "llama" or family == "gpt2":
        handle = load_model(save_hf_lm(tmp_path, "LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel"))
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 50, (3, 7), generator=gen) for _ in range(2)]
        run = lambda x: handle.lm_logits(x, torch.ones_like(x))           # noqa: E731
    else:
        handle = load_model(save_hf_vit(tmp_path) if family == "vit" else save_timm(tmp_path))
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(2, *handle.image_shape, generator=gen) for _ in range(2)]
        run = handle.image_logits                                          # noqa: E731
    last = handle.n_layers - 1
    calls = [0] * handle.n_layers
    counters = [handle.neuron_module(i).register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
                for i in range(handle.n_layers)]                 # a block computed runs its MLP
    tape = BlockTape()
    with torch.no_grad():
        for unit in (0, 1, 2):
            mask = torch.zeros(handle.n_layers, handle.d_mlp, dtype=torch.bool)
            mask[last, unit] = True
            with ablate(handle, mask):
                afresh = [run(x) for x in batches]
                before = list(calls)
                with tape.replay(handle, below=last):
                    replayed = [run(x) for x in batches]
            assert all(torch.equal(a, b) for a, b in zip(afresh, replayed))
            ran = [c - b for c, b in zip(calls, before)]
            assert ran[last] == 2 and ran[:last] == ([2] * last if unit == 0 else [0] * last)
        plain = [run(x) for x in batches]                     # intact
        with tape.replay(handle, below=last):                 # another batch first: computed, and the tape stops
            assert torch.equal(run(batches[1]), plain[1]) and tape.stopped and tape.outputs == {}
            assert torch.equal(run(batches[0]), plain[0])
        empty = BlockTape(max_bytes=0)
        for _ in range(2):
            with empty.replay(handle, below=last):
                assert torch.equal(run(batches[0]), plain[0])
        assert empty.outputs == {} and empty.inputs == {} and empty.kept_bytes == 0
    for c in counters:
        c.remove()
    assert all("forward" not in b.__dict__ for b in handle.blocks)
