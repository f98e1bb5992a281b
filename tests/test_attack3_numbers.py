"""Attack 3, area D: numbers that could be silently wrong, and late crashes in evaluation.

float16 logits that overflow, statistics cache bytes changed on disk, tasks without test images, NaN resamples
counted in a claim's favour, image models with fewer than five outputs, and outputs that are not the classes.
Each case is an error naming what to change, or an undefined (NaN) value, never a plausible-looking number.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from conftest import random_texts, save_hf_vit
from modsep_nb import evaluate, load_model
from modsep_nb.claims import Claim, claims_table, resample_p
from modsep_nb.data import ImageDataset
from modsep_nb.dynamics import trend_claim
from modsep_nb.evaluation import lm_token_metrics
from modsep_nb.evidence import combine_seeds, excess_claim, permutation_related_vs_unrelated
from modsep_nb.models import check_outputs
from modsep_nb.overlaps import pattern_persistence
from modsep_nb.params import ParamsError, load_params
from modsep_nb.study import Study
from modsep_nb.tasks import ImageTasks
from test_tasks_custom import image_params, write_images

TEXTS = random_texts(6, seed=1, min_len=5)


# -- 6: float16 overflow --------------------------------------------------------------------------------------
def test_overflowing_float16_logits_are_an_error_naming_the_task(llama_dir, vit_dir):
    lm = load_model(str(llama_dir), dtype="float16")
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(3e4)        # logits beyond float16's 65504: inf, as an overflow gives
        logits = lm.model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits
    assert not torch.isfinite(logits).all()
    # what the metrics would have been read from: a loss that is not a number
    m = lm_token_metrics(logits, torch.tensor([[2, 10, 11, 12]]), torch.ones(1, 4, dtype=torch.long))
    assert not math.isfinite(m["ce"])
    with pytest.raises(FloatingPointError, match=r"task 'code'.*NaN or infinite.*float16.*float32 or bfloat16"):
        evaluate(lm, TEXTS, ctx=12, task="code")
    assert math.isfinite(evaluate(load_model(str(llama_dir)), TEXTS, ctx=12)["loss"])   # float32: a number

    vit = load_model(str(vit_dir), dtype="float16")
    with torch.no_grad():
        vit.model.classifier.weight.mul_(1e5)
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).half()
    with pytest.raises(FloatingPointError, match=r"task 'shoes'.*NaN or infinite"):
        evaluate(vit, images, labels=[0, 1, 2, 3], task="shoes")


# -- 7: the statistics cache carries a checksum ------------------------------------------------------------
def _tensor_bytes(path, name: str) -> tuple[int, int]:
    """Where tensor `name`'s bytes lie in a safetensors file: (start, end) from the start of the file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.parametrize("damage", ["zeros", "nan"])
def test_changed_statistics_bytes_are_recomputed_with_a_warning(tmp_path, llama_dir, damage):
    params = load_params(None, {"cache_dir": str(tmp_path), "device": "cpu",
                                "lm": {"model": str(llama_dir), "tasks": ["docs", "law"], "stats_tokens": 48,
                                       "ctx": 16, "batch_size": 4}})
    first = Study.from_params(params, "lm").stats(progress=False)
    path = sorted((tmp_path / "stats").glob("*.safetensors"))[0]
    start, end = _tensor_bytes(path, "sums")
    raw = bytearray(path.read_bytes())
    middle = start + (end - start) // 2 // 8 * 8
    raw[middle:middle + 64] = bytes(64) if damage == "zeros" else struct.pack("<d", math.nan) * 8
    path.write_bytes(bytes(raw))               # the same size and a valid header: only the numbers differ
    with pytest.warns(UserWarning, match="does not match its checksum.*recomputing"):
        again = Study.from_params(params, "lm").stats(progress=False)
    for t in first:
        assert torch.equal(again[t].mean_abs, first[t].mean_abs) and torch.equal(again[t].mean, first[t].mean)


# -- 8: a task without test images ---------------------------------------------------------------------------
def test_too_few_eval_images_are_refused_and_an_empty_task_is_never_zero(tmp_path, tiny_vit):
    with pytest.raises(ParamsError, match=r"'vit.eval_images' is 5: the test split has 10 classes.*at least 50"):
        load_params(None, {"vit": {"eval_images": 5}})
    with pytest.raises(ParamsError, match=r"'dynamics.eval_images' is 30: .* 100 classes.*at least 500"):
        load_params(None, {"vit": {"dataset": "cifar100", "eval_images": 500}, "dynamics": {"eval_images": 30}})
    write_images(tmp_path / "imgs", {"a": 3, "b": 3, "c": 3})
    vit_dir = save_hf_vit(tmp_path / "vit", image_size=16, patch_size=4, num_channels=3, num_labels=3)
    with pytest.raises(ParamsError, match=r"'vit.eval_images' is 14: the test split has 3 classes.*at least 15"):
        load_params(image_params(tmp_path, vit_dir, "../imgs", eval_images=14))

    params = load_params(None, {"vit": {"tasks": "groups"}})
    params["vit"]["eval_images"] = 1            # past the check, as a caller may set it: one test image in all
    with pytest.raises(ValueError, match=r"task '\w+' has no test images among the first vit.eval_images = 1"):
        ImageTasks.from_params(params)

    # an accuracy over no images is an error, not 0.0 (the task's class has no test image here)
    names = [f"c{i}" for i in range(10)]
    test = ImageDataset(torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 0, 1]), names, "t/test")
    tasks = ImageTasks({"first": ["c0", "c1"], "last": ["c9"]}, test, test, {"batch_size": 4})
    with pytest.raises(ValueError, match="task 'last' has no test images"):
        tasks.accuracy(tiny_vit)
    with pytest.raises(ValueError, match=r"no images to evaluate for task 'last' of classes \['c9'\]"):
        evaluate(tiny_vit, test, classes=["c9"], task="last")


