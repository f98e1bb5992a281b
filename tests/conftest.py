"""Shared fixtures: tiny random models of every supported family saved into temporary folders and
loaded back through `load_model(dir)` (no network), a tiny word-level tokenizer, and the embedded LM.

Everything here is offline; nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import pytest

# One thread per process, set before torch is imported (the kernels and subprocesses inherit it): the notebook
# pipeline runs beside the other tests, and on two cores torch's thread pools in two processes, spinning at
# barriers on the same cores, made the suite slower (23 min) than running everything in turn had been (15 min).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

# -- a tiny word-level tokenizer ------------------------------------------------------------------------
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i:02d}" for i in range(48)]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
PAD_ID, BOS_ID = VOCAB["[PAD]"], VOCAB["[BOS]"]
VOCAB_SIZE = 64            # model vocabulary (>= the tokenizer's 55 entries)


def make_tokenizer():
    """A PreTrainedTokenizerFast: whitespace words, one id per word, BOS prepended to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def encode(text: str) -> list[int]:
    """What the tiny tokenizer must produce, computed without it: BOS, then one id per word."""
    return [BOS_ID] + [VOCAB.get(w, VOCAB["[UNK]"]) for w in text.split()]


def random_texts(n_docs: int, *, seed: int, min_len: int = 1, max_len: int = 20, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_len, max_len))) for _ in range(n_docs)]


# -- tiny models -------------------------------------------------------------------------------------------
def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (norm weights around 1) so that the model is 'trained':
    no tensor equals what an initialiser would produce, and activations are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale
            p.copy_(noise + (1.0 if ("norm" in name.lower() and name.endswith("weight")) else 0.0))
    return model


def _hf_lm_configs():
    import transformers
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=VOCAB["[EOS]"])
    return {
        "MistralForCausalLM": lambda: transformers.MistralConfig(**base, num_key_value_heads=1),
        "LlamaForCausalLM": lambda: transformers.LlamaConfig(**base, num_key_value_heads=1),
        "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**base, num_key_value_heads=1),
        "GemmaForCausalLM": lambda: transformers.GemmaConfig(**base, num_key_value_heads=1, head_dim=8),
        "Gemma2ForCausalLM": lambda: transformers.Gemma2Config(**base, num_key_value_heads=1, head_dim=8),
        "GPT2LMHeadModel": lambda: transformers.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=16, n_layer=2, n_head=2,
                                                           n_inner=24, n_positions=64, bos_token_id=BOS_ID,
                                                           eos_token_id=VOCAB["[EOS]"]),
        "GPTNeoXForCausalLM": lambda: transformers.GPTNeoXConfig(**base, max_position_embeddings=64),
        "BertForMaskedLM": lambda: transformers.BertConfig(**base, max_position_embeddings=64),
        "BertModel": lambda: transformers.BertConfig(**base, max_position_embeddings=64),
        "RobertaForMaskedLM": lambda: transformers.RobertaConfig(**base, max_position_embeddings=70),
        "RobertaModel": lambda: transformers.RobertaConfig(**base, max_position_embeddings=70),
        "Gemma3ForCausalLM": lambda: transformers.Gemma3TextConfig(**base, num_key_value_heads=1, head_dim=8),
        "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**base, num_key_value_heads=1, head_dim=8),
        "Olmo2ForCausalLM": lambda: transformers.Olmo2Config(**base, num_key_value_heads=1),
        "Phi3ForCausalLM": lambda: transformers.Phi3Config(**base, num_key_value_heads=1),
        # Flan-T5's gated MLP (wi_0, wi_1); T5 v1.0's plain one is tested in test_models.py
        "T5EncoderModel": lambda: transformers.T5Config(
            vocab_size=VOCAB_SIZE, d_model=16, d_ff=24, d_kv=8, num_layers=2, num_heads=2,
            feed_forward_proj="gated-gelu", pad_token_id=PAD_ID, eos_token_id=VOCAB["[EOS]"]),
    }


HF_LM_CLASSES = tuple(_hf_lm_configs())
TIMM_CLASSES = {"VisionTransformer": "vit_tiny_patch16_224", "VisionTransformerDistilled":
                "deit_tiny_distilled_patch16_224"}
TIMM_ARGS = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8)


def save_hf_lm(directory: Path, class_name: str, *, seed: int = 0) -> Path:
    """A tiny random HF language model of `class_name` plus the tiny tokenizer, saved into `directory`."""
    import transformers
    torch.manual_seed(seed)
    config = _hf_lm_configs()[class_name]()
    model = perturb_(getattr(transformers, class_name)(config), seed)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return Path(directory)


