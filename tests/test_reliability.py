"""Reliability: nothing wrong passes silently (issues 7, 18 and 31).

An attack on the runner, the caches and the API: every bad input is one clear error before heavy work, and
no interruption or corruption yields a wrong number. ATTACKS is the table of cases: what was tried, what
happens, and the test that keeps it so (test_attack_table_is_complete checks that every named test exists).
Checks that belong to one module stay in that module's tests and are named here with their file.

Write-permission cases: the tests run as root, which chmod and os.access do not stop, so an unusable folder
is a path under a regular file (mkdir fails for anyone); the runner probes by creating a file.
"""
ATTACKS = [
    ("unknown key, wrong type, value out of range, unknown task / notebook / device",
     "ParamsError naming the key and the fix", "test_bad_parameters_named"),
    ("lm.tasks [code, code]; random_init.seeds [] or [1.5]; seed -1; eps .nan; ctx 1; eval_frac 0.999; "
     "cache_dir 5; an unknown ViT class in vit.tasks; keep_fracs [true]; overlap.metric_modes (read nowhere: "
     "removed)", "ParamsError", "test_bad_parameters_named"),
    ("run_name ../../etc", "ParamsError; run folders stay inside outputs/",
     "test_bad_parameters_named test_run_folder_stays_inside_outputs"),
    ("empty parameter file, duplicate key, YAML syntax error, non-UTF-8 file",
     "one line on stderr naming the file and line, exit 2", "test_cli_parameter_file_errors_are_one_line"),
    ("bad parameters on the command line", "exit 2, nothing created", "test_cli_rejects_bad_params_before_work"),
    ("the shipped parameter sets", "valid", "test_shipped_params_are_valid"),
    ("ablate with an integer 0/1 mask (~mask on int64 is -1/-2), a float mask, integers other than 0/1",
     "0/1 integers give exactly the bool mask's result; anything else one error",
     "test_ablate_accepts_exact_integer_masks_only test_overlaps.py::test_overlap_errors "
     "test_correspondence.py::test_inputs_are_validated"),
    ("image labels or expert labels given as floats", "one error, no silent truncation",
     "test_float_labels_are_refused"),
    ("collect_stats(batch_size=0), balanced_kmeans(n_init='many'), prune_scores(eps=nan)", "one error",
     "test_api_misuse_is_one_clear_error"),
    ("load_model(device='nope')", "one error before any weights are read", "test_bad_device_fails_before_loading"),
    ("load_model('/nonexistent/dir')", "'does not exist', no hub advice",
     "test_missing_local_folder_is_not_a_hub_problem"),
    ("bytes overwritten in a cached model (NaN weights), truncated weights, garbage config.json, missing "
     "tokenizer.json, no manifest", "the manifest differs: rebuilt with a warning",
     "test_corrupted_model_cache_is_rebuilt test_embedded_caches_are_verified_and_rebuilt"),
    ("the same damage in a user's own model folder", "CorruptModelError naming the folder or the tensor",
     "test_corrupted_model_folder_is_a_clear_error"),
    ("4 processes building the same cache folders at once",
     "each folder built once, no errors, readers never see a half-built folder",
     "test_concurrent_builds_of_a_cache_folder"),
    ("kill -9 while a cache folder is built (model conversion, ViT training)",
     "its temporary folder is removed by the next build", "test_killed_build_leaves_no_temporary_folder"),
    ("umask 002", "artifacts and cache folders get the umask's permissions, not 0600",
     "test_artifacts_respect_the_umask"),
    ("truncated statistics cache; statistics made with other settings", "recomputed with a warning",
     "test_corrupted_cache_is_recomputed_with_warning"),
    ("kill -9 during statistics, then resume", "results identical to an uninterrupted run",
     "test_killed_run_resumes_with_identical_results"),
    ("a changed parameter", "stale statistics never reused", "test_changed_parameter_never_reuses_stale_stats"),
    ("a second run with the same name", "a new folder (-2)", "test_run_directory_never_overwritten"),
    ("--overwrite --only 01 with other parameters into a finished run",
     "the stale results are removed (with a message); summary.md says which notebooks the folder holds",
     "test_overwrite_with_other_params_removes_stale_results"),
    ("--overwrite --only 01 with the same parameters", "the other notebooks' results are kept",
     "test_overwrite_with_other_params_removes_stale_results"),
    ("cache-recompute warnings inside a notebook", "repeated on the terminal",
     "test_overwrite_with_other_params_removes_stale_results"),
    ("--out under a file, --out a file, a cache folder that cannot be written",
     "one line, exit 2, before any notebook", "test_unusable_out_or_cache_stops_before_work"),
    ("SIGINT during a run", "one line, exit 130, INCOMPLETE.md kept, summary.md lists the finished notebooks",
     "test_sigint_is_one_line_and_marks_the_folder_incomplete"),
    ("a killed run's hidden partial notebook", "removed by the next run into the folder",
     "test_sigint_is_one_line_and_marks_the_folder_incomplete"),
    ("a full disk while a notebook fails", "the previous .failed.ipynb is kept, never invalid JSON",
     "test_failed_notebook_kept_only_when_valid"),
    ("NaN activations", "an error naming the layer and the task",
     "test_statistics.py::test_nan_activations_name_the_layer"),
    # attack 3 (issue #31)
    ("a CPU whose padded-batch forward differs in the last bits from an unbatched one (AVX512-BF16)",
     "the neuron tests compare top-k scores to a tolerance and accept any order among tied candidates",
     "test_neurons.py::test_text_top_k_and_histograms_equal_a_brute_force_over_every_activation "
     "test_neurons.py::test_image_top_k_grids_and_kept_images_equal_a_brute_force"),
    ("--overwrite into a folder holding another tool's params.json, figures/, statistics/, summary.md",
     "one line, exit 2 (no .modsep-run marker); nothing removed or added",
     "test_attack3_outputs.py::test_overwrite_refuses_a_folder_modsep_did_not_make"),
    ("--overwrite --only 01 with other parameters into a run with neurons/, tasks.json, html/, index.html",
     "every stale output removed, index.html links none; files the user added are kept",
     "test_attack3_outputs.py::test_overwrite_with_other_params_removes_every_stale_output"),
    ("--overwrite --only on a machine where dtype auto resolves to float32, not bfloat16",
     "params.json records the resolved device and dtypes; the other dtype's results are removed",
     "test_attack3_outputs.py::test_a_dtype_resolved_otherwise_is_other_parameters"),
    ("tasks 'x y', 'x_y', 'x/y' (names differing only in punctuation)",
     "one statistics file and one neuron page (own images) per task; tasks.json names each file",
     "test_attack3_outputs.py::test_file_names_of_tasks_are_unique_and_plain "
     "test_attack3_outputs.py::test_save_stats_and_tasks_json_keep_every_task "
     "test_attack3_outputs.py::test_neuron_pages_of_tasks_named_alike_show_their_own_images"),
    ("safetensors 0.8 writing 0600 under umask 002", "statistics cache and run statistics files are 0664",
     "test_artifacts_respect_the_umask"),
    ("findings with − and ≥ under an ASCII (C) locale", "written and read as UTF-8",
     "test_attack3_outputs.py::test_text_is_written_as_utf8_under_an_ascii_locale"),
    ("task named ![x](http://evil/x.png) (or a //host, data: or reference-style image, or a remote link)",
     "shown as text in index.html; no img or href outside the folder",
     "test_attack3_outputs.py::test_a_task_name_cannot_make_the_report_fetch_a_url"),
    ("relative cache_dir / lm.model / vit.model / data_dir / lm.revisions / paper_scores.dir, loaded from another cwd",
     "read from the params file's folder, the same folders for the runner and the notebooks",
     "test_attack3_params.py::test_relative_paths_are_read_from_the_params_folder"),
    ("relative cache_dir unusable from the params folder, usable from the cwd",
     "the writability probe checks the folders the notebooks use: RunError before any work",
     "test_attack3_params.py::test_cache_probe_checks_the_folder_the_notebooks_use"),
    ("a 400-byte YAML alias bomb (billion laughs) as a parameter file",
     "one short ParamsError naming aliases, in well under a second, bounded memory",
     "test_attack3_params.py::test_yaml_alias_bomb_is_one_short_error "
     "test_attack3_params.py::test_yaml_aliases_within_reason_still_work"),
    ("a parameter with a 100 000-character value", "the error quotes ~200 characters and still names the fix",
     "test_attack3_params.py::test_errors_quote_huge_values_briefly"),
    ("pruning.random_seeds []; seed 2**64; vit.tasks keys on/off/1; lm.tasks [code, yes]; pruning.eps 0; "
     "eps_relative 0; evidence.n_boot 1e9; dynamics.n_splits 1e6; vit.training.n_train -5; lr -0.1",
     "check refuses each with one ParamsError naming the key and the fix",
     "test_attack3_params.py::test_check_refuses_values_that_fail_later"),
    ('a task named "money $$"', "works: figure titles, tick labels and captions show it literally, the PNG is saved",
     "test_attack3_params.py::test_task_named_with_dollar_signs_works_up_to_its_figure"),
    ("the executed notebook's papermill-injected cell held the clone's absolute paths",
     "params_file and out_dir injected relative to notebooks/, resolved from there wherever the kernel runs",
     "test_attack3_params.py::test_injected_parameters_hold_no_absolute_paths "
     "test_attack3_params.py::test_notebook_paths_resolve_from_the_notebooks_folder_wherever_the_kernel_runs"),
    ("torch's 'No CUDA runtime is found, using CUDA_HOME=...' in 03's output",
     "filtered from that logger; its other messages still show", "test_attack3_params.py::test_cuda_home_notice_is_filtered"),
    ("an own task's glob reading a file outside the project (directly or through a symlink)",
     "check lists what each task reads and warns about files outside the project / params folder",
     "test_attack3_params.py::test_check_lists_what_tasks_read_and_flags_files_outside"),
    ("a binary (ELF, UTF-16) or mostly-latin-1 file under lm.tasks files",
     "ParamsError / ValueError naming the file: binary or not UTF-8",
     "test_attack3_data.py::test_binary_files_are_refused_naming_the_file"),
    ("a text file with a few bytes that are not UTF-8; a UTF-8 BOM",
     "read with one U+FFFD a byte and a warning naming the file and the byte count; BOM dropped",
     "test_attack3_data.py::test_decoding_losses_are_reported_and_utf8_reads_as_written"),
    ("a text file larger than 32 MiB", "ValueError naming the file and its size: split it",
     "test_attack3_data.py::test_a_file_over_the_size_cap_is_refused"),
    ("16-bit PNG/TIFF (value 40000), float TIFF, LA, RGBA, P, CMYK, 1-bit images",
     "loaded at their full scale (40000 -> 40000/65535), alpha dropped",
     "test_attack3_data.py::test_image_modes_load_at_their_full_scale "
     "test_attack3_data.py::test_a_16_bit_image_folder_loads_at_its_level"),
    ("32-bit integer or out-of-range float images, a corrupt PNG", "ValueError naming the image and the fix",
     "test_attack3_data.py::test_image_modes_without_a_known_full_scale_are_refused"),
    ("two own tasks sharing a file, or identical tasks; an own file copying an embedded document",
     "ParamsError naming both tasks and the documents (or 'they are one task'); the run refuses too",
     "test_attack3_data.py::test_own_tasks_sharing_files_are_refused "
     "test_attack3_data.py::test_an_own_task_holding_an_embedded_document_is_refused"),
    ("embedded domains sharing fortunes (computers/linux)", "kept in the first task only, with a warning naming them",
     "test_attack3_data.py::test_embedded_domains_sharing_entries_keep_them_in_the_first_task"),
    ("vit.tasks giving one class to two tasks; one image file linked into two classes",
     "one error naming the class / both paths",
     "test_attack3_data.py::test_image_tasks_sharing_a_class_are_refused "
     "test_attack3_data.py::test_one_image_file_in_two_classes_is_refused"),
    ("image folder with train/ but no test/ (or the reverse), a class train/ with subfolders beside other classes",
     "one error saying which layout and the fix (was KeyError 'test' or a misleading error)",
     "test_attack3_data.py::test_half_split_and_ambiguous_layouts_are_clear_errors"),
    ("an unsplit image folder with classes named train and test (CIFAR-100)", "read as classes, every image kept",
     "test_attack3_data.py::test_classes_named_train_and_test_in_an_unsplit_folder"),
    ("symlink loops under a ** glob", "check finishes, each file once; symlinked folders are not entered",
     "test_attack3_data.py::test_symlink_loops_do_not_make_check_hang "
     "test_attack3_data.py::test_the_glob_matches_as_glob_does_without_links"),
    ("a glob over more than GLOB_MAX_ENTRIES files and folders", "ValueError: narrow it",
     "test_attack3_data.py::test_a_glob_over_too_many_entries_stops_with_a_clear_error"),
    ("splitting 10 MB of text; 24 images of 2000x2000",
     "peak memory under 250 MB (was 527) / under 100 MB (was 260); processor fed 256 images at a time",
     "test_attack3_data.py::test_splitting_a_large_domain_has_bounded_memory "
     "test_attack3_data.py::test_images_are_resized_as_they_are_loaded "
     "test_attack3_data.py::test_a_processor_gets_the_images_a_chunk_at_a_time"),
    ("float16 logits that overflow (inf/NaN) in evaluate",
     "FloatingPointError naming the task and suggesting float32/bfloat16, no number returned",
     "test_attack3_numbers.py::test_overflowing_float16_logits_are_an_error_naming_the_task"),
    ("zeroed or NaN bytes written into a cached statistics file (same size, valid header)",
     "checksum mismatch: recomputed with a warning, identical values",
     "test_attack3_numbers.py::test_changed_statistics_bytes_are_recomputed_with_a_warning"),
    ("vit.eval_images / dynamics.eval_images below 5 per class; a task left with no test images; no images",
     "ParamsError in check; at run time an error naming the task, never accuracy 0.0",
     "test_attack3_numbers.py::test_too_few_eval_images_are_refused_and_an_empty_task_is_never_zero"),
    ("all-NaN or partly NaN bootstrap, NaN null values, constant overlap matrices, a seed with undefined p",
     "NaN resamples count against the claim; an undefined estimate gives p NaN and 'not supported (undefined)'",
     "test_attack3_numbers.py::test_nan_resamples_and_undefined_estimates_never_make_p_smaller"),
    ("an image model with fewer than 5 outputs (3 outputs, 3 classes)", "evaluated; top-5 is top-min(5, outputs)",
     "test_attack3_numbers.py::test_image_models_with_fewer_than_five_outputs_are_evaluated"),
    ("an image model whose outputs are not the classes (10 or 2 outputs for 3 folders)",
     "refused at load with one error naming both counts",
     "test_attack3_numbers.py::test_outputs_that_are_not_the_classes_are_refused_at_load"),
    ("JupyterLab Run All (ipykernel 7 subshells): the score explorer's figure rendered while the inline backend "
     "flushed it on another thread (a blank white image)",
     "explorers draw on figures pyplot does not track and show their own PNG; the browser test reads every explorer "
     "figure back from the page and requires drawn pixels and axes",
     "test_lab.py::test_run_all_in_jupyterlab_and_move_the_explorers "
     "test_lab.py::test_score_explorer_shows_a_drawn_histogram_made_without_pyplot"),
    ("notebooks call `neurons.explorer(shown);` (the semicolon hid the returned widget)",
     "the explorer displays itself and redraws once per change; every explorer call in the notebooks must be opened "
     "in the browser test", "test_lab.py::test_neuron_explorer_shows_itself_and_draws_once_per_change "
     "test_lab.py::test_every_explorer_in_the_notebooks_is_opened_in_the_browser"),
    ("text.parse_math off (for task names with $) on log and symlog axes",
     "plain tick labels, not raw $\\mathdefault{10^{1}}$", "test_lab.py::test_neuron_distribution_axis_labels_show_no_raw_mathtext "
     "test_lab.py::test_step_axis_labels_show_no_raw_mathtext"),
    # session 8, beyond attack 3: inputs of the new commands and options
    ("score_ranks (export) with an unknown selection mode", "ValueError naming the mode and the choices",
     "test_export.py::test_ranks_follow_select_neurons_order_ties_included"),
    ("collect --shard 2/2 (also 1, -1/2, a/b, 0/0)", "refused by argparse: '--shard must be I/N with 0 <= I < N', exit 2",
     "test_shards.py::test_shard_must_be_i_of_n"),
    ("merge with one shard's files missing, shards of runs with different N, a folder without shard files",
     "MergeError naming the entry, the missing blocks and the shards found (or the mix); nothing written",
     "test_shards.py::test_merge_refuses_missing_or_mixed_shards"),
    ("collect with a parameter set whose blocks share batches (no evidence.blocks_alone)",
     "refused: the merged statistics would not be the notebooks' bit for bit",
     "test_shards.py::test_two_shards_merged_are_the_one_process_cache_bit_for_bit"),
    ("lm.skip_positions with a repeated position, one outside 0 .. lm.ctx - 1, a non-integer or every position",
     "one ParamsError naming 'lm.skip_positions', the allowed range and the fix",
     "test_study.py::test_skip_positions_must_be_distinct_positions_of_a_window"),
    ("lm.equal_positions on a task whose documents are all shorter than lm.ctx",
     "a RuntimeWarning naming the longest window and saying to set lm.ctx to it or less",
     "test_data.py::test_position_weights_leave_out_skipped_positions_and_weigh_the_others_alike"),
    ("localisers.methods unknown, repeated or empty; localisers.lm_tasks below 2; localisers.random_seeds empty",
     "ParamsError naming the key and the allowed values", "test_localisers.py::test_localiser_params_are_checked"),
    ("importance(stats, 'lape') on one task's statistics; a LAPE/t-test localiser on a single task",
     "ValueError: use task_scores / give at least two tasks",
     "test_localisers.py::test_localiser_names_are_refused_as_a_single_tasks_importance"),
    ("attribution of an image model on bare images (no labels)", "ValueError: pass an ImageDataset with labels",
     "test_localisers.py::test_attribution_of_images_needs_labels"),
    ("direct_effects(top=0), add_ablations(per_task=0), an ablation whose passes read other documents",
     "ValueError naming the argument or the task", "test_neurons.py::test_bad_effect_arguments_are_named"),
    ("neuron pages for a model with no linear path to its outputs (BertModel)",
     "the direct-effect section says why (no output head) instead of failing",
     "test_neurons.py::test_every_architecture_has_a_readout_and_models_without_a_path_say_why"),
    ("localisers.attribution_tokens / attribution_images / eval_tokens / eval_images not a whole number >= 1, localisers.n_boot 0, an unknown localiser in localisers.methods", "ParamsError naming the key and what is allowed", "test_localisers.py::test_localiser_params_are_checked"),
    ("the auroc localiser given merged NeuronStats instead of {task: BlockStats}", "ValueError: the auroc localiser ranks statistics blocks: give {task: BlockStats}", "test_localisers.py::test_auroc_counts_ties_half_by_hand"),
    ("lm.moe_model: 5 (not a hub id or folder)", "ParamsError naming lm.moe_model before any work", "test_moe.py::test_moe_model_must_be_a_name_or_folder_of_a_mixture_of_experts"),
    ("lm.moe_model pointing at a dense (non-MoE) model", "one-line TypeError: not a mixture of experts, set lm.moe_model to a Mixtral/Qwen-MoE/OLMoE", "test_moe.py::test_moe_model_must_be_a_name_or_folder_of_a_mixture_of_experts"),
    ("a MoE model read by the dense neuron hooks (neuron_module)", "one-line TypeError pointing to modsep_nb.moe instead of reading [T, d] inputs as neurons", "test_moe.py::test_family_loads_with_its_experts"),
    ("ablate_units with a mask of the wrong shape", "ValueError naming the expected [MoE layers, experts x units]", "test_moe.py::test_ablation_equals_zeroed_down_projection_columns"),
    ("plan on a ViT parameter set naming an unknown timm model (vit.model: timm:no_such_vit)", "one-line error: timm has no architecture of that name (timm.list_models() lists them)", "test_shards.py::test_plan_counts_the_paper_vit_notebooks_without_the_dataset"),
    ("bisection on a task the unpruned model never gets right (accuracy 0)", "no ZeroDivisionError: the bound, not converged, reached nan, no further evaluation", "test_evaluation.py::test_bisection_of_a_task_the_model_never_gets_right"),
    ("overlap.retain set to an unknown rule (e.g. pile)", "ParamsError naming overlap.retain and the choices rest, general", "test_general_corpus.py::test_overlap_retain_is_a_checked_param"),
    ("retain='general' without the general corpus's statistics", "ValueError: needs the general corpus's statistics as `general` (Study.general_stats())", "test_general_corpus.py::test_retain_general_without_a_corpus_is_an_error"),
    ("image general corpus larger than the train images no task's statistics read", "ValueError: only N are left: lower vit.stats_images", "test_general_corpus.py::test_image_general_corpus_is_a_seeded_sample_no_task_statistics_read"),
]
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import modsep_nb as ms
from modsep_nb import files
from modsep_nb.models import CorruptModelError, ModelNotAvailableError
from modsep_nb.params import ParamsError, load_params
from modsep_nb.runner import RunError, run_dir_for
from modsep_nb.statistics import NeuronStats
from modsep_nb.study import Study

