"""Run under torchrun: collect statistics data-parallel (gloo) and save rank 0's result."""
import sys

import torch
import torch.distributed as dist

import modsep_nb as ms

model_dir, docs_file, out = sys.argv[1:4]
dist.init_process_group("gloo")
torch.set_num_threads(1)
handle = ms.load_model(model_dir)
docs = open(docs_file).read().split("\n\f\n")
stats = ms.collect_stats(handle, docs, max_tokens=700, ctx=32, batch_size=3, progress=False)
assert stats.meta["world_size"] == dist.get_world_size()
if dist.get_rank() == 0:
    stats.save(out)
# NaN activations on one rank only: every rank refuses, naming the layer
if dist.get_rank() == 1:
    with torch.no_grad():
        handle.blocks[1].mlp.up_proj.weight[3, 0] = float("nan")
try:
    ms.collect_stats(handle, docs, max_tokens=700, ctx=32, batch_size=3, progress=False)
    raise AssertionError(f"rank {dist.get_rank()} accepted NaN statistics")
except ms.statistics.NonFiniteActivationError as err:
    assert "layers [1]" in str(err), str(err)
dist.barrier()      # both ranks leave together (see distributed_shards.py)
dist.destroy_process_group()
