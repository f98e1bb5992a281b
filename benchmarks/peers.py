"""modsep against what a researcher would write instead (issue #30): nnsight and TransformerLens, side by side.

Two jobs, three ways each, on the same model, windows and positions:
  statistics: per-neuron mean, mean |x|, mean x², P(x>0) of every MLP's neuron vector (the input of the down
    projection; TransformerLens's blocks.{l}.mlp.hook_post) over a fixed token budget, position 0 of every
    window left out (params lm.skip_positions), padding never counted;
  ablation: top-1 next-token accuracy over the evaluation windows with a neuron mask zeroed, for T masks.
First the three are checked to agree (statistics to float tolerance, the same accuracies), then timed
interleaved in one run: tokens/s, ratio to a plain forward of the same batches, peak memory.

The peers are dev dependencies only (pyproject's dev extra); modsep_nb never imports them.

    python benchmarks/peers.py [--quick] [--gpu]      (bench.py --only peers / peers-gpu runs the same)
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run as a script from a checkout, installed or not

from modsep_nb.data import embedded_text_domain, lm_batches  # noqa: E402
from modsep_nb.evaluation import evaluate, lm_token_metrics  # noqa: E402
from modsep_nb.models import load_model  # noqa: E402
from modsep_nb.pruning import ablate  # noqa: E402
from modsep_nb.statistics import StatsCollector, collect_stats  # noqa: E402

STATS = ("mean", "mean_abs", "mean_sq", "frac_pos")
SKIP = (0,)                     # the default lm.skip_positions


def missing_peers() -> dict:
    """{library: why it cannot be used} for nnsight and transformer_lens (empty when both import)."""
    out = {}
    for name in ("nnsight", "transformer_lens"):
        try:
            __import__(name)
        except Exception as err:  # noqa: BLE001 - any import failure means the row cannot run
            out[name] = f"{name} is not importable ({type(err).__name__}: {err}); pip install -e '.[dev]'"
    return out


def versions() -> dict:
    from importlib.metadata import version
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("nnsight", "transformer_lens"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


# -- the same windows for everyone ---------------------------------------------------------------------------
def windows(tokenizer, docs, *, max_tokens, ctx, batch_size, skip=SKIP) -> list[tuple]:
    """(ids, attention_mask, counted) batches: the windows collect_stats/evaluate read (data.lm_batches),
    right-padded, so a window's position p is column p; counted = real tokens not at a skipped position."""
    out = []
    for ids, mask in lm_batches(tokenizer, docs, ctx=ctx, batch_size=batch_size, max_tokens=max_tokens):
        keep = mask.bool().clone()
        keep[:, [p for p in skip if p < keep.shape[1]]] = False
        out.append((ids, mask, keep))
    return out


class Sums:
    """What a researcher accumulates by hand: float64 totals of x, |x|, x², 1(x>0) of the counted rows."""

    def __init__(self, n_layers: int, d: int, device):
        self.totals = torch.zeros(n_layers, 4, d, dtype=torch.float64, device=device)
        self.count = torch.zeros(n_layers, dtype=torch.float64, device=device)

    def add(self, layer: int, x: torch.Tensor, keep: torch.Tensor) -> None:
        rows = x[keep].float()                                  # [counted, d]
        self.totals[layer] += torch.stack([rows.sum(0), rows.abs().sum(0), (rows * rows).sum(0),
                                           (rows > 0).sum(0).float()]).double()
        self.count[layer] += rows.shape[0]

    def means(self) -> dict:
        t = (self.totals / self.count[:, None, None]).cpu()
        return {name: t[:, i] for i, name in enumerate(STATS)}


# -- statistics, three ways ----------------------------------------------------------------------------------
@torch.no_grad()
def modsep_stats(handle, batches) -> dict:
    """modsep's collector as run_batches drives it: counted positions set from the CPU, a reading forward
    that stops after the last hooked layer, one fused reduction per layer into float64 totals."""
    with StatsCollector(handle) as collector:
        for ids, mask, keep in batches:
            collector.positions = keep
            handle.read_forward(ids.to(handle.device), mask.to(handle.device))
    stats = collector.result()
    return {name: getattr(stats, name) for name in STATS}


