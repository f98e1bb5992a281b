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


def pytest_collection_modifyitems(items):
    """The tests that wait for the notebook pipeline go last (nbval's last of all), so that the others run
    while it does; the order within each group is kept."""
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