REPO = Path(__file__).resolve().parent.parent


def write_params(tmp_path, text, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_attack_table_is_complete():
    for attack, expected, tests in ATTACKS:
        for name in tests.split():
            file, _, test = name.rpartition("::")
            source = (Path(__file__).parent / file).read_text() if file else Path(__file__).read_text()
            assert f"def {test}(" in source, f"{attack!r}: {name} does not exist"


# -- parameters: one error per bad input, naming the problem and the fix ------------------------------------
@pytest.mark.parametrize("text, words", [
    ("lm: {stats_tokenz: 10}", ["unknown parameter 'lm.stats_tokenz'", "stats_tokens"]),
    ("colour: red", ["unknown parameter 'colour'"]),
    ("lm: {stats_tokens: many}", ["'lm.stats_tokens'", "whole number"]),
    ("pruning: {frac: 1.5}", ["'pruning.frac'", "strictly between 0 and 1"]),
    ("pruning: {frac: 0}", ["'pruning.frac'", "strictly between 0 and 1"]),
    ("pruning: {mode: sideways}", ["'pruning.mode'", "global", "per_layer"]),
    ("lm: {tasks: [code, cooking]}", ["unknown tasks ['cooking']", "code"]),
    ("overlap: {sweep: [0.1, 2.0]}", ["'overlap.sweep'", "fractions"]),
    ("notebooks: ['08']", ["'notebooks'", "01"]),
    ("lm: {batch_size: 0}", ["'lm.batch_size'", "at least 1"]),
    ("pruning: {importance: loud}", ["'pruning.importance'", "abs"]),
    ("pruning: {eps_relative: -0.1}", ["'pruning.eps_relative'", "null"]),
    ("pruning: {eps_relative: small}", ["'pruning.eps_relative'", "number"]),
    ("moefication: {max_degree: 0}", ["'moefication.max_degree'", "whole number"]),
    ("moefication: {n_init: some}", ["'moefication.n_init'", "auto"]),
    ("device: gpu", ["'device'", "cuda:N", "sharded"]),
    ("lm: {dtype: half}", ["'lm.dtype'", "bfloat16", "auto", "null"]),
    # issue 18
    ("lm: {tasks: [code, code]}", ["'lm.tasks'", "['code'] more than once"]),
    ("random_init: {seeds: []}", ["'random_init.seeds'", "non-empty"]),
    ("random_init: {seeds: [1.5]}", ["'random_init.seeds'", "whole numbers"]),
    ("random_init: {seeds: [true]}", ["'random_init.seeds'", "whole numbers"]),
    ("seed: -1", ["'seed'", ">= 0"]),
    ("pruning: {eps: .nan}", ["'pruning.eps'", "finite"]),
    ("pruning: {target: .inf}", ["'pruning.target'", "finite"]),
    ("lm: {ctx: 1}", ["'lm.ctx'", "at least 2"]),
    ("lm: {eval_frac: 0.999}", ["'lm.eval_frac'", "none would be left for statistics"]),
    ("cache_dir: 5", ["'cache_dir'", "path"]),
    ("vit: {tasks: {pets: [Cat]}}", ["'vit.tasks'", "unknown classes ['Cat']", "Trouser"]),
    ("vit: {tasks: {tops: []}}", ["'vit.tasks'", "non-empty list"]),
    ("overlap: {metric_modes: [global]}", ["unknown parameter 'overlap.metric_modes'"]),
    ("moefication: {keep_fracs: [true]}", ["'moefication.keep_fracs'", "fractions"]),
    ("correspondence: {fracs: [0.1, false]}", ["'correspondence.fracs'", "fractions"]),
    ("run_name: ../../etc", ["'run_name'", "letters, digits"]),
    ("run_name: 'a/b'", ["'run_name'", "letters, digits"]),
])
def test_bad_parameters_named(tmp_path, text, words):
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path, text))
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("text, words", [
    ("", ["is empty"]),
    ("# nothing but a comment\n", ["is empty"]),
    ("seed: 1\nrun_name: x\nseed: 2\n", ["line 3", "'seed' appears twice", "line 1"]),
    ("lm:\n  ctx: 64\n  ctx: 32\n", ["line 3", "'ctx' appears twice"]),
    ("seed: 1\nlm: [unclosed\n", ["line 3", "invalid YAML"]),
    (b"run_name: x\ndescription: caf\xe9\n", ["line 2", "not UTF-8"]),
])
def test_cli_parameter_file_errors_are_one_line(tmp_path, capsys, text, words):
    from modsep_nb.__main__ import main
    path = write_params(tmp_path, text)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_cli_rejects_bad_params_before_work(tmp_path):
    path = write_params(tmp_path, "pruning: {frac: 3}")
    proc = subprocess.run([sys.executable, "-m", "modsep_nb", "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pruning.frac" in proc.stderr
    assert not (tmp_path / "o").exists()          # nothing was started


def test_shipped_params_are_valid():
    for path in (REPO / "params").glob("*.yaml"):
        load_params(path)


def test_run_folder_stays_inside_outputs():
    # run_name is validated by load_params; run_dir_for refuses on its own too
    with pytest.raises(RunError, match="outside"):
        run_dir_for({"run_name": "../../etc"}, None, overwrite=False)
    assert run_dir_for({"run_name": "ok-1"}, None, overwrite=True) == (REPO / "outputs" / "ok-1").resolve()


# -- API misuse ------------------------------------------------------------------------------------------
def test_ablate_accepts_exact_integer_masks_only(tiny_llama, tokenizer):
    """`~mask` on int64 gives -1/-2: integer masks used to scale neurons instead of zeroing them."""
    from conftest import random_texts
    ids = tokenizer(random_texts(3, seed=1, min_len=6, max_len=6), return_tensors="pt")["input_ids"]
    mask = torch.zeros(tiny_llama.n_layers, tiny_llama.d_mlp, dtype=torch.bool)
    mask[0, [1, 4, 9]] = True
    mask[1, :5] = True

    def logits(m):
        with ms.ablate(tiny_llama, m):
            return tiny_llama.model(input_ids=ids).logits
    with torch.no_grad():
        base, expected = tiny_llama.model(input_ids=ids).logits, logits(mask)
        assert not torch.equal(base, expected)
        for as_int in (mask.long(), mask.to(torch.uint8), mask.int().numpy()):
            assert torch.equal(logits(as_int), expected)
    for bad, words in ((mask.float(), "float32"), (mask.long() * 2, "other than 0 and 1"),
                       (-mask.long(), "other than 0 and 1")):
        with pytest.raises(ValueError, match=words):
            with ms.ablate(tiny_llama, bad):
                pass


def test_float_labels_are_refused(tiny_vit):
    c, h, w = tiny_vit.image_shape
    with pytest.raises(ValueError, match="integer class ids"):
        ms.evaluate(tiny_vit, torch.zeros(4, c, h, w), labels=torch.tensor([0.0, 1.7, 2.0, 0.2]))
    from modsep_nb.correspondence import expert_counts
    selected = torch.tensor([True, False, True, False])
    assert expert_counts(selected, torch.tensor([0, 0, 1, 1])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="integer tensor of expert ids"):
        expert_counts(selected, torch.tensor([0.0, 0.4, 1.0, 1.2]))       # .long() used to truncate these


def test_api_misuse_is_one_clear_error(tiny_llama):
    from conftest import random_texts
    from modsep_nb.moefication import normalize_rows
    docs = random_texts(4, seed=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            ms.collect_stats(tiny_llama, docs, batch_size=bad, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        ms.collect_stats(tiny_llama, docs, max_tokens=0, progress=False)
    x = normalize_rows(tiny_llama.w_in(0).float())
    for name, value in (("n_init", "many"), ("n_init", 0), ("refine", "yes"), ("max_iter", 1.5)):
        with pytest.raises(ValueError, match=name):
            ms.balanced_kmeans(x, 4, **{name: value})
    stats = ms.collect_stats(tiny_llama, docs, progress=False)
    for eps in (float("nan"), float("inf"), -1e-3, "0.1"):
        with pytest.raises(ValueError, match="eps"):
            ms.prune_scores(stats, stats, eps=eps)


def test_bad_device_fails_before_loading(llama_dir, monkeypatch):
    from modsep_nb import models
    monkeypatch.setattr(models, "_load_hf", lambda *a, **k: pytest.fail("weights were read before the check"))
    with pytest.raises(ValueError, match="'nope' is not a device"):
        ms.load_model(llama_dir, device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ms.load_model(llama_dir, device="cuda:0")


def test_missing_local_folder_is_not_a_hub_problem(tmp_path):
    for spec in ("/nonexistent/dir", str(tmp_path / "nothing"), "./not/here/either"):
        with pytest.raises(ModelNotAvailableError) as err:
            ms.load_model(spec)
        assert "does not exist" in str(err.value) and "huggingface-cli" not in str(err.value)


# -- model caches: checksummed, rebuilt, never silently wrong --------------------------------------------------
def _copy_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())


def _overwrite_tail(path: Path, n: int = 256) -> None:
    """Bytes overwritten at the end of a safetensors file: the last tensor's float32 data become NaN."""
    data = bytearray(path.read_bytes())
    data[-n:] = b"\xff" * n
    path.write_bytes(bytes(data))


def test_corrupted_model_cache_is_rebuilt(tmp_path, llama_dir):
    target, builds = tmp_path / "cache" / "tiny-lm", []

    def build(tmp):
        builds.append(1)
        _copy_files(llama_dir, tmp)
    files.cached_dir(target, build, what="tiny LM")
    reference = {k: v.clone() for k, v in ms.load_model(target).model.state_dict().items()}   # not memory-mapped
    assert files.check_manifest(target) is None and len(builds) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files.cached_dir(target, lambda tmp: pytest.fail("a valid cache was rebuilt"), what="tiny LM")

    def damaged(change):
        change()
        with pytest.warns(UserWarning, match="not valid .* rebuilding"):
            files.cached_dir(target, build, what="tiny LM")
        state = ms.load_model(target).model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items())
    damaged(lambda: _overwrite_tail(target / "model.safetensors"))                     # NaN weights
    damaged(lambda: (target / "config.json").write_text("{ garbage"))
    damaged(lambda: (target / "tokenizer.json").unlink())
    weights = target / "model.safetensors"
    damaged(lambda: weights.write_bytes(weights.read_bytes()[:1000]))                  # truncated
    damaged(lambda: (target / files.MANIFEST).unlink())                                # built by older code
    assert len(builds) == 6


def test_corrupted_model_folder_is_a_clear_error(tmp_path, llama_dir):
    """A user's own folder (no manifest) cannot be rebuilt: one error that names the folder or the tensor."""
    def broken(change) -> str:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        _copy_files(llama_dir, folder)
        change(folder)
        with pytest.raises(CorruptModelError) as err:
            ms.load_model(folder)
        msg = str(err.value)
        assert "hub" not in msg and "huggingface-cli" not in msg
        return msg
    nan = broken(lambda f: _overwrite_tail(f / "model.safetensors"))
    assert "NaN or infinite" in nan and "weight '" in nan
    assert "config" in broken(lambda f: (f / "config.json").write_text("{ garbage"))
    assert "weights" in broken(lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:1000]))
    assert "tokenizer" in broken(lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])