def llama_to_plant(d_model: int, d_mlp: int, n_layers: int = 2):
    """A seeded random Llama over the tiny vocabulary (2 heads, 1 key-value head, untied unembedding), whose weights
    the planted-model tests then overwrite."""
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=d_model, intermediate_size=d_mlp,
                                      num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return transformers.LlamaForCausalLM(config)


def one_hot_llama(d_model: int, d_mlp: int, bias_dim: int, *, identity_head: bool = False):
    """The planted models' base (test_evidence, test_general_corpus): a 2-layer Llama over the tiny vocabulary with
    one-hot embeddings plus a constant `bias_dim` component, attention writing nothing (o_proj zero), every MLP
    neuron reading mostly that constant (so active everywhere, with little word preference) and writing nothing
    (down_proj zero); identity_head: lm_head the identity (d_model must be the vocabulary size). Returns the model;
    callers plant neurons by overwriting rows of layer 0's gate_proj/up_proj (and columns of down_proj)."""
    model = llama_to_plant(d_model, d_mlp)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = torch.eye(VOCAB_SIZE, d_model)
        emb[:, bias_dim] += 1.0
        model.model.embed_tokens.weight.copy_(emb)
        if identity_head:
            model.lm_head.weight.copy_(torch.eye(VOCAB_SIZE, d_model))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                w = torch.randn(d_mlp, d_model, generator=gen) * 0.1
                w[:, bias_dim] = 0.3
                proj.weight.copy_(w)
            layer.mlp.down_proj.weight.zero_()
    return model


def vit_config(**kw):
    import transformers
    cfg = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=4, num_channels=1, num_labels=10, architectures=["ViTForImageClassification"])
    cfg.update(kw)
    return transformers.ViTConfig(**cfg)


def save_hf_vit(directory: Path, *, seed: int = 0, **kw) -> Path:
    import transformers
    torch.manual_seed(seed)
    model = perturb_(transformers.ViTForImageClassification(vit_config(**kw)), seed)
    model.save_pretrained(directory)
    return Path(directory)


def save_timm(directory: Path, class_name: str = "VisionTransformer", *, seed: int = 0) -> Path:
    """A tiny timm ViT/DeiT as a local folder that models._load_timm reads: config.json + model.safetensors."""
    import timm
    from safetensors.torch import save_file
    arch = TIMM_CLASSES[class_name]
    torch.manual_seed(seed)
    model = perturb_(timm.create_model(arch, pretrained=False, num_classes=5, **TIMM_ARGS), seed)
    assert type(model).__name__ == class_name
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 5,
                                                       "model_args": TIMM_ARGS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return save_hf_lm(tmp_path_factory.mktemp("llama"), "LlamaForCausalLM")


@pytest.fixture
def tiny_llama(llama_dir):
    """A fresh handle per test (tests may modify its weights)."""
    from modsep_nb import load_model
    return load_model(llama_dir)


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    return save_hf_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture
def tiny_vit(vit_dir):
    from modsep_nb import load_model
    return load_model(vit_dir)


@pytest.fixture(scope="session")
def timm_dir(tmp_path_factory):
    return save_timm(tmp_path_factory.mktemp("timm"))


@pytest.fixture(scope="session")
def smollm():
    """The embedded LM (SmolLM2-135M-Instruct), loaded once, with the hub switched off."""
    import huggingface_hub.constants
    from modsep_nb import load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        handle = load_model("smollm2-135m")
    return handle


@pytest.fixture
def hub_offline(monkeypatch):
    """Make every hub access fail fast (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@contextlib.contextmanager
def capture_neuron_inputs(handle):
    """handle.capture() whose records, filled when the block ends, are float64: records[layer] lists the
    neuron inputs, one per forward."""
    records = {}
    with handle.capture() as captured:
        yield records
    records.update({layer: [r.to(torch.float64) for r in rows] for layer, rows in captured.items()})


def windows_of(texts, ctx: int) -> list[list[int]]:
    """Each document tokenised by `encode` and cut into windows of at most ctx tokens (independent of lm_batches;
    a trailing one-token window is dropped, as it has no next-token target)."""
    out = []
    for text in texts:
        ids = encode(text)
        for start in range(0, len(ids), ctx):
            w = ids[start:start + ctx]
            if len(w) < 2 and start > 0:
                continue
            out.append(w)
    return out


def windows_in_rounds(texts, ctx: int, doc_tokens: int | None = None) -> list[list[int]]:
    """The windows of `windows_of` read in rounds (independent of data.document_windows): round r takes from
    every document, in order, its tokens [r * doc_tokens, (r + 1) * doc_tokens) (default ctx) as windows of at
    most ctx, a one-token window after a document's start dropped."""
    doc_tokens = doc_tokens or ctx
    rounds_per_doc = []
    for text in texts:
        ids = encode(text)
        rounds = []
        for r, first in enumerate(range(0, len(ids), doc_tokens)):
            piece = ids[first:first + doc_tokens]
            rounds.append([piece[j:j + ctx] for j in range(0, len(piece), ctx)
                           if len(piece[j:j + ctx]) >= 2 or first + j == 0])
        rounds_per_doc.append(rounds)
    out = []
    for r in range(max((len(x) for x in rounds_per_doc), default=0)):
        for rounds in rounds_per_doc:
            if r < len(rounds):
                out.extend(rounds[r])
    return out