@torch.no_grad()
def nnsight_stats(model, batches, *, reduce_inside: bool = True) -> dict:
    """nnsight: one model.trace() per batch reading every layer's mlp.down_proj.input. reduce_inside: reduce
    in the trace body, then tracer.stop() after the last layer (nnsight's early stop); else .save() every
    layer's activations and reduce after the trace (the tutorial's way)."""
    import nnsight
    layers = model.model.layers
    device = next(model.parameters()).device
    # made before the traces: the trace body may mutate outer objects, but its new names do not come back
    sums = Sums(len(layers), model.config.intermediate_size, device)
    for ids, mask, keep in batches:
        keep = keep.to(device)
        with model.trace(ids.to(device), attention_mask=mask.to(device)) as tracer:
            if reduce_inside:
                for layer in range(len(layers)):
                    sums.add(layer, layers[layer].mlp.down_proj.input, keep)
                tracer.stop()
            else:
                saved = nnsight.save([layers[layer].mlp.down_proj.input for layer in range(len(layers))])
        if not reduce_inside:
            for layer, x in enumerate(saved):
                sums.add(layer, x, keep)
    return sums.means()


@torch.no_grad()
def tl_stats(bridge, batches, *, cache: bool = False) -> dict:
    """TransformerLens: run_with_hooks with a reducing hook on every blocks.{l}.mlp.hook_post and
    stop_at_layer past the last block (no unembedding); cache=True: run_with_cache(names_filter=...) and
    reduce the cached activations."""
    n_layers = len(bridge.blocks)
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    sums, state = None, {}

    def hook(x, hook):
        nonlocal sums
        if sums is None:
            sums = Sums(n_layers, x.shape[-1], x.device)
        sums.add(int(hook.name.split(".")[1]), x, state["keep"])

    device = bridge.cfg.device
    for ids, mask, keep in batches:
        state["keep"] = keep.to(device)
        ids, mask = ids.to(device), mask.to(device)
        if cache:
            _, cached = bridge.run_with_cache(ids, attention_mask=mask, names_filter=names.__contains__,
                                              stop_at_layer=n_layers)
            for name in names:
                hook(cached[name], _Named(name))
        else:
            bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(n, hook) for n in names],
                                  stop_at_layer=n_layers)
    return sums.means()


class _Named:
    def __init__(self, name):
        self.name = name


# -- ablation evaluation, three ways -------------------------------------------------------------------------
def top1_hits(logits, ids, mask, bos) -> tuple[int, int]:
    """(targets, top-1 hits) of one batch: next-token targets that are real tokens after a real token, BOS
    never a target (what evaluate counts, written out here for the peers)."""
    targets = ids[:, 1:]
    counted = mask[:, 1:].bool() & mask[:, :-1].bool() & (targets != bos)
    hits = (logits[:, :-1].argmax(-1) == targets) & counted
    return int(counted.sum()), int(hits.sum())


@torch.no_grad()
def modsep_ablation(handle, batches, masks) -> list[float]:
    """modsep: ablate(handle, mask) (forward-pre-hooks multiplying the neuron vector) around the forward
    and lm_token_metrics that evaluate uses."""
    bos = handle.tokenizer.bos_token_id
    out = []
    for mask in masks:
        n = hits = 0
        with ablate(handle, mask):
            for ids, attn, _ in batches:
                ids, attn = ids.to(handle.device), attn.to(handle.device)
                m = lm_token_metrics(handle.lm_logits(ids, attn), ids, attn, bos_token_id=bos, top1_only=True)
                n, hits = n + m["n"], hits + m["top1"]
        out.append(hits / n)
    return out


