"""Reliability (issue 7): one clear error per bad input before heavy work; NaN reported; atomic, resumable,
cache-validated artifacts; runs never overwrite each other; same seed, same numbers."""
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import modsep_nb as ms
from modsep_nb.data import DataNotAvailableError, ImageDataset, fashion_mnist, text_tasks
from modsep_nb.models import ModelNotAvailableError, UnknownArchitectureError
from modsep_nb.params import ParamsError, load_params
from modsep_nb.runner import run_dir_for
from modsep_nb.statistics import NeuronStats
from modsep_nb.study import Study, cached_stats

REPO = Path(__file__).resolve().parent.parent


def write_params(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


# -- one error per bad input, naming the problem and the fix ------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("lm: {stats_tokenz: 10}", ["unknown parameter 'lm.stats_tokenz'", "stats_tokens"]),
    ("colour: red", ["unknown parameter 'colour'"]),
    ("lm: {stats_tokens: many}", ["'lm.stats_tokens'", "whole number"]),
    ("pruning: {frac: 1.5}", ["'pruning.frac'", "strictly between 0 and 1"]),
    ("pruning: {frac: 0}", ["'pruning.frac'", "strictly between 0 and 1"]),
    ("pruning: {mode: sideways}", ["'pruning.mode'", "global", "per_layer"]),
    ("lm: {tasks: [code, cooking]}", ["unknown tasks ['cooking']", "code"]),
    ("overlap: {sweep: [0.1, 2.0]}", ["'overlap.sweep'", "fractions"]),
    ("notebooks: ['07']", ["'notebooks'", "01"]),
    ("lm: {batch_size: 0}", ["'lm.batch_size'", "at least 1"]),
    ("pruning: {importance: loud}", ["'pruning.importance'", "abs"]),
    ("pruning: {eps_relative: -0.1}", ["'pruning.eps_relative'", "null"]),
    ("pruning: {eps_relative: small}", ["'pruning.eps_relative'", "number"]),
    ("moefication: {max_degree: 0}", ["'moefication.max_degree'", "whole number"]),
    ("moefication: {n_init: some}", ["'moefication.n_init'", "auto"]),
    ("device: gpu", ["'device'", "cuda:N", "sharded"]),
])
def test_bad_parameters_named(tmp_path, text, words):
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, text))
    for w in words:
        assert w in str(err.value)


def test_cli_rejects_bad_params_before_work(tmp_path):
    path = write_params(tmp_path, "pruning: {frac: 3}")
    proc = subprocess.run([sys.executable, "-m", "modsep_nb", "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pruning.frac" in proc.stderr
    assert not (tmp_path / "o").exists()          # nothing was started


def test_shipped_params_are_valid():
    for path in (REPO / "params").glob("*.yaml"):
        load_params(path)


def test_selection_mode_and_frac_errors():
    scores = torch.rand(2, 10)
    with pytest.raises(ValueError, match="unknown selection mode 'sideways'.*global, per_layer"):
        ms.select_neurons(scores, 0.1, mode="sideways")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ms.select_neurons(scores, 1.2)


def test_cluster_count_must_divide(tiny_llama):
    from modsep_nb.moefication import check_n_experts
    with pytest.raises(ValueError) as err:
        check_n_experts(tiny_llama.d_mlp, 7)
    assert "7" in str(err.value) and "valid" in str(err.value)


def test_unknown_task_and_empty_domain():
    with pytest.raises(ValueError, match="unknown text domain 'cooking'.*code"):
        text_tasks(["cooking"])
    from modsep_nb.data import split_documents
    with pytest.raises(ValueError, match="empty domain"):
        split_documents([])


def test_model_not_available_offline(hub_offline):
    with pytest.raises(ModelNotAvailableError) as err:
        ms.load_model("no-such-org/no-such-model-abc")
    assert "no-such-org/no-such-model-abc" in str(err.value) and "local" in str(err.value)


def test_unknown_architecture():
    class Odd(torch.nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(UnknownArchitectureError) as err:
        ms.load_model(Odd())
    assert "'Odd'" in str(err.value) and "ARCHITECTURES" in str(err.value)


def test_images_without_labels_and_wrong_shape(tiny_vit):
    c, h, w = tiny_vit.image_shape
    with pytest.raises(ValueError, match="needs their labels"):
        ms.evaluate(tiny_vit, torch.zeros(4, c, h, w))
    with pytest.raises(ValueError, match=r"expects \[" ):
        ms.collect_stats(tiny_vit, torch.zeros(4, c, h + 1, w), progress=False)
    with pytest.raises(DataNotAvailableError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root="/nonexistent")


def test_nan_activations_reported_with_layer_and_task(tiny_llama, tokenizer):
    with torch.no_grad():
        tiny_llama.blocks[1].mlp.up_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"layers \[1\].*'planted'"):
        ms.collect_stats(tiny_llama, ["w01 w02 w03 w04"], task="planted", progress=False)


# -- caches: atomic, validated, resumable ----------------------------------------------------------------
def test_corrupted_cache_is_recomputed_with_warning(tmp_path):
    good = NeuronStats.from_sums(torch.tensor([4.0]), [torch.ones(1, 3)] * 5)
    path = tmp_path / "s.safetensors"
    good.save(path)
    path.write_bytes(path.read_bytes()[:40])          # truncated, as by a crash
    calls = []
    with pytest.warns(UserWarning, match="unreadable"):
        out = cached_stats(path, lambda: calls.append(1) or good, expect={"cache_key": "k"})
    assert calls == [1] and torch.equal(out.mean, good.mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached_stats(path, lambda: pytest.fail("must not recompute"), expect={"cache_key": "k"})
    assert torch.equal(again.mean_abs, good.mean_abs)
    with pytest.warns(UserWarning, match="other settings"):
        cached_stats(path, lambda: good, expect={"cache_key": "changed"})


RESUME_SCRIPT = """
import sys
from modsep_nb.params import load_params
from modsep_nb.study import Study
params = load_params(None, {"cache_dir": sys.argv[1], "device": "cpu",
                            "lm": {"tasks": ["code", "docs", "licenses", "law"], "stats_tokens": 192, "ctx": 64}})
study = Study.from_params(params, "lm")
stats = study.stats(progress=False)
import torch
torch.save({t: s.mean_abs for t, s in stats.items()}, sys.argv[2])
"""


def test_killed_run_resumes_with_identical_results(tmp_path, smollm):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(killed), str(tmp_path / "a.pt")])
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "stats").glob("*.safetensors"))) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in (killed / "stats").glob("*.safetensors")}
    assert 1 <= len(done_before) < 4, "killed after the first task and before the last"
    mtimes = {p.name: p.stat().st_mtime_ns for p in (killed / "stats").glob("*.safetensors")}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(killed), str(tmp_path / "a.pt")], check=True, timeout=600)
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(clean), str(tmp_path / "b.pt")], check=True, timeout=600)
    for name, t in mtimes.items():                    # finished work was reused, not recomputed
        assert (killed / "stats" / name).stat().st_mtime_ns == t
    assert not [p for p in (killed / "stats").iterdir() if p.name.startswith(".")], "no half-written files left"
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys()
    for task in a:
        assert torch.equal(a[task], b[task])


