"""Data-parallel collection: 2 processes (gloo) give the single-process statistics to float64 rounding."""
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import modsep_nb as ms
from modsep_nb.statistics import MEANS, NeuronStats

from conftest import random_texts

SCRIPT = Path(__file__).parent / "scripts" / "distributed_stats.py"


def test_two_process_gloo_equals_single_process(tmp_path, llama_dir):
    docs = random_texts(80, seed=1, max_len=40)
    (tmp_path / "docs.txt").write_text("\n\f\n".join(docs))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(llama_dir),
                           str(tmp_path / "docs.txt"), str(tmp_path / "dist.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = NeuronStats.load(tmp_path / "dist.safetensors")
    handle = ms.load_model(str(llama_dir))
    docs = (tmp_path / "docs.txt").read_text().split("\n\f\n")
    single = ms.collect_stats(handle, docs, max_tokens=700, ctx=32, batch_size=3, progress=False)
    assert torch.equal(parallel.count, single.count) and int(single.count[0]) == 700
    for name in MEANS:
        torch.testing.assert_close(getattr(parallel, name), getattr(single, name), rtol=1e-6, atol=1e-7)