# -- the notebooks, executed in the background (tests/notebook_pipeline.py) -------------------------------
def waits_for_notebooks(item) -> int:
    """Which of the pipeline's results a test waits for: 0 none, 1 the smoke run, 2 nbval (finished last)."""
    return 2 if "nbval_run" in item.fixturenames else int("smoke_run" in item.fixturenames)


# -- markers (registered in pyproject.toml): `make test-fast` runs `-m unit`, `make test` everything ----------
# Every test file's markers, given to all its tests. Whatever its file, a test that reads the notebooks' runs
# (smoke_run, nbval_run) is also `notebooks` and one that opens Chromium (browser) also `browser`. `unit` goes to
# every test with none of notebooks, browser, gpu or slow. A file missing here stops collection, so a new slow
# file cannot land in test-fast unnoticed (tests/test_markers.py checks this table against the files).
FILE_MARKERS = {
    "test_notebooks.py": ("notebooks",), "test_lab.py": ("notebooks", "browser"), "test_gpu.py": ("gpu",),
    **{name: () for name in (
        "test_api.py", "test_attack3_data.py", "test_attack3_numbers.py", "test_attack3_outputs.py",
        "test_attack3_params.py", "test_bench.py", "test_correspondence.py", "test_data.py", "test_distributed.py",
        "test_docs.py", "test_dynamics.py", "test_evaluation.py", "test_evidence.py", "test_export.py",
        "test_general_corpus.py", "test_hub_data.py", "test_index_page.py", "test_localisers.py", "test_markers.py", "test_models.py",
        "test_moe.py", "test_moefication.py", "test_neurons.py", "test_overlaps.py", "test_paper_scores.py",
        "test_peers.py", "test_pruning.py", "test_reliability.py", "test_scorecard.py", "test_shards.py", "test_statistics.py", "test_steps.py", "test_study.py", "test_tasks_custom.py")},
}
FIXTURE_MARKERS = {"smoke_run": "notebooks", "nbval_run": "notebooks", "browser": "browser"}
# "file::test function" (every parametrisation): 4.5 s or more each in a `-m unit --durations` run on 2 cores under
# heavy contention (the 58 slowest: 95% of its time); left out of test-fast, still in `make test`
SLOW = {f"{file}::{test}" for file, tests in {
    "test_api.py": (
        "test_handle_and_stats_attributes",
    ),
    "test_attack3_data.py": (
        "test_images_are_resized_as_they_are_loaded",
        "test_splitting_a_large_domain_has_bounded_memory",
        "test_symlink_loops_do_not_make_check_hang",
    ),
    "test_attack3_numbers.py": (
        "test_changed_statistics_bytes_are_recomputed_with_a_warning",
    ),
    "test_attack3_outputs.py": (
        "test_a_dtype_resolved_otherwise_is_other_parameters",
        "test_neuron_pages_of_tasks_named_alike_show_their_own_images",
        "test_overwrite_with_other_params_removes_every_stale_output",
        "test_text_is_written_as_utf8_under_an_ascii_locale",
    ),
    "test_attack3_params.py": (
        "test_injected_parameters_hold_no_absolute_paths",
    ),
    "test_bench.py": (
        "test_gpu_section_runs_at_tiny_size_on_cpu",
    ),
    "test_data.py": (
        "test_budget_spread_over_documents",
        "test_fmnist_vit_trains_caches_and_is_deterministic",
        "test_statistics_documents_are_a_seeded_sample_of_the_domain",
        "test_tasks_record_names_exactly_the_documents_used",
        "test_text_split_disjoint_and_complete",
    ),
    "test_distributed.py": (
        "test_blocks_and_cross_task_matrix_split_over_two_gloo_ranks_equal_one_process",
        "test_two_process_gloo_equals_single_process",
    ),
    "test_dynamics.py": (
        "test_lm_revisions_as_local_folders",
        "test_trend_claim_against_scipy_and_the_exact_permutation_share",
    ),
    "test_evidence.py": (
        "test_ground_truth_over_20_seeds",
        "test_image_study_document_hits",
        "test_pseudo_cross_task_null",
        "test_study_block_stats_null_domain_and_document_hits",
    ),
    "test_export.py": (
        "test_exports_hold_the_studys_own_tensors",
    ),
    "test_general_corpus.py": (
        "test_under_rest_the_same_shared_neurons_are_never_selected",
    ),
    "test_models.py": (
        "test_embedded_lm_predicts_code",
    ),
    "test_moe.py": (
        "test_section_end_to_end_on_smoke_moe",
    ),
    "test_moefication.py": (
        "test_large_layers_default_to_one_plain_restart",
        "test_real_smollm2_layer_matches_k_means_constrained",
    ),
    "test_neurons.py": (
        "test_pages_import_the_collection_never_the_reverse_and_neurons_keeps_every_public_name",
        "test_static_export_writes_pages_whose_links_resolve",
    ),
    "test_reliability.py": (
        "test_changed_parameter_never_reuses_stale_stats",
        "test_cli_rejects_bad_params_before_work",
        "test_concurrent_builds_of_a_cache_folder",
        "test_corrupted_cache_is_recomputed_with_warning",
        "test_killed_build_leaves_no_temporary_folder",
        "test_killed_run_resumes_with_identical_results",
        "test_overwrite_with_other_params_removes_stale_results",
        "test_sigint_is_one_line_and_marks_the_folder_incomplete",
    ),
    "test_shards.py": (
        "test_merge_refuses_missing_or_mixed_shards",
        "test_plan_counts_what_statistics_and_the_cross_task_matrix_run",
        "test_two_shards_merged_are_the_one_process_cache_bit_for_bit",
    ),
    "test_steps.py": (
        "test_layerwise_cells_in_any_order",
        "test_random_init_results_keep_the_saved_layout",
    ),
    "test_study.py": (
        "test_a_first_position_neuron_is_not_selected_for_short_documents",
        "test_claims_of_a_study_carry_interval_null_and_test",
        "test_dtype_per_section_and_auto",
        "test_image_record_lists_the_images_used",
        "test_image_tasks_budget_and_accuracy_per_task",
        "test_modules_import_each_other_at_the_top_and_without_a_cycle",
        "test_random_init_claims",
        "test_random_init_gets_the_same_data_and_budget_unless_told",
        "test_rest_mean_ablation_uses_each_tasks_own_retain_mean",
        "test_retain_general_and_mean_ablation_run_end_to_end",
        "test_routing_evidence_matches_the_routing_curve",
        "test_selectivity_claim_against_pseudo_tasks",
    ),
    "test_tasks_custom.py": (
        "test_file_tasks_end_to_end",
    ),
}.items() for test in tests}
NOT_UNIT = {"notebooks", "browser", "gpu", "slow"}


