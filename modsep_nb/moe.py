"""Real mixture-of-experts models (issue #29): do a trained MoE's router choices follow tasks, and do a task's
specific neurons sit in the experts the router sends that task to?

A neuron is one hidden unit of one expert, named layer/expert/unit ("L3/E5/U17"): act(gate_e(x)) * up_e(x), the
input of expert e's down projection, computed only for the tokens routed to e. transformers >= 5 holds a
layer's experts fused (3-D weights gate_up_proj [E, 2I, d], down_proj [E, d, I]), so there is no module per
expert to hook. One forward-pre-hook on each layer's experts module reads exactly what the model computes with:
its input x, the router's top-k choice per token and their routing weights. The units are recomputed from x
with the expert's own weights and activation, for the routed tokens only; ablation subtracts the ablated
units' share of the experts' output in a forward hook. Nothing of transformers is patched.

Statistics of a unit are over the tokens routed to its expert (`MoeStats.neuron_stats`), so that a unit is
scored by what it does when its expert runs, not by how often the router picks the expert: where a task's
neurons sit and where the router sends the task are then two separate readings. Scores and selection are the
dense models' (pruning.task_scores, select_neurons) on a [layers, experts x units] grid.

    moe = MoeSection(params, report)       # params lm.moe_model: a hub id or a local folder
    moe.statistics(); moe.task_neurons(); moe.ablation(); moe.correspondence()
    print(moe.findings()); report.save({"moe": moe.results()})
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .batches import run_batches
from .claims import Claim, resample_p
from .evaluation import matched_random_mask
from .evidence import percentile_ci
from .models import ModelHandle, get_attr, load_model
from .params import device_of, dtype_of
from .pruning import select_neurons, task_scores
from .statistics import (NeuronStats, documents_read, reduce_sums, block_of_documents, bootstrap_weights,
                         weighted_pool)
from .tasks import TextTasks

# what the recomputation assumes of a fused experts module (transformers' use_experts_implementation flags)
_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}


# -- where the experts are --------------------------------------------------------------------------------
def moe_layers(handle: ModelHandle) -> list[int]:
    """Indices of the blocks whose MLP is a mixture of experts (Qwen2/3-MoE may keep dense MLPs in some)."""
    if not handle.arch.moe:
        raise TypeError(f"{handle.label} is not a mixture of experts (classes with experts: the ARCHITECTURES "
                        f"entries with moe set); set lm.moe_model to a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE model")
    return [i for i, block in enumerate(handle.blocks) if hasattr(get_attr(block, handle.arch.moe), "experts")]


def experts_module(handle: ModelHandle, layer: int):
    experts = get_attr(handle.blocks[layer], handle.arch.moe).experts
    for flag, want in _LAYOUT.items():
        if getattr(experts, flag, want) != want:
            raise NotImplementedError(f"{type(experts).__name__} has {flag}={not want}: modsep_nb.moe reads fused "
                                      f"experts with a gate, no bias, gate_up_proj as [E, 2I, d] only")
    return experts


def shape(handle: ModelHandle) -> tuple[int, int, int]:
    """(n_experts, units per expert, top_k) of the model's MoE layers."""
    layer = moe_layers(handle)[0]
    experts = experts_module(handle, layer)
    n_experts, two_i, _ = experts.gate_up_proj.shape
    return n_experts, two_i // 2, get_attr(handle.blocks[layer], handle.arch.moe).gate.top_k


def unit_name(layer: int, expert: int, unit: int) -> str:
    return f"L{layer}/E{expert}/U{unit}"