def test_embedded_caches_are_verified_and_rebuilt(tmp_path, monkeypatch, llama_dir):
    """The converted SmolLM2 and the trained ViT go through the same verified cache (conversion and training
    replaced by a copy of a tiny model, so that the test takes seconds)."""
    from modsep_nb import models, vit_training
    monkeypatch.setenv("MODSEP_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(models, "_convert_smollm2", lambda pkg, tmp: calls.append("lm") or _copy_files(llama_dir, tmp))
    monkeypatch.setattr(vit_training, "train_fmnist_vit",
                        lambda tmp, s: calls.append("vit") or (tmp / "x").write_text("w"))
    lm = models._smollm2_dir()
    vit = vit_training.fmnist_vit_dir()
    assert models._smollm2_dir() == lm and vit_training.fmnist_vit_dir() == vit and calls == ["lm", "vit"]
    _overwrite_tail(lm / "model.safetensors")
    (vit / "x").write_text("changed")
    with pytest.warns(UserWarning, match="SmolLM2 conversion"):
        models._smollm2_dir()
    with pytest.warns(UserWarning, match="Fashion-MNIST ViT"):
        vit_training.fmnist_vit_dir()
    assert calls == ["lm", "vit", "lm", "vit"] and files.check_manifest(lm) is None


CONCURRENT_BUILDS = """
import os, sys, time
from pathlib import Path
from modsep_nb.files import cached_dir
root, rounds = Path(sys.argv[1]), int(sys.argv[2])
for i in range(rounds):
    target = root / f"folder{i}"
    def build(tmp):
        with open(root / f"builds{i}.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        (tmp / "a.txt").write_text(str(os.getpid()))
        time.sleep(0.01)
        (tmp / "b.bin").write_bytes(b"x" * 100_000)
    cached_dir(target, build, what="test folder")
    assert (target / "b.bin").stat().st_size == 100_000 and (target / "a.txt").read_text().isdigit()
"""


def test_concurrent_builds_of_a_cache_folder(tmp_path):
    rounds = 40
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILDS, str(tmp_path), str(rounds)],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    for i in range(rounds):               # each folder built exactly once, by whoever came first
        assert len((tmp_path / f"builds{i}.log").read_text().split()) == 1
        assert files.check_manifest(tmp_path / f"folder{i}") is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


