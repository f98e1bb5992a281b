"""Benchmarks (`make bench`): ratios measured side by side in one run, printed as a table and written to
outputs/bench/*.json. Runs on the CPU, and on a GPU when there is one (bf16 there).

    python benchmarks/bench.py [--quick] [--only stats,reference,kmeans,memory,correspondence,gpu,peers,peers-gpu]

peers / peers-gpu: modsep against nnsight and TransformerLens (benchmarks/peers.py; skipped, saying why, where
those dev dependencies are missing).
grid (`--only grid`, not in the default set): benchmarks/paper_grid.py, the paper's whole pipeline at full size
on a GPU (Mistral-7B shape, 23 tasks), at its tiny size on the CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run as a script from a checkout, installed or not

from modsep_nb.correspondence import layer_correspondence  # noqa: E402
from modsep_nb.data import embedded_text_domain, lm_batches  # noqa: E402
from modsep_nb.files import write_text_atomic  # noqa: E402
from modsep_nb.models import load_model  # noqa: E402
from modsep_nb.moefication import balanced_kmeans, inertia, normalize_rows, random_balanced_split  # noqa: E402
from modsep_nb.statistics import StatsCollector, collect_stats  # noqa: E402

OUT = REPO / "outputs" / "bench"


def _timeit(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# -- statistics overhead ------------------------------------------------------------------------------
@torch.no_grad()
def stats_overhead(handle, batches, repeats=3, positions=True) -> dict:
    """Forward with statistics hooks over the plain forward of the same batches, interleaved; and the pass
    collect_stats runs, which stops after the last hooked layer (no unembedding or classifier head)."""
    forward = handle.lm_logits if handle.kind == "lm" else (lambda x, _m=None: handle.image_logits(x))
    collector = StatsCollector(handle)
    # as run_batches does: the counted positions are handed over from the CPU (no device sync)
    counted = [mask.bool().cpu() if (positions and mask is not None) else None for _, mask in batches]

    def plain():
        for ids, mask in batches:
            forward(ids, mask)

    def with_stats():
        with collector:
            for (ids, mask), pos in zip(batches, counted):
                collector.positions = pos
                forward(ids, mask)
    def reading():
        with collector:
            for (ids, mask), pos in zip(batches, counted):
                collector.positions = pos
                handle.read_forward(ids, mask)
    plain_times, stats_times, read_times = [], [], []
    plain(), with_stats(), reading()            # warm-up all (and compile the fused reduction)
    for _ in range(repeats):                   # interleaved, so drift affects all alike
        plain_times.append(_timeit(plain, 1))
        stats_times.append(_timeit(with_stats, 1))
        read_times.append(_timeit(reading, 1))
    # the fastest of the repeats: interference from the rest of the machine only ever adds time
    p, s, r = min(plain_times), min(stats_times), min(read_times)
    n_tok = sum(int(ids.numel()) if mask is None else int(mask.sum()) for ids, mask in batches)
    hooks = _hook_seconds(handle, batches[0], counted[0], forward) * len(batches)
    return {"plain_s": p, "stats_s": s, "ratio": s / p, "tokens": n_tok, "tokens_per_s_with_stats": n_tok / s,
            "plain_times": plain_times, "stats_times": stats_times, "hooks_s": hooks, "hooks_over_plain": hooks / p,
            "read_s": r, "read_over_plain": r / p, "read_times": read_times}


@torch.no_grad()
def _hook_seconds(handle, batch, positions, forward, repeats: int = 5) -> float:
    """Seconds the statistics hooks take for one batch, timed by replaying the batch's captured neuron
    activations through them: free of the forward's own run-to-run noise, which on a shared CPU is larger
    than the hooks' cost."""
    with handle.capture() as captured:
        forward(*batch)
    collector = StatsCollector(handle)
    readers = [collector._reader(layer) for layer in range(handle.n_layers)]

    def replay():
        collector.positions = positions
        for layer, read in enumerate(readers):
            read(captured[layer][0])
        _sync()
    replay()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        replay()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def reduction_alone_vs_collector(handle, batch, positions, forward, repeats: int = 20) -> dict:
    """Milliseconds per layer for one batch's captured layer-0 activations: the collector's hook (its reduction
    compiled once per process, after whatever shapes came before, plus the float64 accumulation), the process's
    compiled reduction called alone, the same compiled afresh for this shape alone (dynamic=False), the plain
    one-stage column sums so compiled (the layout before issue #27), eager, and the floors: x.sum(0) and x.clone()
    (one read; one read and one write). Issue #27 measured 1.03 ms in the collector vs 0.37 ms alone for the ViT."""
    from modsep_nb import statistics as S
    with handle.capture([0]) as captured:
        forward(*batch)
    raw = captured[0][0]
    x = raw.reshape(-1, raw.shape[-1])
    collector = StatsCollector(handle, layers=[0])
    collector.positions = positions
    keep = None if collector._all_counted else collector._keep(x.device)
    read = collector._reader(0)
    alone = torch.compile(S._masked_reduce, dynamic=False, fullgraph=True)
    one_stage = torch.compile(S._plain_sums, dynamic=False, fullgraph=True)
    calls = {"in_collector": lambda: read(raw), "process_compiled": lambda: S._compiled_reduce(x, keep),
             "compiled_alone_static": lambda: alone(x, keep), "one_stage_static": lambda: one_stage(x, keep),
             "eager": lambda: S._masked_reduce(x, keep), "floor_sum": lambda: x.sum(0),
             "floor_clone": lambda: x.clone()}

    def per_call(fn):
        fn()
        _sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync()
        return 1e3 * (time.perf_counter() - start) / repeats
    out = {f"{name}_ms": min(per_call(fn), per_call(fn)) for name, fn in calls.items()}
    out["rows_x_columns"] = list(x.shape)
    out["dtype"] = str(x.dtype).removeprefix("torch.")
    return out