def expert_units(experts, x: torch.Tensor, expert: int) -> torch.Tensor:
    """[n, I]: expert `expert`'s hidden units for the rows of x [n, d], as the experts module computes them."""
    gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _inputs(args, kwargs):
    """(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k]) of an experts module's call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    return values[0], values[1], values[2]


# -- statistics per task ------------------------------------------------------------------------------------
@dataclass
class MoeStats:
    """One task's routing and expert-unit statistics on a model's MoE layers (`layers`, block indices).
    Per block of documents (the bootstrap's unit): tokens [B, L] counted, routed [B, L, E] of them routed to
    each expert, weight [B, L, E] the sum of their routing weights. sums [5, L, E*I] (float64): sums over the
    routed tokens of x, |x|, x², 1(x>0), sqrt|x| of each unit (statistics.MEANS's order); unit e*I + u is
    expert e's unit u."""
    layers: list
    top_k: int
    tokens: torch.Tensor
    routed: torch.Tensor
    weight: torch.Tensor
    sums: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def n_experts(self) -> int:
        return self.routed.shape[-1]

    @property
    def d_expert(self) -> int:
        return self.sums.shape[-1] // self.n_experts

    def _merged(self, w=None):
        w = torch.ones(self.tokens.shape[0], dtype=torch.float64) if w is None else w
        return (torch.einsum("b,bl->l", w, self.tokens), torch.einsum("b,ble->le", w, self.routed),
                torch.einsum("b,ble->le", w, self.weight))

    def choice_frequency(self, w=None) -> torch.Tensor:
        """[L, E]: the share of tokens for which the router chose each expert (a row sums to top_k)."""
        tokens, routed, _ = self._merged(w)
        return routed / tokens[:, None]

    def routing_share(self, w=None) -> torch.Tensor:
        """[L, E]: each expert's share of the task's routed slots (a row sums to 1)."""
        return self.choice_frequency(w) / self.top_k

    def mean_weight(self) -> torch.Tensor:
        """[L, E]: mean routing weight of the tokens routed to each expert (NaN where none was)."""
        _, routed, weight = self._merged()
        return torch.where(routed > 0, weight / routed.clamp_min(1), torch.nan)

    def neuron_stats(self) -> NeuronStats:
        """Each unit's statistics over the tokens routed to its expert (a unit whose expert never ran: 0), as a
        NeuronStats [L, E*I] for the dense scoring (count: the task's tokens per layer)."""
        tokens, routed, _ = self._merged()
        n = routed.repeat_interleave(self.d_expert, dim=1).clamp_min(1.0)
        return NeuronStats(tokens, *[s / n for s in self.sums], meta=dict(self.meta))


class _RoutingReader:
    """Forward-pre-hooks on the experts modules that accumulate a task's MoeStats (set `positions` and
    `documents` before each forward: run_batches(..., documents=True) does)."""

    def __init__(self, handle: ModelHandle, block_of: torch.Tensor):
        self.handle, self.layers = handle, moe_layers(handle)
        self.n_experts, self.d_expert, self.top_k = shape(handle)
        self.block_of, n_blocks = block_of.long(), int(block_of.max()) + 1
        L, E = len(self.layers), self.n_experts
        self.tokens = torch.zeros(n_blocks, L, dtype=torch.float64)
        self.routed = torch.zeros(n_blocks, L, E, dtype=torch.float64)
        self.weight = torch.zeros(n_blocks, L, E, dtype=torch.float64)
        self.sums = torch.zeros(5, L, E * self.d_expert, dtype=torch.float64)
        self.positions = self.documents = self.weights = None
        self._sums_on: dict = {}        # unit sums kept where the activations are: no host sync per expert

    def __enter__(self):
        self._removers = [experts_module(self.handle, layer).register_forward_pre_hook(
            lambda m, a, k, i=i: self._read(i, m, a, k), with_kwargs=True) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for r in self._removers:
            r.remove()

    def _read(self, i: int, experts, args, kwargs):
        x, index, weights = _inputs(args, kwargs)
        rows = self.block_of[self.documents.long()].repeat_interleave(x.shape[0] // len(self.documents))
        keep = torch.ones(x.shape[0], dtype=torch.bool) if self.positions is None else self.positions.reshape(-1)
        rows = rows[keep]
        keep = keep.to(x.device)
        x, index, weights = x[keep], index[keep], weights[keep].double()
        chosen = F.one_hot(index, self.n_experts).sum(1).bool()          # [n, E]: the token's top-k experts
        weight = torch.zeros(len(x), self.n_experts, dtype=torch.float64, device=x.device)
        weight.scatter_add_(1, index, weights)
        self.tokens[:, i].index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        self.routed[:, i].index_add_(0, rows, chosen.double().cpu())
        self.weight[:, i].index_add_(0, rows, weight.cpu())
        I = self.d_expert
        sums = self._sums_on.setdefault(x.device, torch.zeros_like(self.sums, device=x.device))
        for e in torch.nonzero(chosen.any(0)).flatten().tolist():
            units = expert_units(experts, x[chosen[:, e]], e)
            sums[:, i, e * I:(e + 1) * I] += reduce_sums(units).double()

    def result(self, meta: dict) -> MoeStats:
        for sums in self._sums_on.values():
            self.sums += sums.cpu()
        self._sums_on.clear()
        if self.tokens.sum() == 0:
            raise ValueError("no tokens were counted: the data is empty (or every position was skipped)")
        return MoeStats(self.layers, self.top_k, self.tokens, self.routed, self.weight, self.sums, meta)


def collect_moe_stats(handle: ModelHandle, data: list[str], *, max_tokens: int | None = None, ctx: int = 256,
                      batch_size: int | None = None, skip_positions=(), n_blocks: int = 32, task: str | None = None,
                      progress: bool = False) -> MoeStats:
    """One task's MoeStats from its documents (one forward pass; documents cut into n_blocks blocks). Every
    counted token weighs 1 (lm.equal_positions is not applied: routing counts are counts of tokens)."""
    block_of = block_of_documents(documents_read(handle, data, max_tokens=max_tokens, ctx=ctx), n_blocks)
    with _RoutingReader(handle, block_of) as reader:
        run_batches(handle, data, reader, max_tokens=max_tokens, batch_size=batch_size, ctx=ctx, documents=True,
                    logits=True, skip_positions=skip_positions, progress=progress, desc=f"moe {task or ''}")
    return reader.result({"model": handle.label, "task": task, "max_tokens": max_tokens, "ctx": ctx})


# -- ablation inside experts ----------------------------------------------------------------------------------
@contextlib.contextmanager
def ablate_units(handle: ModelHandle, mask: torch.Tensor):
    """Zero the expert units in `mask` [len(moe_layers), E*I] while inside: each layer's experts output loses
    the ablated units' contribution, routing weight times down_proj of the units, for the tokens routed there."""
    layers = moe_layers(handle)
    n_experts, d_expert, _ = shape(handle)
    if tuple(mask.shape) != (len(layers), n_experts * d_expert):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the model has [MoE layers, experts x units] = "
                         f"{[len(layers), n_experts * d_expert]}")
    masks = mask.bool().view(len(layers), n_experts, d_expert)

    def hook(experts, args, kwargs, out, m):
        x, index, weights = _inputs(args, kwargs)
        out = out.clone()
        for e in torch.nonzero(m.any(1)).flatten().tolist():
            token, slot = torch.where(index == e)
            if len(token):
                units = expert_units(experts, x[token], e) * m[e].to(x.device, x.dtype)
                delta = F.linear(units, experts.down_proj[e]) * weights[token, slot, None]
                out.index_add_(0, token, -delta.to(out.dtype))
        return out

    removers = []
    try:
        for i, layer in enumerate(layers):
            if masks[i].any():
                removers.append(experts_module(handle, layer).register_forward_hook(
                    lambda mod, a, k, o, m=masks[i]: hook(mod, a, k, o, m), with_kwargs=True))
        yield
    finally:
        for r in removers:
            r.remove()


# -- router choices against task neurons ------------------------------------------------------------------------
def expert_counts(mask: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[L, E]: how many selected units each expert holds."""
    return mask.view(mask.shape[0], n_experts, -1).sum(-1).double()


def router_alignment(counts: torch.Tensor, share: torch.Tensor) -> float:
    """E x the mean, over a task's selected units, of the task's routing share of the unit's expert: 1 when the
    units sit where the router sends the task no more than uniformly (chance, also under any permutation of the
    experts within a layer), > 1 when they sit in the experts the task is sent to."""
    return float((counts * share).sum() / counts.sum() * share.shape[1])


def permutation_null(counts: torch.Tensor, share: torch.Tensor, n_null: int, seed: int) -> np.ndarray:
    """router_alignment with the experts' routing shares permuted within each layer (n_null draws, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.stack([torch.randperm(share.shape[1], generator=gen) for _ in share])
                         for _ in range(n_null)])
    return np.array([router_alignment(counts, share.gather(1, p)) for p in perms])


def alignment_claim(stats: dict, masks: dict, *, n_boot: int, n_null: int, seed: int) -> Claim:
    """The claim `moe_router_neurons`: the tasks' router_alignment, averaged over tasks, above chance (1). Interval:
    bootstrap over each task's documents (blocks) of its routing, the selected units fixed; p: against the
    permutation null, the experts' routing shares permuted within each layer."""
    per_task, boots, nulls = {}, [], []
    for j, (t, st) in enumerate(stats.items()):
        counts, share = expert_counts(masks[t], st.n_experts), st.routing_share()
        obs = router_alignment(counts, share)
        w = bootstrap_weights(st.tokens.shape[0], n_boot, seed + j)
        boot = np.array([router_alignment(counts, st.routing_share(wi)) for wi in w])
        null = permutation_null(counts, share, n_null, seed + j)
        per_task[t] = {"estimate": obs, "ci": percentile_ci(boot), "null_band": percentile_ci(null),
                       "p": resample_p(null, null >= obs, obs)}
        boots.append(boot)
        nulls.append(null)
    boot, null = np.mean(boots, 0), np.mean(nulls, 0)
    estimate = float(np.mean([r["estimate"] for r in per_task.values()]))
    return Claim("moe_router_neurons", "a task's specific expert units sit in the experts the router sends it to "
                 "(E x routing share of their experts, chance 1)", estimate, percentile_ci(boot), 1.0,
                 p=resample_p(null, null >= estimate, estimate), n=len(per_task), p_floor=1 / (1 + n_null),
                 floor_n=f"{n_null} permutations", observed=estimate, observed_ci=percentile_ci(boot),
                 null_band=percentile_ci(null), per_task=per_task)


# -- the section's steps ---------------------------------------------------------------------------------------
class MoeSection:
    """The MoE section of a notebook, run when params lm.moe_model is set (see `skip_reason`)."""

    def __init__(self, params: dict, report=None, handle: ModelHandle | None = None):
        self.params, self.report, self.p = params, report, params["lm"]
        if handle is None:
            device = device_of(params)
            placement = {"device_map": "auto"} if device == "sharded" else {"device": device}
            handle = load_model(self.p["moe_model"], dtype=dtype_of(params, "lm"), **placement)
        self.handle = handle
        self.layers = moe_layers(self.handle)
        self.n_experts, self.d_expert, self.top_k = shape(self.handle)
        self.tasks = TextTasks.from_params(params, tokenizer=self.handle.tokenizer)
        self.stats = self.scores = self.masks = self.matrix = self.random_matrix = self.base = self.claim = None

    @staticmethod
    def skip_reason(params: dict) -> str | None:
        """One line saying the section is skipped, or None when lm.moe_model is set."""
        if params["lm"].get("moe_model"):
            return None
        return ("MoE section skipped: lm.moe_model is not set (a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE hub id or "
                "local folder runs it)")

    def statistics(self) -> dict:
        """Per task its MoeStats; prints each task's most chosen expert per layer and its choice frequency."""
        p, ev = self.p, self.params["evidence"]
        self.stats = {t: collect_moe_stats(self.handle, self.tasks.statistics_data(t, p["stats_tokens"]),
                                           max_tokens=p["stats_tokens"], ctx=p["ctx"], batch_size=p["batch_size"],
                                           skip_positions=tuple(p["skip_positions"]), n_blocks=ev["n_blocks"], task=t)
                      for t in self.tasks.names}
        print(f"{self.handle.label}: {len(self.layers)} MoE layers, {self.n_experts} experts of {self.d_expert} "
              f"units, top-{self.top_k}")
        for t, st in self.stats.items():
            freq = st.choice_frequency()
            top = [f"L{l}:E{int(e)} {float(f):.2f}" for l, f, e in zip(self.layers, *freq.max(1))]
            print(f"  {t}: most chosen expert per layer (share of tokens) {', '.join(top)}")
        return self.stats

    def task_neurons(self, frac: float | None = None) -> dict:
        """Each task's top units (the dense models' scores and selection: params pruning.*), [L, E*I] masks."""
        pr = self.params["pruning"]
        frac = pr["frac"] if frac is None else frac
        neuron_stats = {t: st.neuron_stats() for t, st in self.stats.items()}
        general = weighted_pool(list(neuron_stats.values())) if pr["retain"] == "general" else None
        self.scores = task_scores(neuron_stats, importance=pr["importance"], eps=pr["eps"],
                                  eps_relative=pr["eps_relative"], retain=pr["retain"], general=general)
        self.masks = {t: select_neurons(s, frac, pr["mode"]) for t, s in self.scores.items()}
        return self.masks

    def names(self, task: str, n: int = 5) -> list[str]:
        """The names of a task's `n` top-scored selected units."""
        scores = torch.where(self.masks[task], self.scores[task], -torch.inf).flatten()
        flat = torch.topk(scores, min(n, int(self.masks[task].sum()))).indices.tolist()
        width = self.masks[task].shape[1]
        return [unit_name(self.layers[i // width], (i % width) // self.d_expert, i % self.d_expert) for i in flat]

    def ablation(self, seed: int | None = None) -> np.ndarray:
        """Top-1 of every task (columns) with each task's units (rows) zeroed, over the intact model's, and the
        same for as many random units in the same experts (seeded)."""
        seed = self.params["seed"] if seed is None else seed
        names = self.tasks.names
        self.base = self.tasks.accuracy(self.handle, names)

        def row(mask):
            with ablate_units(self.handle, mask):
                acc = self.tasks.accuracy(self.handle, names)
            return [acc[u] / self.base[u] if self.base[u] > 0 else np.nan for u in names]

        self.matrix = np.array([row(self.masks[t]) for t in names])
        self.random_matrix = np.array([row(matched_random_mask(self.masks[t].view(-1, self.d_expert), seed)
                                           .view_as(self.masks[t])) for t in names])
        return self.matrix

    def correspondence(self) -> Claim:
        """The claim `moe_router_neurons` (alignment_claim), recorded in the report when there is one."""
        ev = self.params["evidence"]
        self.claim = alignment_claim(self.stats, self.masks, n_boot=ev["n_boot"], n_null=ev["n_null"],
                                     seed=self.params["seed"])
        if self.report is not None:
            self.report.claim(self.claim)
        return self.claim

    def findings(self) -> str:
        names, c = self.tasks.names, self.claim
        off = ~np.eye(len(names), dtype=bool)
        own, others = _mean(np.diag(self.matrix)), _mean(self.matrix[off])
        text = (f"\nMoE model: {self.handle.label} ({len(self.layers)} MoE layers, {self.n_experts} experts, "
                f"top-{self.top_k}).\n"
                f"* Zeroing a task's {self.params['pruning']['frac']:.1%} most specific expert units leaves it at "
                f"{own:.2f} of its top-1 and the other tasks at {others:.2f}; as many random units in the same experts "
                f"leave it at {_mean(np.diag(self.random_matrix)):.2f} (a task with top-1 0 has no ratio).\n"
                f"* Router alignment (E x the routing share of the experts holding a task's units; chance 1): "
                f"{c.estimate:.2f} (95% CI {c.ci[0]:.2f}-{c.ci[1]:.2f}), permutation null band "
                f"{c.null_band[0]:.2f}-{c.null_band[1]:.2f}; the claim `moe_router_neurons`: {c.verdict}.\n")
        return text

    def results(self) -> dict:
        return {"model": self.handle.label, "layers": self.layers, "n_experts": self.n_experts,
                "d_expert": self.d_expert, "top_k": self.top_k, "tasks": self.tasks.names,
                "choice_frequency": {t: s.choice_frequency() for t, s in self.stats.items()},
                "mean_weight": {t: s.mean_weight() for t, s in self.stats.items()},
                "top_units": {t: self.names(t) for t in self.masks}, "unpruned_top1": self.base,
                "ablation": self.matrix, "ablation_random": self.random_matrix,
                "claim": self.claim.as_dict() if self.claim else None}


def _mean(x) -> float:
    """Mean of the finite values (NaN, without a warning, when there is none)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def run_section(params: dict, report=None) -> MoeSection | None:
    """The whole section: None (after one printed line) when lm.moe_model is not set."""
    reason = MoeSection.skip_reason(params)
    if reason:
        print(reason)
        return None
    moe = MoeSection(params, report)
    moe.statistics()
    moe.task_neurons()
    moe.ablation()
    moe.correspondence()
    print(moe.findings())
    return moe