@torch.no_grad()
def nnsight_ablation(model, batches, masks, bos) -> list[float]:
    """nnsight: in each trace, set the masked entries of every layer's down_proj input to 0; save the logits."""
    layers = model.model.layers
    device = next(model.parameters()).device
    out = []
    for mask in masks:
        idx = [torch.nonzero(row).flatten().to(device) for row in mask]
        n = hits = 0
        for ids, attn, _ in batches:
            ids, attn = ids.to(device), attn.to(device)
            with model.trace(ids, attention_mask=attn):
                for layer, neurons in enumerate(idx):
                    if len(neurons):
                        layers[layer].mlp.down_proj.input[..., neurons] = 0
                logits = model.lm_head.output.save()
            a, b = top1_hits(logits, ids, attn, bos)
            n, hits = n + a, hits + b
        out.append(hits / n)
    return out


@torch.no_grad()
def tl_ablation(bridge, batches, masks, bos) -> list[float]:
    """TransformerLens: run_with_hooks with a hook on each blocks.{l}.mlp.hook_post zeroing the masked neurons."""
    device = bridge.cfg.device
    out = []
    for mask in masks:
        def zero(neurons):
            def hook(x, hook):
                x[..., neurons] = 0.0
                return x
            return hook
        hooks = [(f"blocks.{layer}.mlp.hook_post", zero(torch.nonzero(row).flatten().to(device)))
                 for layer, row in enumerate(mask) if row.any()]
        n = hits = 0
        for ids, attn, _ in batches:
            ids, attn = ids.to(device), attn.to(device)
            logits = bridge.run_with_hooks(ids, attention_mask=attn, fwd_hooks=hooks)
            a, b = top1_hits(logits, ids, attn, bos)
            n, hits = n + a, hits + b
        out.append(hits / n)
    return out


def random_masks(n_layers: int, d: int, t: int, frac: float = 0.1, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n_layers, d, generator=g) < frac for _ in range(t)]


# -- the peers' models ----------------------------------------------------------------------------------------
def peer_models(hf_model, tokenizer) -> dict:
    """{"nnsight": TransformersModel, "tl": TransformerBridge, "tl_boot_s": seconds} around copies of
    `hf_model` (TransformerLens switches its model to eager attention in place, so it gets its own copy;
    nnsight wraps another so neither shares modules with modsep's)."""
    from nnsight import TransformersModel
    from transformer_lens.model_bridge import TransformerBridge
    out = {"nnsight": TransformersModel(copy.deepcopy(hf_model), tokenizer=tokenizer, task="text-generation")}
    tl_model = copy.deepcopy(hf_model)
    start = time.perf_counter()
    out["tl"] = TransformerBridge.boot_transformers(tl_model.config.name_or_path or "local", hf_model=tl_model,
                                                    tokenizer=tokenizer, dtype=next(hf_model.parameters()).dtype)
    out["tl_boot_s"] = time.perf_counter() - start
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in STATS)