@torch.no_grad()
def reference_collector(handle, texts, max_tokens) -> dict:
    """The reference's way: one text per forward, and for every token a float64 update on the model's device
    (Welford mean and M2, |x|, sqrt|x|, positive and negative mass, positive count), layer by layer. On a GPU
    it is bound by kernel launches (docs/method.md §10: 86 tokens/s for a Mistral-7B shape on an H200)."""
    L, d = handle.n_layers, handle.d_mlp
    names = ("mean", "m2", "abs", "sqrt", "pos", "neg", "n_pos")
    acc = {k: torch.zeros(L, d, dtype=torch.float64, device=handle.device) for k in names}
    seen = [0] * L
    state = {"n": 0}

    def make(layer):
        def read(x):
            for token in x[0]:                         # every token, one at a time
                x = token.double()
                seen[layer] += 1
                delta = x - acc["mean"][layer]
                acc["mean"][layer] += delta / seen[layer]
                acc["m2"][layer] += delta * (x - acc["mean"][layer])
                acc["abs"][layer] += x.abs()
                acc["sqrt"][layer] += x.abs().sqrt()
                acc["pos"][layer] += x.clamp(min=0)
                acc["neg"][layer] += x.clamp(max=0)
                acc["n_pos"][layer] += x > 0
        return read
    start = time.perf_counter()
    with handle.hooks({layer: make(layer) for layer in range(L)}):
        for text in texts:
            ids = handle.tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens - state["n"]]
            handle.model(input_ids=ids.to(handle.device))
            state["n"] += ids.shape[1]
            if state["n"] >= max_tokens:
                break
        _sync()
    elapsed = time.perf_counter() - start
    return {"tokens": state["n"], "seconds": elapsed, "tokens_per_s": state["n"] / elapsed,
            "mean": acc["mean"].cpu(), "mean_abs": acc["abs"].cpu() / max(seen[0], 1)}


def bench_lm_cpu(quick: bool) -> dict:
    handle = load_model("smollm2-135m")
    docs = embedded_text_domain("code")
    n_tokens = 2048 if quick else 8192
    batches = list(lm_batches(handle.tokenizer, docs, ctx=256, batch_size=8, max_tokens=n_tokens))
    overhead = stats_overhead(handle, batches, repeats=5)
    ref_tokens = 256 if quick else 1024
    ref = reference_collector(handle, docs, ref_tokens)
    start = time.perf_counter()
    collect_stats(handle, docs, max_tokens=ref_tokens, ctx=256, batch_size=8, progress=False)
    ours = ref_tokens / (time.perf_counter() - start)
    return {"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "overhead": overhead,
            "reference_tokens_per_s": ref["tokens_per_s"], "ours_tokens_per_s": ours,
            "throughput_ratio_vs_reference": ours / ref["tokens_per_s"]}


# -- peak memory at 1x and 10x tokens -----------------------------------------------------------------
_MEMORY_CHILD = """
import resource, sys, torch
import modsep_nb as ms
from modsep_nb.data import embedded_text_domain
h = ms.load_model("smollm2-135m")
docs = embedded_text_domain("computers")
ms.collect_stats(h, docs, max_tokens=64, ctx=128, batch_size=4, progress=False)   # warm-up allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ms.collect_stats(h, docs, max_tokens=int(sys.argv[1]), ctx=128, batch_size=4, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, before)
"""