KILLED_BUILD = """
import sys, time
from pathlib import Path
from modsep_nb.files import cached_dir
def build(tmp):
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    time.sleep(120)
cached_dir(Path(sys.argv[1]), build, what="test folder")
"""


def test_killed_build_leaves_no_temporary_folder(tmp_path):
    target = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(target)])
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".model.tmp-*/half.bin")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".model.tmp-*")) and not target.exists()
    files.cached_dir(target, lambda tmp: (tmp / "w").write_text("ok"), what="test folder")
    assert (target / "w").read_text() == "ok"
    assert not list(tmp_path.glob(".model.tmp-*"))


def test_artifacts_respect_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        files.write_text_atomic(tmp_path / "a.txt", "x")
        folder = files.cached_dir(tmp_path / "d", lambda tmp: (tmp / "f").write_text("y"), what="test folder")
        # safetensors 0.8 writes 0600 whatever the umask: the statistics cache and a run's statistics
        stats = NeuronStats(torch.ones(1), *[torch.zeros(1, 2, dtype=torch.float64) for _ in range(5)])
        files.cached(tmp_path / "cache" / "s.safetensors", lambda: stats, load=NeuronStats.load,
                     save=lambda st, tmp: st.save(tmp))
        stats.save(tmp_path / "statistics" / "lm-code.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    assert (folder / "f").stat().st_mode & 0o777 == 0o664 and folder.stat().st_mode & 0o777 == 0o775
    for saved in (tmp_path / "cache" / "s.safetensors", tmp_path / "statistics" / "lm-code.safetensors"):
        assert saved.stat().st_mode & 0o777 == 0o664, saved


# -- statistics caches: atomic, validated, resumable ---------------------------------------------------------
def test_corrupted_cache_is_recomputed_with_warning(tmp_path, smollm):
    params = load_params(None, {"cache_dir": str(tmp_path), "device": "cpu",
                                "lm": {"tasks": ["docs", "law"], "stats_tokens": 64, "ctx": 32}})
    first = Study.from_params(params, "lm", handle=smollm).stats(progress=False)
    path = sorted((tmp_path / "stats").glob("*.safetensors"))[0]
    path.write_bytes(path.read_bytes()[:40])          # truncated, as by a crash
    with pytest.warns(UserWarning, match="unreadable"):
        again = Study.from_params(params, "lm", handle=smollm).stats(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # now read from the cache, no warning
        third = Study.from_params(params, "lm", handle=smollm).stats(progress=False)
    for t in first:
        assert torch.equal(again[t].mean_abs, first[t].mean_abs) and torch.equal(third[t].mean_abs, first[t].mean_abs)


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
    # windows of ctx 32 (docs' documents are long): 2, then 3, each counting all but its first position
    assert int(s1["docs"].count[0]) == 64 - 2 and int(s2["docs"].count[0]) == 96 - 3
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4


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


# -- run folders ----------------------------------------------------------------------------------------------
def test_run_directory_never_overwritten(tmp_path):
    params = {"run_name": "r"}
    first = run_dir_for(params, str(tmp_path / "r"), overwrite=False)
    first.mkdir()
    (first / "summary.md").write_text("earlier run")
    second = run_dir_for(params, str(tmp_path / "r"), overwrite=False)
    assert second != first and second.name == "r-2"
    assert run_dir_for(params, str(tmp_path / "r"), overwrite=True) == first


def fake_notebooks(folder: Path) -> Path:
    """Small stand-ins for the five notebooks (same names, same parameters cell): each records findings that
    name its seed, warns like a recomputed cache, and sleeps $MODSEP_TEST_SLEEP_<key> seconds (first creating the
    file $MODSEP_TEST_BUSY_<key>, if set, to say that its kernel is busy)."""
    import nbformat
    from modsep_nb.params import NOTEBOOKS
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in NOTEBOOKS.items():
        params_cell = nbformat.v4.new_code_cell("params_file = None\nout_dir = None\noverrides = {}")
        params_cell.metadata["tags"] = ["parameters"]
        body = nbformat.v4.new_code_cell(textwrap.dedent(f"""
            import os, time, warnings
            from modsep_nb.params import load_params
            from modsep_nb.report import record_findings
            p = load_params(params_file)
            warnings.warn("cached statistics /x/{key}.safetensors are unreadable; recomputing")
            if os.environ.get("MODSEP_TEST_BUSY_{key}"):
                open(os.environ["MODSEP_TEST_BUSY_{key}"], "w").close()
            time.sleep(float(os.environ.get("MODSEP_TEST_SLEEP_{key}", "0")))
            record_findings(out_dir, "{name}", "notebook {key}", f"ran with seed {{p['seed']}}")
            """))
        nb = nbformat.v4.new_notebook(cells=[params_cell, body])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, str(folder / f"{name}.ipynb"))
    return folder


@pytest.fixture
def fake_suite(tmp_path, monkeypatch):
    from modsep_nb import runner
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", fake_notebooks(tmp_path / "notebooks"))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")   # for the kernels
    return runner