def markers_of(item) -> set[str]:
    """The markers conftest gives `item` (see FILE_MARKERS)."""
    name = item.path.name
    if name not in FILE_MARKERS:
        raise pytest.UsageError(f"tests/{name} has no marker classification: add it to FILE_MARKERS in "
                                f"tests/conftest.py (() for unit tests)")
    marks = set(FILE_MARKERS[name]) | {m for f, m in FIXTURE_MARKERS.items() if f in item.fixturenames}
    if f"{name}::{getattr(item, 'originalname', item.name)}" in SLOW:
        marks.add("slow")
    return marks if marks & NOT_UNIT else marks | {"unit"}


@pytest.hookimpl(tryfirst=True)      # before `-m` deselects by these markers
def pytest_collection_modifyitems(items):
    """Mark every test (markers_of); the tests that wait for the notebook pipeline go last (nbval's last of
    all), so that the others run while it does; the order within each group is kept."""
    for item in items:
        for marker in sorted(markers_of(item)):
            item.add_marker(marker)
    items.sort(key=waits_for_notebooks)


@pytest.fixture(scope="session", autouse=True)
def notebook_pipeline(request, tmp_path_factory):
    """Started with the session when a selected test reads the notebooks' executions; stopped at its end."""
    if not any(waits_for_notebooks(item) for item in request.session.items):
        yield None
        return
    from notebook_pipeline import NotebookPipeline
    pipeline = NotebookPipeline(tmp_path_factory.mktemp("notebooks")).start()
    yield pipeline
    pipeline.stop()


@pytest.fixture(scope="session")
def smoke_run(notebook_pipeline):
    """The run folder of the papermill execution of every notebook on params/smoke.yaml."""
    run = notebook_pipeline.result("papermill")
    assert run.returncode == 0, f"the smoke run failed:\n{run.stdout[-6000:]}"
    return notebook_pipeline.out


@pytest.fixture(scope="session")
def nbval_run(notebook_pipeline):
    """nbval's re-execution of each executed notebook ({key: CompletedProcess}) and the fresh cache it used."""
    return notebook_pipeline.result("nbval"), notebook_pipeline.nbval_cache