def bench_memory(quick: bool) -> dict:
    base = 512 if quick else 1024
    result = {}
    for n in (base, 10 * base):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n)], capture_output=True, text=True,
                             check=True).stdout.split()
        result[n] = {"peak_rss_mb": int(out[0]) / 1024}
    small, large = result[base]["peak_rss_mb"], result[10 * base]["peak_rss_mb"]
    return {"tokens": [base, 10 * base], "peak_rss_mb": [small, large], "growth_ratio": large / small}


# -- balanced k-means vs k-means-constrained ------------------------------------------------------------
def bench_kmeans(quick: bool) -> dict:
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError:
        KMeansConstrained = None
    results = {}
    w = normalize_rows(load_model("smollm2-135m").w_in(5).float())
    cases = [("smollm2-135m layer 5 (1536 x 576, 48 x 32)", w, 48, 10)]
    if not quick:
        g = torch.Generator().manual_seed(0)
        big = normalize_rows(torch.randn(14336, 4096, generator=g))
        cases.append(("Mistral-scale random unit rows (14336 x 4096, 128 x 112)", big, 128, 1))
    for name, x, k, their_n_init in cases:
        start = time.perf_counter()
        labels = balanced_kmeans(x, k, seed=0)
        ours_s = time.perf_counter() - start
        row = {"ours_s": ours_s, "ours_inertia": inertia(x, labels),
               "balanced": bool((torch.bincount(labels, minlength=k) == x.shape[0] // k).all())}
        if KMeansConstrained is not None:
            size = x.shape[0] // k
            km = KMeansConstrained(n_clusters=k, size_min=size, size_max=size, random_state=0, n_init=their_n_init)
            start = time.perf_counter()
            their_labels = km.fit_predict(x.double().numpy())
            theirs_s = time.perf_counter() - start
            row.update({"theirs_n_init": their_n_init, "theirs_s": theirs_s,
                        "theirs_inertia": inertia(x, torch.as_tensor(their_labels)),
                        # at their default n_init=10 the run takes n_init times one restart
                        "theirs_s_at_default_n_init": theirs_s * 10 / their_n_init,
                        "timed_one_restart": their_n_init != 10})
            row["speedup_vs_default"] = row["theirs_s_at_default_n_init"] / ours_s
            row["inertia_ratio"] = row["ours_inertia"] / row["theirs_inertia"]
        results[name] = row
    return results


# -- GPU ---------------------------------------------------------------------------------------------
# "full" is what the goals name; "quick" is one GPU minute; "tiny" runs the same code on the CPU (a test).
GPU_SIZES = {
    "full": dict(layers=32, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=32000, batch=8, seq=1024,
                 vit=dict(), vit_batch=256, kmeans=(14336, 4096, 128), reference_tokens=512),
    "quick": dict(layers=4, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=32000, batch=8, seq=1024,
                  vit=dict(), vit_batch=256, kmeans=(14336, 4096, 128), reference_tokens=256),
    "tiny": dict(layers=2, hidden=64, mlp=224, heads=4, kv_heads=2, vocab=256, batch=2, seq=32,
                 vit=dict(depth=2, embed_dim=32, num_heads=2, img_size=32), vit_batch=4, kmeans=(224, 64, 7),
                 reference_tokens=16),
}
# k-means-constrained at its defaults (n_init=10) on one Mistral-scale layer, 2 CPU cores (BENCHMARKS.md;
# docs/method.md §10 anchor: 40 s per restart, ≈ 7 min): what the GPU run is compared with, as it has no GPU path
THEIRS_MISTRAL_SCALE_CPU_S = 569.0


def bench_correspondence(quick: bool) -> dict:
    """layer_correspondence at SmolLM2's shape (30 layers x 1536 neurons, 48 experts, 5% selected, 100 null
    partitions per layer): the cost of one task x fraction cell of notebook 05."""
    n_layers, d, n_experts = 30, 1536, 48
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([random_balanced_split(d, n_experts, seed=i) for i in range(n_layers)])
    selected = torch.rand(n_layers, d, generator=g) < 0.05
    seconds = _timeit(lambda: layer_correspondence(selected, labels, n_null=100, seed=0), 1 if quick else 3)
    return {"shape": [n_layers, d, n_experts], "n_null": 100, "seconds": seconds}


def bench_gpu(size: str = "full", device: str = "cuda", dtype=torch.bfloat16) -> dict:
    """Statistics overhead for a Mistral-7B-shaped model (random weights) and ViT-B/16, ours vs the
    reference collector, and balanced k-means on a Mistral-scale layer, all on `device` in `dtype`."""
    import timm
    import transformers
    z = GPU_SIZES[size]
    results = {}
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=z["layers"], hidden_size=z["hidden"],
                                     intermediate_size=z["mlp"], num_attention_heads=z["heads"],
                                     num_key_value_heads=z["kv_heads"], vocab_size=z["vocab"])
    with torch.device(device):
        model = transformers.MistralForCausalLM(cfg).to(dtype).eval()
    handle = load_model(model, tokenizer=_FakeTokenizer(z["vocab"]))
    ids = torch.randint(0, z["vocab"], (z["batch"], z["seq"]), device=device)
    mask = torch.ones_like(ids)
    row = stats_overhead(handle, [(ids, mask)] * 4, repeats=5)
    row["reduction"] = reduction_alone_vs_collector(handle, (ids, mask), mask.bool().cpu(), handle.lm_logits)
    ref = reference_collector(handle, ["x y z " * z["reference_tokens"]] * 4, z["reference_tokens"])
    row.update({"layers": z["layers"], "batch": [z["batch"], z["seq"]], "reference_tokens_per_s": ref["tokens_per_s"],
                "throughput_ratio_vs_reference": row["tokens_per_s_with_stats"] / ref["tokens_per_s"]})
    results["mistral_7b_shape"] = row
    del model, handle
    if device == "cuda":
        torch.cuda.empty_cache()
    with torch.device(device):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, **z["vit"]).to(dtype).eval()
    image = vit.patch_embed.img_size
    x = torch.randn(z["vit_batch"], 3, *image, device=device, dtype=dtype)
    results["vit_b16"] = stats_overhead(load_model(vit), [(x, None)] * 4, repeats=5, positions=False)
    results["vit_b16"]["batch"] = z["vit_batch"]
    vit_handle = load_model(vit)
    results["vit_b16"]["reduction"] = reduction_alone_vs_collector(vit_handle, (x,), None,
                                                                   lambda x: vit_handle.image_logits(x))
    n, dim, k = z["kmeans"]
    rows = normalize_rows(torch.randn(n, dim, generator=torch.Generator().manual_seed(0))).to(device)
    _sync()
    start = time.perf_counter()
    labels = balanced_kmeans(rows, k, seed=0, device=device)
    _sync()
    ours = time.perf_counter() - start
    results["kmeans_mistral_scale"] = {
        "ours_s": ours, "inertia": inertia(rows.cpu(), labels.cpu()), "shape": [n, dim, k],
        "balanced": bool((torch.bincount(labels.cpu(), minlength=k) == n // k).all()),
        "theirs_cpu_s": THEIRS_MISTRAL_SCALE_CPU_S, "speedup_vs_theirs_cpu": THEIRS_MISTRAL_SCALE_CPU_S / ours}
    return results


def _sync() -> None:
    """Wait for queued GPU work, so that wall-clock times include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _FakeTokenizer:
    """Random-weight models need no real tokenizer: map words to ids."""
    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[hash(w) % self.vocab for w in text.split()]])
        return {"input_ids": ids}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a minute or two)")
    parser.add_argument("--only", default="stats,memory,kmeans,correspondence,gpu,peers,peers-gpu")
    args = parser.parse_args(argv)
    parts = args.only.split(",")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "quick": args.quick}
    results = {"meta": meta}
    if "stats" in parts:
        results["lm_cpu"] = bench_lm_cpu(args.quick)
    if "memory" in parts:
        results["memory"] = bench_memory(args.quick)
    if "kmeans" in parts:
        results["kmeans"] = bench_kmeans(args.quick)
    if "correspondence" in parts:
        results["correspondence"] = bench_correspondence(args.quick)
    if "gpu" in parts and torch.cuda.is_available():
        results["gpu"] = bench_gpu("quick" if args.quick else "full")
    if "grid" in parts:             # not in the default set: the paper's whole pipeline (paper_grid.py)
        import paper_grid
        grid = paper_grid.run("full" if torch.cuda.is_available() else "tiny")
        results["grid"] = {k: grid[k] for k in ("settings", "stages", "total_s")}
    if {"peers", "peers-gpu"} & set(parts):
        import peers
        missing = peers.missing_peers()
        if missing:
            results["peers_skipped"] = "; ".join(missing.values())
        else:
            if "peers" in parts:
                results["peers_cpu"] = peers.bench_peers_cpu(args.quick)
            if "peers-gpu" in parts and torch.cuda.is_available():
                results["peers_gpu"] = peers.bench_peers_gpu("quick" if args.quick else "full")
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = meta["date"].replace(":", "").replace("-", "")[:15]
    text = json.dumps(results, indent=1, default=str)
    write_text_atomic(OUT / f"bench-{stamp}.json", text)
    write_text_atomic(OUT / "latest.json", text)
    print(table(results))
    for key in ("peers_cpu", "peers_gpu"):
        if key in results:
            import peers
            print(peers.table(results[key]))
    if "peers_skipped" in results:
        print("peers skipped: " + results["peers_skipped"])
    return 0


def table(results: dict) -> str:
    rows = [("what", "figure", "goal")]
    if "lm_cpu" in results:
        r = results["lm_cpu"]
        rows += [("stats / plain forward, smollm2-135m, CPU", f"{r['overhead']['ratio']:.3f}x (hooks alone: "
                  f"{r['overhead']['hooks_over_plain']:.2%} of the forward)", "<= 1.05x"),
                 ("collect_stats's pass (stops after the last hooked layer) / plain forward, CPU",
                  f"{r['overhead']['read_over_plain']:.3f}x", "< 1x: no unembedding"),
                 ("ours vs reference-style collector, CPU", f"{r['throughput_ratio_vs_reference']:.1f}x "
                  f"({r['ours_tokens_per_s']:.0f} vs {r['reference_tokens_per_s']:.1f} tok/s)", "report")]
    if "memory" in results:
        m = results["memory"]
        rows.append((f"peak RSS at {m['tokens'][0]} vs {m['tokens'][1]} tokens",
                     f"{m['peak_rss_mb'][0]:.0f} vs {m['peak_rss_mb'][1]:.0f} MB ({m['growth_ratio']:.3f}x)", "no growth"))
    for name, r in results.get("kmeans", {}).items():
        if "theirs_s" in r:
            rows.append((f"balanced k-means, {name}", f"ours {r['ours_s']:.2f} s vs k-means-constrained "
                         f"{r['theirs_s_at_default_n_init']:.1f} s{' (1 restart x10)' if r['timed_one_restart'] else ''}: "
                         f"{r['speedup_vs_default']:.1f}x; inertia ratio {r['inertia_ratio']:.4f}", ">= 10x CPU, <= 1.01"))
    if "correspondence" in results:
        c = results["correspondence"]
        rows.append(("layer correspondence, 30 x 1536, 48 experts, 100 nulls", f"{c['seconds']:.2f} s", "< 10 s"))
    for name, r in results.get("gpu", {}).items():
        if "ratio" in r:
            rows.append((f"GPU stats / plain forward, {name}", f"{r['ratio']:.3f}x (hooks alone: "
                         f"{r['hooks_over_plain']:.2%}; stopping after the last hooked layer: "
                         f"{r['read_over_plain']:.3f}x)", "<= 1.03x / 1.05x"))
        if "reduction" in r:
            red = r["reduction"]
            rows.append((f"GPU reduction per layer, {name} ({' x '.join(map(str, red['rows_x_columns']))})",
                         f"in the collector {red['in_collector_ms']:.3f} ms, the process's compiled one alone "
                         f"{red['process_compiled_ms']:.3f}, compiled alone for this shape "
                         f"{red['compiled_alone_static_ms']:.3f}, one-stage {red['one_stage_static_ms']:.3f}, eager "
                         f"{red['eager_ms']:.3f}; x.sum(0) {red['floor_sum_ms']:.3f}", "near x.sum(0)"))
        if "throughput_ratio_vs_reference" in r:
            rows.append((f"GPU ours vs reference, {name}", f"{r['throughput_ratio_vs_reference']:.0f}x", ">= 300x"))
        if "ours_s" in r:
            rows.append((f"GPU balanced k-means, {name}", f"{r['ours_s']:.2f} s vs k-means-constrained "
                         f"{r['theirs_cpu_s']:.0f} s (CPU): {r['speedup_vs_theirs_cpu']:.0f}x", ">= 50x"))
    if "grid" in results:
        g = results["grid"]
        rows += [(f"paper grid ({g['settings']['size']}), {r['stage']}", f"{r['seconds']:.1f} s, {r['passes']:,d} "
                  f"passes", "report") for r in g["stages"]]
        rows.append((f"paper grid ({g['settings']['size']}), whole", f"{g['total_s']:.0f} s", "<= 15 min on one H200"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}  [{c}]" for a, b, c in rows)


if __name__ == "__main__":
    sys.exit(main())