def test_overwrite_with_other_params_removes_stale_results(tmp_path, fake_suite):
    out, log = tmp_path / "run", []
    seed0 = write_params(tmp_path, "run_name: r\nseed: 0\ncache_dir: " + str(tmp_path / "c"), "s0.yaml")
    seed1 = write_params(tmp_path, "run_name: r\nseed: 1\ncache_dir: " + str(tmp_path / "c"), "s1.yaml")
    fake_suite.run(seed0, only="01,02", out=str(out), log=log.append)
    summary = (out / "summary.md").read_text()
    assert "01 finished, 02 finished" in summary and summary.count("ran with seed 0") == 2
    assert any("02_mistral_pruning: UserWarning: cached statistics /x/02.safetensors are unreadable" in line
               for line in log), log                                        # repeated on the terminal
    assert not (out / fake_suite.INCOMPLETE).exists() and "did not finish" not in summary

    # the same parameters, a subset: the other notebook's results stay
    fake_suite.run(write_params(tmp_path, seed0.read_text(), "copy.yaml"), only="01", out=str(out),
                   overwrite=True, log=log.append)
    assert (out / "02_mistral_pruning.ipynb").is_file()
    assert "01 finished, 02 finished" in (out / "summary.md").read_text()

    # other parameters: the stale 02 results are removed, never shown beside the new 01
    log.clear()
    fake_suite.run(seed1, only="01", out=str(out), overwrite=True, log=log.append)
    summary = (out / "summary.md").read_text()
    assert "ran with seed 1" in summary and "seed 0" not in summary and "02" not in summary.split("\n## ")[0], summary
    assert not (out / "02_mistral_pruning.ipynb").exists() and not (out / "findings" / "02_mistral_pruning.md").exists()
    assert json.loads((out / "params.json").read_text())["seed"] == 1
    assert any("other parameters" in line for line in log)


