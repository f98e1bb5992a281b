"""Training dynamics (notebook 06): the checkpoint schedule, the checkpoints saved by the one training run (step 0
is notebook 04's random initialisation for that seed, the last is the model every notebook loads), the
measures against the final checkpoint and the three claims, each against expectations computed here by hand
or with scipy; and the language-model route through lm.revisions."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from conftest import save_hf_lm
from modsep_nb import dynamics as dy
from modsep_nb.models import load_model
from modsep_nb.overlaps import overlap_matrix
from modsep_nb.params import ParamsError, load_params
from modsep_nb.study import load_random
from modsep_nb.vit_training import checkpoint_steps, fmnist_vit_checkpoints, fmnist_vit_dir

TINY = dict(n_train=256, epochs=1, batch_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, patch_size=7, checkpoints=5, seed=3)


# -- the schedule -----------------------------------------------------------------------------------------------
def test_checkpoint_schedule_is_log_spaced_from_init_to_end():
    assert checkpoint_steps(1000, 5) == [0, 1, 10, 100, 1000]          # 10^0 .. 10^3
    steps = checkpoint_steps(938, 10)
    assert len(steps) == 10 and steps[0] == 0 and steps[-1] == 938
    ideal = np.geomspace(1, 938, 9)
    assert np.all(np.abs(np.array(steps[1:]) - ideal) <= 0.5)         # the nearest steps to log spacing
    for total, n in [(8, 9), (20, 12), (3, 4)]:                         # short runs: distinct, increasing
        steps = checkpoint_steps(total, n)
        assert len(steps) == n and steps[0] == 0 and steps[-1] == total and all(np.diff(steps) > 0)
    with pytest.raises(ValueError, match="too few"):
        checkpoint_steps(5, 8)
    with pytest.raises(ValueError, match=">= 2"):
        checkpoint_steps(100, 1)


# -- the checkpoints of one training run -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import os
    before = os.environ.get("MODSEP_CACHE")
    os.environ["MODSEP_CACHE"] = str(tmp_path_factory.mktemp("dyn_cache"))
    try:
        yield fmnist_vit_checkpoints(**TINY)
    finally:
        if before is None:
            os.environ.pop("MODSEP_CACHE")
        else:
            os.environ["MODSEP_CACHE"] = before


def _weights(handle) -> dict:
    return {k: v.detach().clone() for k, v in handle.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_follow_the_schedule_and_the_last_is_the_model(tiny_run):
    total = 256 // 32
    assert sorted(tiny_run) == checkpoint_steps(total, TINY["checkpoints"])
    assert tiny_run[total] == fmnist_vit_dir(**TINY)                   # the final checkpoint is the model folder
    trained = load_model("fmnist-vit", **TINY)                          # as every notebook loads it
    assert _same(_weights(load_model(tiny_run[total])), _weights(trained))
    steps = sorted(tiny_run)
    for a, b in zip(steps, steps[1:]):                                  # training moved the weights between them
        assert not _same(_weights(load_model(tiny_run[a])), _weights(load_model(tiny_run[b])))


def test_step_0_is_notebook_04s_random_init_for_the_training_seed(tiny_run):
    trained = load_model("fmnist-vit", **TINY)
    random = load_random(trained, TINY["seed"])                         # notebook 04's route (Study.with_random_init)
    assert _same(_weights(load_model(tiny_run[0])), _weights(random))
    other = load_random(trained, TINY["seed"] + 1)
    assert not _same(_weights(load_model(tiny_run[0])), _weights(other))


def test_checkpoint_count_is_part_of_the_cache_key(tiny_run):
    from modsep_nb.vit_training import DEFAULT_TRAINING
    assert "checkpoints" in DEFAULT_TRAINING
    import hashlib
    import json
    key = lambda s: hashlib.sha256(json.dumps({**DEFAULT_TRAINING, **s}, sort_keys=True).encode()).hexdigest()[:12]  # noqa: E731
    assert fmnist_vit_dir(**TINY).name == f"fmnist-vit-{key(TINY)}"
    assert key(TINY) != key({**TINY, "checkpoints": 6})


# -- measures against the final checkpoint -----------------------------------------------------------------------
def _mask(indices, shape=(2, 10)):
    m = torch.zeros(shape, dtype=torch.bool)
    for layer, j in indices:
        m[layer, j] = True
    return m


def test_against_final_by_hand():
    final = {"a": _mask([(0, 0), (0, 1), (1, 0), (1, 1)]), "b": _mask([(0, 2), (0, 3), (1, 2), (1, 3)]),
             "c": _mask([(0, 0), (0, 4), (1, 4), (1, 5)]), "d": _mask([(0, 6), (0, 7), (1, 6), (1, 7)])}
    now = {"a": final["a"], "b": _mask([(0, 2), (0, 8), (1, 8), (1, 9)]),
           "c": _mask([(0, 0), (0, 1), (1, 4), (1, 5)]), "d": _mask([(0, 0), (0, 1), (0, 2), (0, 3)])}
    record = lambda masks: {"names": list(masks), "masks": masks, "matrix": overlap_matrix(masks)[1],  # noqa: E731
                            "boot_masks": [masks, masks]}
    out = dy.against_final(record(now), record(final), n_perm=200, seed=0)
    np.testing.assert_allclose(out["overlap"], [1.0, 0.25, 0.75, 0.0])
    # layer-matched chance: sum over layers of a_l * b_l / d over min(|A|, |B|); d holds 2 in each layer but 4 / 0
    np.testing.assert_allclose(out["overlap_chance"], [0.2, 0.2, 0.2, (4 * 2 / 10) / 4])
    assert out["mean_overlap"] == pytest.approx(0.5)
    np.testing.assert_allclose(out["mean_overlap_samples"], [0.5, 0.5])
    i, j = np.triu_indices(4, 1)
    expected = sps.spearmanr(overlap_matrix(final)[1][i, j], overlap_matrix(now)[1][i, j]).statistic
    assert out["pattern"]["rho"] == pytest.approx(expected)
    assert out["pattern"]["ci"] == pytest.approx((expected, expected))
    assert 0 < out["pattern"]["p"] <= 1 and out["pattern"]["n_tasks"] == 4
    claim = dy.structure_at_init_claim(out["pattern"])
    assert claim.id == "structure_at_init" and claim.estimate == pytest.approx(expected) and claim.null == 0.0


# -- the claims ------------------------------------------------------------------------------------------------
def test_trend_claim_against_scipy_and_the_exact_permutation_share():
    values = np.array([np.nan, -0.1, 0.05, 0.0, 0.2, 0.3])              # the first checkpoint has no value
    rng = np.random.default_rng(1)
    samples = values + rng.normal(0, 0.05, size=(50, 6))
    claim = dy.trend_claim("selectivity_grows", "s", values, samples, n_perm=4000, seed=0)
    kept = values[1:]
    rho = sps.spearmanr(np.arange(5), kept).statistic
    assert claim.estimate == pytest.approx(rho) and claim.n == 5
    exact = np.mean([sps.spearmanr(np.arange(5), np.array(p)).statistic >= rho - 1e-12
                     for p in itertools.permutations(kept)])
    assert claim.p == pytest.approx(exact, abs=0.02)
    boot = [sps.spearmanr(np.arange(5), s[1:]).statistic for s in samples]
    assert claim.ci == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    down = dy.trend_claim("selectivity_grows", "s", kept[::-1], samples[:, 1:][:, ::-1], n_perm=500, seed=0)
    assert down.estimate == pytest.approx(-rho) and not down.supported
    few = dy.trend_claim("selectivity_grows", "s", [np.nan, 1.0, 2.0], np.zeros((5, 3)), n_perm=100, seed=0)
    assert np.isnan(few.estimate) and not few.supported


def test_settled_at_by_hand():
    assert dy.settled_at([0.1, 0.6, 0.4, 0.55, 0.7], 0.5) == 3          # 0.6 at index 1 falls back below
    assert dy.settled_at([0.6, 0.7], 0.5) == 0
    assert np.isnan(dy.settled_at([0.6, 0.4], 0.5))
    np.testing.assert_array_equal(dy.settled_at(np.array([[0.1, 0.6, 0.7], [0.6, 0.1, 0.2]]), [0.5, 0.15]),
                                  [1.0, 2.0])


def test_settle_before_accuracy_by_hand():
    steps = [0, 1, 3, 10, 30, 100]
    sets = np.array([0.1, 0.3, 0.6, 0.8, 0.9, 1.0])                     # stays >= 0.5 from index 2 (step 3)
    acc = np.array([0.1, 0.2, 0.4, 0.6, 0.78, 0.8])                     # >= 0.72 from index 4 (step 30)
    claim, at = dy.settle_before_accuracy_claim(sets, np.tile(sets, (40, 1)), acc, np.tile(acc, (40, 1)), steps)
    assert claim.id == "sets_settle_before_accuracy" and claim.estimate == 2.0
    assert claim.ci == (2.0, 2.0) and claim.p == pytest.approx(1 / 41) and claim.supported
    assert at["sets_settle_step"] == 3 and at["accuracy_step"] == 30
    sets2, acc2 = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 1.0]), np.array([0.1, 0.5, 0.95, 0.96, 0.97, 1.0])
    late, at = dy.settle_before_accuracy_claim(sets2, np.tile(sets2, (40, 1)), acc2, np.tile(acc2, (40, 1)), steps)
    assert late.estimate == -2.0 and not late.supported                # sets at index 4, accuracy at index 2
    assert at["sets_settle_step"] == 30 and at["accuracy_step"] == 3
    reverse, _ = dy.settle_before_accuracy_claim(np.r_[0.1, 0.1, 0.1, 0.1, 0.1, 1.0], np.full((40, 6), 0.1), acc,
                                                 np.tile(acc, (40, 1)), steps)
    assert reverse.estimate == -1.0 and not reverse.supported


def test_a_class_at_zero_accuracy_drops_that_task_not_the_checkpoint():
    """Issue #26 item 9: at an early checkpoint one class is never right; its column of the cross-task matrix is
    undefined. Selectivity is then read over the other tasks (by hand below), where before the whole checkpoint
    was NaN and left out of selectivity_grows."""
    from modsep_nb.evidence import cross_task_bootstrap
    base = {"a": np.array([1, 1, 0, 1, 1, 0, 1, 1]), "b": np.array([1, 0, 1, 1, 0, 1, 1, 1]),
            "c": np.zeros(8, dtype=int)}                                 # class c: zero accuracy
    own = {"a": {"a": np.array([0, 0, 0, 1, 0, 0, 1, 0]), "b": base["b"], "c": base["c"]},
           "b": {"a": base["a"], "b": np.array([1, 0, 0, 0, 0, 0, 1, 0]), "c": base["c"]},
           "c": {"a": base["a"], "b": base["b"], "c": base["c"]}}
    rand = {a: {b: base[b] for b in base} for a in base}               # random neurons change nothing
    selected, random = (cross_task_bootstrap(base, p, 50, 0) for p in (own, rand))
    assert np.isnan(selected["selectivity"])                            # the old reading: no value at all
    got = dy.selectivity_of_right_tasks(selected, random)
    # a and b only: pruning a keeps 2/6 of a and all of b, pruning b keeps all of a and 2/6 of b
    assert got["tasks"] == ["a", "b"] and got["estimate"] == pytest.approx(((1 - 2 / 6) + (1 - 2 / 6)) / 2)
    assert got["samples"].shape == (50,) and np.isfinite(got["samples"]).mean() > 0.9
    only_a = {**base, "b": np.zeros(8, dtype=int)}
    one = dy.selectivity_of_right_tasks(*(cross_task_bootstrap(only_a, p, 20, 0) for p in (
        {a: {b: only_a[b] for b in only_a} for a in only_a},) * 2))
    assert np.isnan(one["estimate"]) and one["tasks"] == ["a"]         # one task left: no selectivity


def test_settle_thresholds_are_params_with_a_sensitivity_table():
    """sets_settle_before_accuracy reads dynamics.settled_overlap / accuracy_share; settle_sensitivity gives the
    claim at every pair of the sweeps, each equal to the claim computed at that pair."""
    from types import SimpleNamespace
    steps = [0, 1, 3, 10, 30, 100]
    sets = np.array([0.1, 0.3, 0.45, 0.55, 0.9, 1.0])
    acc = np.array([0.1, 0.2, 0.4, 0.6, 0.78, 0.8])
    run = SimpleNamespace(steps=steps, versus=[{"mean_overlap": v, "mean_overlap_samples": np.full(30, v)} for v in sets],
                          measures=[{"accuracy": {"estimate": a, "samples": np.full(30, a)}} for a in acc])
    rows = dy.settle_sensitivity(run, [0.4, 0.5], [0.7, 0.9])
    assert [(r["settled_overlap"], r["accuracy_share"]) for r in rows] == [(0.4, 0.7), (0.4, 0.9), (0.5, 0.7), (0.5, 0.9)]
    # sets >= 0.4 from index 2, >= 0.5 from index 3; accuracy >= 0.56 from index 3, >= 0.72 from index 4
    assert [r["estimate"] for r in rows] == [1.0, 2.0, 0.0, 1.0]
    assert rows[1]["sets_settle_step"] == 3 and rows[1]["accuracy_step"] == 30
    p = load_params(overrides={"dynamics": {"settled_overlap": 0.4, "accuracy_share": 0.7}})
    assert (p["dynamics"]["settled_overlap"], p["dynamics"]["accuracy_share"]) == (0.4, 0.7)
    with pytest.raises(ParamsError, match="dynamics.settled_overlap"):
        load_params(overrides={"dynamics": {"settled_overlap": 1.5}})


def test_correspondence_z_sees_packed_selections():
    torch.manual_seed(0)
    labels = torch.arange(32).repeat(3, 1) // 8                          # 4 experts of 8 neurons per layer
    scores = {t: torch.rand(3, 32) for t in "abc"}
    for k, t in enumerate("abc"):                                       # each task's top neurons fill expert k
        scores[t][:, 8 * k: 8 * k + 8] += 10
    out = dy.correspondence_z(scores, labels, 0.25, n_null=50, n_splits=20, n_boot=100, seed=0)
    assert out["estimate"] > out["null_band"][1] and out["ci"][0] > out["null_band"][1]
    assert abs(np.mean(out["null"])) < 1.0 and len(out["null"]) == 20


# -- params and the language-model route ---------------------------------------------------------------------------
def test_dynamics_params_are_checked():
    with pytest.raises(ParamsError, match="dynamics.n_boot"):
        load_params(overrides={"dynamics": {"n_boot": 5}})
    with pytest.raises(ParamsError, match="vit.training.checkpoints"):
        load_params(overrides={"vit": {"training": {"checkpoints": 2}}})
    with pytest.raises(ParamsError, match="lm.revisions"):
        load_params(overrides={"lm": {"revisions": ["step1"]}})
    with pytest.raises(ParamsError, match="lm.revisions"):
        load_params(overrides={"lm": {"revisions": "step1"}})
    p = load_params(overrides={"dynamics": {"stats_images": 10**6}})
    assert dy.dynamics_params(p)["vit"]["stats_images"] == p["vit"]["stats_images"]   # never beyond 01's images
    assert "06" in p["notebooks"]


def test_lm_revisions_as_local_folders(tmp_path):
    folders = [save_hf_lm(tmp_path / f"step-{k}", "GPTNeoXForCausalLM", seed=k) for k in (10, 200)]
    params = load_params(overrides={"device": "cpu", "lm": {"model": str(folders[-1]), "tasks": ["code", "docs"],
                                                            "revisions": [str(f) for f in folders]}})
    studies = dy.checkpoint_studies(params, "lm")
    assert [s for s, _ in studies] == [10, 200]
    for (_, study), folder in zip(studies, folders):
        expected = load_model(folder)
        assert torch.equal(study.handle.w_in(0), expected.w_in(0)) and study.handle.kind == "lm"
    assert studies[0][1].tasks is studies[1][1].tasks                   # the same documents at every checkpoint
    with pytest.raises(ValueError, match="lm.revisions is not set"):
        dy.checkpoint_studies(load_params(overrides={"device": "cpu"}), "lm")
