"""The paper's grid as a benchmark (issue #27): the whole pipeline, through the package's own functions, on a
Mistral-7B-shaped model with random weights (bf16 on a GPU) and 23 synthetic tasks at the paper's budgets
(params/paper_mistral7b.yaml: statistics, evaluation, context, batch, fractions, experts; the project's
defaults for random seeds, bisection steps, blocks and nulls). Prints the time and the forward passes of each stage:

    statistics per task (blocks of documents), the pseudo-task null's domain, overlap and its pseudo-task null,
    the fixed-fraction cross-task matrix with its matched random ablations, the bisection, MoEfication of every
    layer (balanced k-means on W_in), the layerwise correspondence.

    python benchmarks/paper_grid.py [--size full|tiny] [--device cuda|cpu]

`full` is the paper's shape (goal: the whole grid within 15 minutes on one H200); `tiny` runs the same code on
the CPU in seconds (tests/test_bench.py), with 4 tasks. With random weights the unpruned accuracy is about 0, so
the bisection has no fraction to find and stops at once: its row counts T × T evaluations, the real model's up to
T × (1 + max_steps) more. The synthetic tasks are word distributions over a word-level vocabulary,
each task favouring its own words, so the tasks' statistics differ; the model's weights are random, so the
numbers measure cost, not findings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # run as a script from a checkout, installed or not

from modsep_nb.correspondence import layer_correspondence  # noqa: E402
from modsep_nb.evaluation import cross_task_matrix, evaluate  # noqa: E402
from modsep_nb.evidence import pseudo_task_null  # noqa: E402
from modsep_nb.models import load_model  # noqa: E402
from modsep_nb.moefication import split_layers  # noqa: E402
from modsep_nb.overlaps import overlap_matrix  # noqa: E402
from modsep_nb.params import load_params  # noqa: E402
from modsep_nb.pruning import select_neurons, task_scores  # noqa: E402
from modsep_nb.statistics import collect_block_stats  # noqa: E402

N_TASKS = 23
MISTRAL_7B = dict(layers=32, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=32000)
# the CPU test's size: the same stages on a 2-layer model, 4 tasks, budgets of a few windows
TINY_TASKS = 4
TINY = dict(model=dict(layers=2, hidden=32, mlp=64, heads=2, kv_heads=1, vocab=96),
            lm=dict(stats_tokens=64, eval_tokens=32, ctx=16, batch_size=3, max_frac=0.25),
            pruning=dict(frac=0.05, random_seeds=[0], max_steps=2), evidence=dict(n_blocks=2, n_null=4),
            moefication=dict(lm_experts=8), correspondence=dict(n_null=5))
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def budgets(size: str) -> dict:
    """The grid's settings: params/paper_mistral7b.yaml (with the project's defaults), shrunk for `tiny`."""
    p = load_params(REPO / "params" / "paper_mistral7b.yaml")
    out = {"model": dict(MISTRAL_7B), "lm": dict(p["lm"]), "pruning": dict(p["pruning"]),
           "evidence": dict(p["evidence"]), "moefication": dict(p["moefication"]),
           "correspondence": dict(p["correspondence"]), "tasks": N_TASKS}
    if size == "tiny":
        for section, values in TINY.items():
            out[section].update(values)
        out["tasks"] = TINY_TASKS
    return out


def word_tokenizer(vocab: int):
    """A word-level tokenizer with `vocab` ids ("w0" ... and the special tokens), BOS before every document."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", words["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def synthetic_documents(task: int, n_docs: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    """n_docs documents of `length` words: Zipf-like over the vocabulary in an order of the task's own (seeded)."""
    rng = np.random.default_rng([seed, task])
    n_words = vocab - len(SPECIALS)
    order = rng.permutation(n_words)
    p = 1.0 / np.arange(1, n_words + 1)
    ids = order[rng.choice(n_words, size=(n_docs, length), p=p / p.sum())]
    return [" ".join(f"w{i}" for i in row) for row in ids]


def build_model(size: str, device: str, dtype):
    import transformers
    m = budgets(size)["model"]
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(num_hidden_layers=m["layers"], hidden_size=m["hidden"],
                                     intermediate_size=m["mlp"], num_attention_heads=m["heads"],
                                     num_key_value_heads=m["kv_heads"], vocab_size=m["vocab"])
    with torch.device(device):
        model = transformers.MistralForCausalLM(cfg).to(dtype).eval()
    return load_model(model, tokenizer=word_tokenizer(m["vocab"]))


class Stages:
    """Wall time and forward passes (calls of the model, counted at its input) of each named stage."""

    def __init__(self, handle):
        self.rows, self.passes, self.tokens = [], 0, 0
        handle.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.passes += 1
        self.tokens += int(ids.numel())

    def run(self, name: str, fn):
        _sync()
        passes, tokens, start = self.passes, self.tokens, time.perf_counter()
        out = fn()
        _sync()
        self.rows.append({"stage": name, "seconds": time.perf_counter() - start, "passes": self.passes - passes,
                          "tokens": self.tokens - tokens})
        return out


def run(size: str = "full", device: str | None = None, dtype=None, progress: bool = False) -> dict:
    """The whole grid; returns {"settings", "stages": [{stage, seconds, passes, tokens}], "total_s"}."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    b = budgets(size)
    lm, pr, ev = b["lm"], b["pruning"], b["evidence"]
    ctx, batch, T = lm["ctx"], lm["batch_size"], b["tasks"]
    handle = build_model(size, device, dtype)
    vocab = b["model"]["vocab"]
    # every document one full window (BOS + ctx - 1 words), as many as each budget reads
    stats_docs = [synthetic_documents(t, -(-lm["stats_tokens"] // ctx), ctx - 1, vocab) for t in range(T)]
    eval_docs = [synthetic_documents(t, -(-lm["eval_tokens"] // ctx), ctx - 1, vocab, seed=1) for t in range(T)]
    null_docs = synthetic_documents(0, T * -(-lm["stats_tokens"] // ctx), ctx - 1, vocab, seed=2)
    names = [f"task{t:02d}" for t in range(T)]
    read = dict(ctx=ctx, batch_size=batch, progress=False)
    stages = Stages(handle)
    start = time.perf_counter()

    blocks = stages.run("statistics per task", lambda: {
        n: collect_block_stats(handle, d, ev["n_blocks"], max_tokens=lm["stats_tokens"], task=n, **read)
        for n, d in zip(names, stats_docs)})
    domain = stages.run("pseudo-task null domain", lambda: collect_block_stats(
        handle, null_docs, T * ev["n_blocks"], max_tokens=T * lm["stats_tokens"], **read))
    pipeline = dict(frac=pr["frac"], mode=pr["mode"], eps=pr["eps"], eps_relative=pr["eps_relative"])
    scores = task_scores({n: blk.merged() for n, blk in blocks.items()}, eps=pr["eps"], eps_relative=pr["eps_relative"])
    masks = {n: select_neurons(s, pr["frac"], pr["mode"]) for n, s in scores.items()}    # as pipeline_masks selects

    def overlap_and_null():
        matrix = overlap_matrix(masks)[1]
        null = pseudo_task_null(domain, [blk.n_blocks for blk in blocks.values()], ev["n_null"], seed=0, **pipeline)
        return matrix, null
    stages.run(f"overlap and its pseudo-task null ({ev['n_null']} partitions)", overlap_and_null)

    evaluators = {n: (lambda d=d: evaluate(handle, d, max_tokens=lm["eval_tokens"], **read)["top1"])
                  for n, d in zip(names, eval_docs)}
    fixed = stages.run(f"cross-task matrix at frac {pr['frac']}, {len(pr['random_seeds'])} random seeds",
                       lambda: cross_task_matrix(handle, scores, evaluators, frac=pr["frac"], mode=pr["mode"],
                                                 random_seeds=pr["random_seeds"], progress=progress))
    stages.run(f"cross-task matrix by bisection (target {pr['target']})", lambda: cross_task_matrix(
        handle, scores, evaluators, target=pr["target"], mode=pr["mode"], max_frac=lm["max_frac"],
        max_steps=pr["max_steps"], base=fixed.base, progress=progress))
    n_experts = b["moefication"]["lm_experts"]
    labels = stages.run(f"MoEfication of all {handle.n_layers} layers ({n_experts} experts)",
                        lambda: split_layers(handle, "param", n_experts, seed=0, progress=progress))
    stages.run("layerwise correspondence", lambda: [
        layer_correspondence(masks[n], labels, n_null=b["correspondence"]["n_null"], seed=0) for n in names])
    settings = {"size": size, "device": device, "dtype": str(dtype).removeprefix("torch."), "tasks": T,
                **{k: b[k] for k in ("model", "lm", "pruning", "evidence")}, "experts": n_experts,
                "correspondence_null": b["correspondence"]["n_null"]}
    return {"settings": settings, "stages": stages.rows, "total_s": time.perf_counter() - start,
            "fixed": fixed, "masks": masks}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"paper grid, {s['size']}: Mistral-shaped {s['model']['layers']} layers x {s['model']['mlp']} neurons, "
             f"{s['tasks']} tasks, {s['device']} {s['dtype']}; statistics {s['lm']['stats_tokens']:,} tokens a task, "
             f"evaluation {s['lm']['eval_tokens']:,}, batch {s['lm']['batch_size']} x {s['lm']['ctx']}",
             f"{'stage':62s} {'seconds':>9s} {'passes':>8s} {'tokens':>13s}"]
    for r in result["stages"]:
        lines.append(f"{r['stage']:62s} {r['seconds']:9.1f} {r['passes']:8,d} {r['tokens']:13,d}")
    lines.append(f"{'whole grid':62s} {result['total_s']:9.1f} {sum(r['passes'] for r in result['stages']):8,d} "
                 f"{sum(r['tokens'] for r in result['stages']):13,d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    args = parser.parse_args(argv)
    result = run(args.size, args.device, progress=True)
    print(table(result))
    out = REPO / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"paper_grid_{args.size}.json").write_text(json.dumps(
        {k: result[k] for k in ("settings", "stages", "total_s")}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