def test_unusable_out_or_cache_stops_before_work(tmp_path, fake_suite, capsys):
    """root ignores chmod, so the unusable folders here lie under a regular file (mkdir fails for anyone)."""
    from modsep_nb.__main__ import main
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    good = write_params(tmp_path, f"cache_dir: {tmp_path / 'c'}", "good.yaml")
    bad_cache = write_params(tmp_path, f"cache_dir: {blocker / 'cache'}", "bad.yaml")
    for args, words in (([str(good), "--out", str(blocker / "out")], "run folder"),
                        ([str(good), "--out", str(blocker)], "is a file"),
                        ([str(bad_cache), "--out", str(tmp_path / "o")], "cache folder")):
        assert main(["run", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


SIGINT_RUN = """
import sys
from pathlib import Path
from modsep_nb import runner
from modsep_nb.__main__ import main
runner.NOTEBOOK_DIR = Path(sys.argv[1])
sys.exit(main(["run", sys.argv[2], "--only", "01,02", "--out", sys.argv[3], "--overwrite"]))
"""


def sigint_as_in_a_shell():
    """In the child before exec: SIGINT handled by default and not blocked, as a shell starts a command, whatever
    earlier tests left in this process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_sigint_is_one_line_and_marks_the_folder_incomplete(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".modsep-run").write_text("")                                 # the killed run made the folder
    (out / ".01_vit_pruning.k9left.ipynb").write_text('{"cells": [')      # left by a kill -9
    params = write_params(tmp_path, f"cache_dir: {tmp_path / 'c'}")
    busy = tmp_path / "02-busy"
    env = {**os.environ, "MODSEP_TEST_SLEEP_02": "120", "MODSEP_TEST_BUSY_02": str(busy),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_RUN, str(fake_notebooks(tmp_path / "nb")), str(params),
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_shell)
    deadline = time.time() + 240
    while time.time() < deadline and not busy.exists():
        time.sleep(0.2)
    # the kernel of 02 is busy sleeping (not still starting: on a loaded machine a fixed wait after the run's
    # hidden notebook appears could land in the kernel's start-up)
    assert busy.exists() and list(out.glob(".02_mistral_pruning.*.ipynb"))
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    assert (out / "INCOMPLETE.md").is_file() and "did not finish" in (out / "summary.md").read_text()
    assert "01 finished" in (out / "summary.md").read_text() and "02 finished" not in (out / "summary.md").read_text()
    assert not list(out.glob(".*.ipynb")), "no hidden partial notebook is left"


def test_failed_notebook_kept_only_when_valid(tmp_path):
    """A full disk truncates the executed notebook: the previous .failed.ipynb stays, never invalid JSON."""
    from modsep_nb import runner
    previous = tmp_path / "01_vit_pruning.failed.ipynb"
    previous.write_text('{"cells": [], "note": "previous"}')

    class FullDisk:
        @staticmethod
        def execute_notebook(src, dest, **kwargs):
            Path(dest).write_text('{"cells": [{"cell_type": "co')
            raise OSError(28, "No space left on device")
    log = []
    with pytest.raises(OSError):
        runner._run_notebook(FullDisk, "01_vit_pruning", tmp_path / "p.yaml", tmp_path, log.append)
    assert json.loads(previous.read_text())["note"] == "previous"
    assert any("could not be saved" in line for line in log)
    assert [p.name for p in tmp_path.iterdir()] == [previous.name]