# -- timing ---------------------------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: fastest of `repeats` timed calls}, the calls taken in turn so drift affects all alike (after
    one warm-up each); interference from the rest of the machine only ever adds time."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def peak_memory_mb(fn) -> float:
    """Peak memory fn() adds: CUDA allocated bytes on a GPU; else the process's resident set, sampled every
    millisecond (run it in a fresh process: memory freed earlier and reused does not show)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    import psutil
    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0] - base, 0) / 2 ** 20


# -- the rows -------------------------------------------------------------------------------------------------
def compare(handle, hf_model, batches, eval_batches, masks, *, repeats: int = 3, docs=None, budgets=None,
            memory: bool = True) -> dict:
    """Check the three agree, then time them interleaved. docs/budgets: also check that modsep's
    collect_stats and evaluate on the documents (the package's entry points) give what the windows give."""
    peers = peer_models(hf_model, handle.tokenizer)
    nn, tl = peers["nnsight"], peers["tl"]
    bos = handle.tokenizer.bos_token_id
    n_tok = sum(int(k.sum()) for _, _, k in batches)
    n_read = sum(int(m.sum()) for _, m, _ in batches)
    n_eval = sum(int(m.sum()) for _, m, _ in eval_batches) * len(masks)

    # 1. agreement
    ours = modsep_stats(handle, batches)
    stats = {"nnsight": nnsight_stats(nn, batches), "nnsight_saved": nnsight_stats(nn, batches, reduce_inside=False),
             "tl_hooks": tl_stats(tl, batches), "tl_cache": tl_stats(tl, batches, cache=True)}
    diffs = {name: max_abs_diff(ours, s) for name, s in stats.items()}
    scale = max(float(ours[k].abs().max()) for k in STATS)
    acc = {"modsep": modsep_ablation(handle, eval_batches, masks), "nnsight": nnsight_ablation(nn, eval_batches, masks, bos),
           "tl": tl_ablation(tl, eval_batches, masks, bos)}
    agree = {"stats_max_abs_diff": diffs, "stats_scale": scale, "accuracies": acc}
    if docs is not None:
        pkg = collect_stats(handle, docs, max_tokens=budgets["stats_tokens"], ctx=budgets["ctx"],
                            batch_size=budgets["batch_size"], skip_positions=SKIP, progress=False)
        agree["collect_stats_vs_windows"] = max_abs_diff(ours, {k: getattr(pkg, k) for k in STATS})
        with ablate(handle, masks[0]):
            agree["evaluate_vs_windows"] = evaluate(handle, docs, max_tokens=budgets["eval_tokens"], ctx=budgets["ctx"],
                                                    batch_size=budgets["batch_size"])["top1"] - acc["modsep"][0]

    # 2. timing, interleaved
    def plain(bs):
        def run():
            with torch.no_grad():
                for ids, mask, _ in bs:
                    handle.lm_logits(ids.to(handle.device), mask.to(handle.device))
        return run
    stat_fns = {"plain": plain(batches), "modsep": lambda: modsep_stats(handle, batches),
                "nnsight": lambda: nnsight_stats(nn, batches),
                "nnsight_saved": lambda: nnsight_stats(nn, batches, reduce_inside=False),
                "tl_hooks": lambda: tl_stats(tl, batches), "tl_cache": lambda: tl_stats(tl, batches, cache=True)}
    stat_s = interleaved(stat_fns, repeats)
    plain_eval = plain(eval_batches)
    abl_fns = {"plain": lambda: [plain_eval() for _ in masks], "modsep": lambda: modsep_ablation(handle, eval_batches, masks),
               "nnsight": lambda: nnsight_ablation(nn, eval_batches, masks, bos),
               "tl": lambda: tl_ablation(tl, eval_batches, masks, bos)}
    abl_s = interleaved(abl_fns, repeats)
    from modsep_nb.statistics import _COMPILED
    row = {"modsep_fused_compiled": _COMPILED.get("reduce") not in (None, False), "tokens_counted": n_tok, "tokens_read": n_read, "eval_tokens_read": n_eval, "masks": len(masks),
           "tl_boot_s": peers["tl_boot_s"], "agree": agree,
           "stats": {name: {"seconds": s, "tokens_per_s": n_read / s, "over_plain": s / stat_s["plain"]}
                     for name, s in stat_s.items()},
           "ablation": {name: {"seconds": s, "tokens_per_s": n_eval / s, "over_plain": s / abl_s["plain"]}
                        for name, s in abl_s.items()}}
    if memory and torch.cuda.is_available():
        for name, fn in stat_fns.items():
            row["stats"][name]["peak_mb"] = peak_memory_mb(fn)
        for name, fn in abl_fns.items():
            row["ablation"][name]["peak_mb"] = peak_memory_mb(fn)
    return row


# -- CPU: SmolLM2-135M at the default budgets -----------------------------------------------------------------
DEFAULT_BUDGETS = {"stats_tokens": 4096, "eval_tokens": 512, "ctx": 64, "batch_size": 8, "masks": 8}
QUICK_BUDGETS = {"stats_tokens": 512, "eval_tokens": 128, "ctx": 64, "batch_size": 8, "masks": 2}


def _smollm2(budgets):
    handle = load_model("smollm2-135m", dtype=torch.float32)
    docs = embedded_text_domain("code")
    batches = windows(handle.tokenizer, docs, max_tokens=budgets["stats_tokens"], ctx=budgets["ctx"],
                      batch_size=budgets["batch_size"])
    eval_batches = windows(handle.tokenizer, docs, max_tokens=budgets["eval_tokens"], ctx=budgets["ctx"],
                           batch_size=budgets["batch_size"])
    masks = random_masks(handle.n_layers, handle.d_mlp, budgets["masks"])
    return handle, docs, batches, eval_batches, masks


def bench_peers_cpu(quick: bool = False, repeats: int = 3) -> dict:
    """SmolLM2-135M (float32, CPU) at the default budgets (params/default.yaml lm: 4096 statistics tokens, 512
    evaluation tokens per mask, ctx 64, batch 8; T = 8 masks of 10% random neurons)."""
    budgets = QUICK_BUDGETS if quick else DEFAULT_BUDGETS
    handle, docs, batches, eval_batches, masks = _smollm2(budgets)
    row = compare(handle, handle.model, batches, eval_batches, masks, repeats=repeats, docs=docs, budgets=budgets)
    row.update({"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "budgets": budgets,
                "versions": versions(), "cpu_threads": torch.get_num_threads()})
    row["tl_conversion"] = _tl_conversion_cost(handle)
    row["peak_rss_mb"] = {name: _memory_child(name, quick) for name in MEMORY_JOBS}
    return row


def _tl_conversion_cost(handle) -> dict:
    """Seconds to load the HF model from its local folder and to boot the TransformerLens bridge around it,
    and whether enable_compatibility_mode (the HookedTransformer weight processing) works on it."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    path = handle.model.config.name_or_path
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    bridge = TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=handle.tokenizer)
    boot_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        bridge.enable_compatibility_mode()
        compat = {"compat_s": time.perf_counter() - start}
    except Exception as err:  # noqa: BLE001 - report, do not fail the row
        compat = {"compat_error": f"{type(err).__name__}: {str(err)[:200]}"}
    return {"hf_load_s": load_s, "boot_s": boot_s, **compat}


MEMORY_JOBS = ("plain", "modsep", "nnsight", "tl_hooks", "tl_cache")


def _memory_child(name: str, quick: bool) -> float | None:
    """Peak resident memory one statistics pass of `name` adds, measured in a fresh process (CPU)."""
    args = [sys.executable, str(Path(__file__).resolve()), "--memory-of", name] + (["--quick"] if quick else [])
    done = subprocess.run(args, capture_output=True, text=True)
    try:
        return float(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _memory_main(name: str, quick: bool) -> None:
    handle, _, batches, _, _ = _smollm2(QUICK_BUDGETS if quick else DEFAULT_BUDGETS)
    peers = peer_models(handle.model, handle.tokenizer) if name not in ("plain", "modsep") else {}
    fn = {"plain": lambda: [handle.lm_logits(i, m) for i, m, _ in batches],
          "modsep": lambda: modsep_stats(handle, batches),
          "nnsight": lambda: nnsight_stats(peers["nnsight"], batches),
          "tl_hooks": lambda: tl_stats(peers["tl"], batches),
          "tl_cache": lambda: tl_stats(peers["tl"], batches, cache=True)}[name]
    with torch.no_grad():
        fn()                                    # warm-up: compile, caches, allocator pools
        print(peak_memory_mb(fn))


# -- GPU: a Mistral-7B shape, random weights ------------------------------------------------------------------
def bench_peers_gpu(size: str = "full", device: str = "cuda", dtype=torch.bfloat16, repeats: int = 3) -> dict:
    """The same rows for a Mistral-7B-shaped model with random weights (bench.GPU_SIZES), batches of random
    token ids, position 0 left out; 4 masks of 10% random neurons over the same batches."""
    import transformers
    from bench import GPU_SIZES
    z = GPU_SIZES[size]
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=z["layers"], hidden_size=z["hidden"],
                                     intermediate_size=z["mlp"], num_attention_heads=z["heads"],
                                     num_key_value_heads=z["kv_heads"], vocab_size=z["vocab"], bos_token_id=1)
    with torch.device(device):
        model = transformers.MistralForCausalLM(cfg).to(dtype).eval()
    handle = load_model(model, tokenizer=word_tokenizer(z["vocab"]))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(2, z["vocab"], (z["batch"], z["seq"]), generator=g)
        mask = torch.ones_like(ids)
        keep = mask.bool().clone()
        keep[:, list(SKIP)] = False
        batches.append((ids, mask, keep))
    masks = random_masks(handle.n_layers, handle.d_mlp, 4)
    row = compare(handle, model, batches, batches[:1], masks, repeats=repeats)
    row.update({"model": "mistral-7b shape, random weights", "size": size, "device": device, "dtype": str(dtype),
                "versions": versions()})
    return row


def word_tokenizer(vocab: int):
    """A real (transformers) tokenizer for random-weight models, which the peers' wrappers need: word w{i} is
    id i, w0 padding and unknown, w1 BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    import tempfile
    from transformers import AutoTokenizer
    folder = tempfile.mkdtemp(prefix="peers-tokenizer-")     # TransformerLens reloads a tokenizer from its folder
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", pad_token="w0", unk_token="w0").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# -- report ---------------------------------------------------------------------------------------------------
def table(row: dict) -> str:
    name = f"{row['model']}, {row['device']}"
    s, a = row["stats"], row["ablation"]
    lines = [f"peers, {name}: statistics of {row['tokens_read']} tokens (tok/s, x plain forward)"]
    for key in ("modsep", "nnsight", "nnsight_saved", "tl_hooks", "tl_cache"):
        r = s[key]
        mem = row.get("peak_rss_mb", {}).get(key) or r.get("peak_mb")
        lines.append(f"  {key:<14} {r['tokens_per_s']:9.0f} tok/s  {r['over_plain']:.3f}x  "
                     f"{(s[key]['seconds'] / s['modsep']['seconds']):.2f}x modsep's time"
                     + (f"  peak +{mem:.0f} MB" if mem is not None else ""))
    lines.append(f"  max |diff| vs modsep: " + ", ".join(f"{k} {v:.1e}" for k, v in row["agree"]["stats_max_abs_diff"].items()))
    lines.append(f"peers, {name}: ablation, {row['masks']} masks x {row['eval_tokens_read'] // row['masks']} tokens")
    for key in ("modsep", "nnsight", "tl"):
        r = a[key]
        lines.append(f"  {key:<14} {r['tokens_per_s']:9.0f} tok/s  {r['over_plain']:.3f}x  "
                     f"{(r['seconds'] / a['modsep']['seconds']):.2f}x modsep's time")
    lines.append(f"  accuracies equal: {len(set(map(tuple, row['agree']['accuracies'].values()))) == 1}; "
                 f"TransformerLens boot {row['tl_boot_s']:.2f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller budgets (a minute)")
    parser.add_argument("--gpu", action="store_true", help="the Mistral-7B-shape rows (needs CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        _memory_main(args.memory_of, args.quick)
        return 0
    missing = missing_peers()
    if missing:
        print("peers benchmark skipped: " + "; ".join(missing.values()))
        return 0
    rows = {"cpu": bench_peers_cpu(args.quick, args.repeats)}
    if args.gpu and torch.cuda.is_available():
        rows["gpu"] = bench_peers_gpu("quick" if args.quick else "full", repeats=args.repeats)
    for row in rows.values():
        print(table(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