def test_changed_parameter_never_reuses_stale_stats(tmp_path, smollm):
    base = {"cache_dir": str(tmp_path), "device": "cpu", "lm": {"tasks": ["docs", "law"], "stats_tokens": 64, "ctx": 32}}
    s1 = Study.from_params(load_params(None, base), "lm", handle=smollm).stats(progress=False)
    changed = {**base, "lm": {**base["lm"], "stats_tokens": 96}}
    s2 = Study.from_params(load_params(None, changed), "lm", handle=smollm).stats(progress=False)
    assert int(s1["docs"].count[0]) == 64 and int(s2["docs"].count[0]) == 96
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4


def test_run_directory_never_overwritten(tmp_path):
    params = {"run_name": "r"}
    first = run_dir_for(params, str(tmp_path / "r"), overwrite=False)
    first.mkdir()
    (first / "summary.md").write_text("earlier run")
    second = run_dir_for(params, str(tmp_path / "r"), overwrite=False)
    assert second != first and second.name == "r-2"
    assert run_dir_for(params, str(tmp_path / "r"), overwrite=True) == first


def test_same_seed_same_numbers(tiny_llama):
    from conftest import random_texts
    from modsep_nb.moefication import balanced_kmeans, normalize_rows
    docs = random_texts(20, seed=3)
    a = ms.collect_stats(tiny_llama, docs, progress=False)
    b = ms.collect_stats(tiny_llama, docs, progress=False)
    assert torch.equal(a.mean_abs, b.mean_abs) and torch.equal(a.frac_pos, b.frac_pos)
    s = ms.prune_scores(a, b)
    assert torch.equal(ms.select_neurons(s, 0.1), ms.select_neurons(s.clone(), 0.1))
    x = normalize_rows(tiny_llama.w_in(0).float())
    assert torch.equal(balanced_kmeans(x, 4, seed=5), balanced_kmeans(x, 4, seed=5))


def test_device_sharded_loads_through_device_map(llama_dir, monkeypatch):
    """params device: sharded -> load_model(..., device_map="auto"); here (CPU only) everything lands on the CPU."""
    from modsep_nb import study as study_module
    seen = {}
    real = study_module.load_model

    def spy(spec, **kwargs):
        seen.update(kwargs)
        return real(llama_dir, **kwargs)
    monkeypatch.setattr(study_module, "load_model", spy)
    params = load_params(REPO / "params" / "smoke.yaml", {"device": "sharded", "lm": {"tasks": ["code", "docs"]}})
    st = Study.from_params(params, "lm")
    assert seen.get("device_map") == "auto" and "device" not in seen
    assert st.handle.device == torch.device("cpu") and st.handle.n_layers == 2
