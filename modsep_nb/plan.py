"""What a parameter set costs, before any of it runs (issue #27): per notebook the forward passes (batches) and
tokens (LM) or images (ViT) it needs, and an estimated time on this machine and on the GPU measured in issue #27.

Counts follow the notebooks' own steps (study.py, selective.py, evidence.py): statistics, the pseudo-task null's
domain, the neuron examples' pass, the cross-task matrix (T × T × (1 + random seeds) evaluations), the bisection
(at most 1 + pruning.max_steps evaluations of a task, then its row), the selectivity null, MoEfication's samples
and routing curves, the random-init models, notebook 06's checkpoints. They assume nothing is cached yet, each
document gives at least one full window (so the passes are a lower bound), and count every forward the same
whether it stops after the last hooked layer (statistics) or runs to the logits. Rows marked "~" are
approximate: upper bounds (the bisection; random sets that tasks share are measured once), test images split
evenly over tasks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .data import FASHION_MNIST_GROUPS
from .evaluation import bisection_evaluations
from .models import EMBEDDED_LM, EMBEDDED_VIT, load_model
from .params import ParamsError, device_of, dtype_of
from .statistics import block_of_documents
from .study import SECTIONS, training_options
from .vit_training import DEFAULT_TRAINING, vit_config

# Mistral-7B-Instruct-v0.2 (7.24e9 parameters), bf16, batch 8 x 1024, plain forward on one H200: 34.7k tokens/s
# (issue #27, 2026-12-04), about 5.0e14 FLOP/s at 2 FLOPs per parameter and token
GPU_NAME = "H200 (bf16)"
GPU_FLOPS = 2 * 7.24e9 * 34_700


USES = {"vit": ("01", "03", "04", "05", "06", "07"), "lm": ("02", "03", "04", "05", "06", "07")}    # the notebooks a section runs in
# tasks of the built-in image datasets (vit.tasks classes / groups), so that planning needs no download
KNOWN_TASKS = {("fashion-mnist", "classes"): 10, ("fashion-mnist", "groups"): len(FASHION_MNIST_GROUPS),
               ("cifar100", "classes"): 100, ("cifar100", "groups"): 20}


def known_n_tasks(params: dict) -> int | None:
    """vit's number of tasks where the params name them by a built-in dataset's classes or groups, else None."""
    return KNOWN_TASKS.get((params["vit"]["dataset"], params["vit"]["tasks"])) \
        if not isinstance(params["vit"]["tasks"], dict) else None


@dataclass
class Stage:
    notebook: str
    kind: str           # "lm" or "vit": the params section whose model runs
    what: str
    passes: int         # forward calls (batches)
    units: int          # tokens (lm) or images (vit)
    exact: bool = True


class Costs:
    """Stages of one section: a budget of tokens (images) read once, or a number of task evaluations."""

    def __init__(self, params: dict, kind: str):
        self.p, self.kind, self.params, self.tasks = params[kind], kind, params, SECTIONS[kind]
        self.n_tasks = len(self.p["tasks"]) if isinstance(self.p["tasks"], (list, dict)) else None
        self.row = self.tasks.batch_row(self.p)          # units in one batch row: a window of tokens, an image

    def read(self, units: int) -> int:
        """Forward calls of one pass over `units` tokens (images)."""
        return math.ceil(math.ceil(units / self.row) / self.p["batch_size"])

    def stats(self, nb, what, n_passes, budget, exact=True, n_blocks=None) -> Stage:
        """n_passes statistics passes of `budget`; with n_blocks and evidence.blocks_alone, each block of documents
        batched alone (shards.py); otherwise blocks share batches."""
        if n_blocks is None or not self.params["evidence"]["blocks_alone"]:
            return Stage(nb, self.kind, what, n_passes * self.read(budget), n_passes * budget, exact)
        windows = math.ceil(budget / self.row)          # one per document
        sizes = torch.bincount(block_of_documents(windows, n_blocks)).tolist()
        per = sum(math.ceil(n / self.p["batch_size"]) for n in sizes)
        return Stage(nb, self.kind, what, n_passes * per, n_passes * budget, exact)

    def evals(self, nb, what, n_evals, exact=True) -> Stage:
        """n_evals evaluations of one task: eval_tokens each (LM), or its share of the test images (ViT)."""
        per, per_exact = self.tasks.evaluation_units(self.p, self.n_tasks)
        return Stage(nb, self.kind, what, n_evals * self.read(per), n_evals * per, exact and per_exact)


def count(params: dict, n_tasks: dict | None = None) -> list[Stage]:
    """Every stage of every notebook in params['notebooks']. n_tasks: {kind: number of tasks} where the params
    name them indirectly (vit.tasks: classes / groups), e.g. from the loaded tasks."""
    nbs, out = set(params["notebooks"]), []
    pr, ev, ri = params["pruning"], params["evidence"], params["random_init"]
    for kind, own in (("vit", "01"), ("lm", "02")):
        if not nbs & set(USES[kind]):
            continue
        c = Costs(params, kind)
        c.n_tasks = (n_tasks or {}).get(kind, c.n_tasks)
        if c.n_tasks is None:
            raise ValueError(f"{kind}.tasks is {c.p['tasks']!r}: pass n_tasks={{'{kind}': N}} (plan loads the tasks)")
        tasks = SECTIONS[kind]
        T, B, S = c.n_tasks, c.p[tasks.stats_key], len(pr["random_seeds"])
        if own in nbs:
            nbk = ev["n_blocks"]
            out += [c.stats(own, "statistics", T, B, n_blocks=nbk),
                    c.stats(own, "pseudo-task null domain", 1, T * B, n_blocks=T * nbk),
                    c.stats(own, "neuron examples", T, B), c.evals(own, "unpruned accuracy", T),
                    # at most: tasks with the same count per layer share a random set, measured once
                    c.evals(own, f"cross-task matrix at a fixed fraction, {S} random seeds", T * (1 + S) * T, False)]
            if c.p["bisection"]:
                out.append(c.evals(own, "cross-task matrix by bisection (at most)",
                                   bisection_evaluations(T, pr["max_steps"]), False))
            if c.p["selectivity_null"]:
                out.append(c.evals(own, "selectivity null", T * (1 + ev["n_null_ablation"] * T)))
        if "03" in nbs:
            tokens = params["moefication"]["coactivation_tokens"]
            sample = tasks.sample_read(tokens, T)
            kept = len([f for f in params["moefication"]["keep_fracs"] if f < 1])
            n_eval = min(params["moefication"]["eval_tasks"] or T, T)
            mo = params["moefication"]      # the claims' further seeds: random (and param) splits at the claim's fractions
            reseeded = ((1 + (kind in mo["reseed_param"])) * (1 if mo["claim_frac"] else kept) * (mo["n_seeds"] - 1))
            out += [c.stats("03", "co-activation sample and learned router", 2, sample, False),
                    c.evals("03", "routing curves (3 splits, oracle and learned router; the claims' further split seeds)",
                            n_eval * (2 + 4 * kept + reseeded))]
        if "04" in nbs or "05" in nbs:
            seeds = len(ri["seeds"]) if "04" in nbs else 1
            budget = ri[tasks.stats_key] or B
            out.append(c.stats("04" if "04" in nbs else "05", f"statistics of {seeds} random-init models", seeds * T,
                               budget, n_blocks=ev["n_blocks"]))
        n_ck = tasks.checkpoints(params)
        if "06" in nbs and n_ck:
            # 06's smaller budgets: those of the section's keys that params['dynamics'] sets (dynamics_params)
            dyn = {key: min(params["dynamics"][key], c.p[key]) for key in (tasks.stats_key, tasks.eval_key)
                   if key in params["dynamics"]}
            if dyn:
                c = Costs({**params, kind: {**c.p, **dyn}}, kind)
                c.n_tasks, B = T, dyn.get(tasks.stats_key, B)
            out += [c.stats("06", f"statistics at {n_ck} checkpoints", n_ck * T, B, n_blocks=ev["n_blocks"]),
                    c.stats("06", f"null domain at {n_ck} checkpoints", n_ck, T * B, n_blocks=T * ev["n_blocks"]),
                    c.evals("06", f"cross-task matrix at {n_ck} checkpoints (1 random seed)", n_ck * (2 * T * T + 2 * T),
                            False)]
    return sorted((s for s in out if s.notebook in nbs), key=lambda s: s.notebook)


def model_size(params: dict, kind: str) -> tuple[int, int]:
    """(parameters, tokens per unit: 1 for an LM, patches + class token per image) of a section's model, from its
    configuration only (no weights are read: meta tensors)."""
    spec, modality = params[kind]["model"], SECTIONS[kind].modality
    if spec == EMBEDDED_VIT:
        from transformers import ViTForImageClassification
        settings = {**DEFAULT_TRAINING, **{k: v for k, v in params["vit"]["training"].items() if v is not None}}
        with torch.device("meta"):
            model = ViTForImageClassification(vit_config(settings))
        cfg = model.config
        return sum(p.numel() for p in model.parameters()), (cfg.image_size // cfg.patch_size) ** 2 + 1
    if spec == EMBEDDED_LM:
        return 134_515_008, 1      # SmolLM2-135M-Instruct (embedded; converting it is work, not planning)
    if spec.startswith("timm:"):      # a timm ViT: timm builds the architecture from its name alone
        import timm
        try:
            with torch.device("meta"):
                model = timm.create_model(spec[len("timm:"):], pretrained=False)
        except RuntimeError:        # timm's "Unknown model"
            raise ParamsError(f"vit.model {spec!r}: timm has no architecture of that name (timm.list_models() "
                              f"lists them)") from None
        per = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        return sum(p.numel() for p in model.parameters()), per
    import transformers
    try:
        cfg = transformers.AutoConfig.from_pretrained(spec)
    except Exception:             # timm, or a hub id without network
        raise ParamsError(f"{kind}.model {spec!r}: its configuration could not be read here (offline?); plan needs "
                         f"config.json (a local folder, or the hub cache)") from None
    with torch.device("meta"):       # the head counts: an LM's unembedding is part of every evaluation pass
        model = getattr(transformers, modality.auto_class).from_config(cfg)
    per = modality.tokens_per_unit(cfg)
    return sum(p.numel() for p in model.parameters()), per


def measure_rate(params: dict, kind: str, n_batches: int = 3) -> float:
    """Tokens (images) per second of a section's model on this machine and device: a warm-up batch, then the
    fastest of `n_batches` batches of batch_size × ctx tokens (batch_size images) to the logits."""
    p = params[kind]
    handle = load_model(p["model"], dtype=dtype_of(params, kind), device=device_of(params), **training_options(params, kind))
    x, mask, units = handle.modality.random_batch(handle, p["batch_size"], p.get("ctx"))
    times = []
    with torch.no_grad():
        for _ in range(n_batches + 1):
            start = time.perf_counter()
            handle.logits(x, mask)
            if handle.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return units / min(times[1:])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def report(params: dict, stages: list[Stage], rates: dict, sizes: dict) -> str:
    """The plan as text: one line per stage, then per notebook and in all: passes, tokens (images), time here
    (rates: {kind: units/s} measured, or absent) and on the issue's GPU (sizes: {kind: (parameters, tokens per unit)})."""
    unit = {kind: tasks.unit for kind, tasks in SECTIONS.items()}
    lines = [f"{'nb':3s} {'model':4s} {'stage':58s} {'passes':>9s} {'tokens/images':>16s} {'here':>8s} {GPU_NAME:>12s}"]
    totals: dict = {}

    def times(kind, units):
        here = units / rates[kind] if kind in rates else float("nan")
        params_n, per = sizes[kind]
        return here, 2 * params_n * per * units / GPU_FLOPS

    for s in stages:
        here, gpu = times(s.kind, s.units)
        lines.append(f"{s.notebook:3s} {s.kind:4s} {('~ ' if not s.exact else '') + s.what:58s} {s.passes:9,d} "
                     f"{s.units:>9,d} {unit[s.kind]:6s} {_duration(here) if here == here else '-':>8s} "
                     f"{_duration(gpu):>12s}")
        t = totals.setdefault(s.notebook, [0, 0.0, 0.0])
        t[0] += s.passes
        t[1] += here
        t[2] += gpu
    lines.append("")
    for nb, (passes, here, gpu) in sorted(totals.items()):
        lines.append(f"notebook {nb}: {passes:,d} forward passes, {_duration(here) if here == here else '-'} here, "
                     f"{_duration(gpu)} on one {GPU_NAME}")
    here = sum(t[1] for t in totals.values())
    gpu = sum(t[2] for t in totals.values())
    lines.append(f"all: {sum(t[0] for t in totals.values()):,d} forward passes, "
                 f"{_duration(here) if here == here else '-'} here, {_duration(gpu)} on one {GPU_NAME}")
    for kind, rate in rates.items():
        lines.append(f"here: {kind} measured at {rate:,.0f} {unit[kind]}/s ({params[kind]['model']}, batch "
                     f"{params[kind]['batch_size']}{', ctx ' + str(params[kind]['ctx']) if 'ctx' in params[kind] else ''})")
    lines.append(f"{GPU_NAME}: 2 FLOPs per parameter and token at {GPU_FLOPS / 1e12:.0f} TFLOP/s, what Mistral-7B's "
                 f"plain forward reached (issue #27); small models reach less")
    return "\n".join(lines)