# -- 10: NaN resamples never count in a claim's favour --------------------------------------------------------
def test_nan_resamples_and_undefined_estimates_never_make_p_smaller():
    nan = float("nan")
    claim = excess_claim("x", "an undefined estimate", nan, np.full(199, nan))
    assert math.isnan(claim.p) and not claim.supported and claim.undefined      # was p = 1/200 = 0.005
    assert "not supported (undefined)" in claims_table([claim])
    # half the resamples undefined, the rest in favour: each NaN one counts against, as one on the wrong side
    boot = np.r_[np.full(100, nan), np.full(99, 0.3)]
    assert excess_claim("x", "s", 0.3, boot).p == pytest.approx((1 + 100) / (1 + 199))
    # a null with undefined values: those count against; the excess is over the mean of the defined ones
    null = np.r_[np.full(10, nan), np.zeros(89)]
    claim = excess_claim("x", "s", 0.5, np.full(50, 0.5), null)
    assert claim.p == pytest.approx(11 / 100) and claim.estimate == pytest.approx(0.5)
    assert math.isnan(excess_claim("x", "s", 0.5, np.full(50, 0.5), np.full(20, nan)).p)
    assert resample_p([0.1, nan, -0.2], np.array([False, False, True])) == pytest.approx(3 / 4)

    # a constant overlap matrix has no ranking: rho and p undefined (was p = 1/(1 + n_perm))
    flat = np.full((4, 4), 0.5)
    result = pattern_persistence(flat, flat, n_perm=99)
    assert math.isnan(result["rho"]) and math.isnan(result["p_value"])
    trend = trend_claim("t", "s", [0.4, 0.4, 0.4, 0.4], np.full((20, 4), 0.4), n_perm=99, seed=0)
    assert math.isnan(trend.p) and not trend.supported
    # a seed with an undefined p cannot show that the pattern persists in every seed
    combined = combine_seeds([{"rho": 0.9, "p_value": 0.001}, {"rho": 0.8, "p_value": nan}], 50, 0)
    assert combined["p_combined"] == 1.0

    # related vs unrelated with no across-group pair: the difference is undefined, and so is p
    names = ["a", "b", "c"]
    matrix = np.full((3, 3), 0.3)
    related = permutation_related_vs_unrelated(matrix, names, {"g": names}, 50, 0)
    assert math.isnan(related["difference"]) and math.isnan(related["p"])


# -- 11 and 12: image outputs against the classes ---------------------------------------------------------------
def test_image_models_with_fewer_than_five_outputs_are_evaluated(tmp_path):
    vit = load_model(str(save_hf_vit(tmp_path / "vit", num_labels=3)))
    images = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 3
    with torch.no_grad():
        by_hand = (vit.model(pixel_values=images).logits.argmax(-1) == labels).double().mean().item()
    out = evaluate(vit, images, labels=labels)
    assert out["top1"] == pytest.approx(by_hand) and out["top5"] == 1.0     # top-5 of 3 outputs: all of them
    with pytest.raises(ValueError, match="labels go up to 3 but the model scores 3 classes"):
        evaluate(vit, images, labels=labels + 1)


def test_outputs_that_are_not_the_classes_are_refused_at_load(tmp_path, tiny_vit):
    assert tiny_vit.n_outputs == 10
    check_outputs(tiny_vit, [f"c{i}" for i in range(10)])
    with pytest.raises(ValueError, match=r"has 10 outputs but the dataset has 3 classes \(a, b, c\)"):
        check_outputs(tiny_vit, ["a", "b", "c"])
    write_images(tmp_path / "imgs", {"a": 3, "b": 3, "c": 3})
    for n_labels, message in ((10, "has 10 outputs but the dataset has 3 classes"),
                              (2, "has 2 outputs but the dataset has 3 classes")):
        vit_dir = save_hf_vit(tmp_path / f"vit{n_labels}", image_size=16, patch_size=4, num_channels=3,
                              num_labels=n_labels)
        with pytest.raises(ValueError, match=message):
            Study.from_params(load_params(image_params(tmp_path, vit_dir, "../imgs")), "vit")
    vit_dir = save_hf_vit(tmp_path / "vit3", image_size=16, patch_size=4, num_channels=3, num_labels=3)
    study = Study.from_params(load_params(image_params(tmp_path, vit_dir, "../imgs")), "vit")
    accuracy = study.tasks.accuracy(study.handle)
    assert set(accuracy) == {"a", "b", "c"} and all(0.0 <= v <= 1.0 for v in accuracy.values())
