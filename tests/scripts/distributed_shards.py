"""Block statistics and the cross-task matrix of a tiny LM, under torchrun (gloo, blocks and rows split over the
ranks) or in one process (python SCRIPT ...): rank 0 (or the one process) saves both for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist

import modsep_nb as ms
from modsep_nb.evaluation import cross_task_matrix, evaluate
from modsep_nb.shards import collect_blocks

model_dir, docs_file, out = sys.argv[1:4]
torch.set_num_threads(1)
ranked = "RANK" in os.environ
if ranked:
    dist.init_process_group("gloo")
handle = ms.load_model(model_dir)
docs = open(docs_file).read().split("\n\f\n")
blocks = collect_blocks(handle, docs, 5, max_tokens=300, ctx=16, batch_size=3, progress=False, fused=False)
tasks = {"a": docs[:20], "b": docs[20:40], "c": docs[40:60]}
evaluators = {t: (lambda d=d: evaluate(handle, d, max_tokens=48, ctx=16, batch_size=3, per_document=True)["documents"])
              for t, d in tasks.items()}
gen = torch.Generator().manual_seed(0)
scores = {t: torch.rand(handle.n_layers, handle.d_mlp, generator=gen) for t in tasks}
fixed = cross_task_matrix(handle, scores, evaluators, frac=0.1, random_seeds=[0, 1], progress=False)
# evaluations each rank runs (no random seeds: every call is a base accuracy or a cell of the matrix)
calls = []
counted = {t: (lambda f=f, t=t: calls.append(t) or f()) for t, f in evaluators.items()}
cross_task_matrix(handle, scores, counted, frac=0.1, progress=False)
per_rank = [None] * (dist.get_world_size() if ranked else 1)
if ranked:
    dist.all_gather_object(per_rank, calls)
else:
    per_rank[0] = calls
if not ranked or dist.get_rank() == 0:
    torch.save({"blocks": blocks, "fixed": fixed, "calls": per_rank}, out)
if ranked:
    # both ranks leave together: a rank tearing gloo down while the other still writes can abort the process
    dist.barrier()
    dist.destroy_process_group()
