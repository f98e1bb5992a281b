"""Command line: python -m modsep_nb run PARAMS.yaml [--only 01,02] [--out DIR] [--overwrite];
python -m modsep_nb check PARAMS.yaml; python -m modsep_nb models (the supported model classes);
python -m modsep_nb plan PARAMS.yaml (what a run costs); collect PARAMS.yaml --shard I/N --out DIR and
merge DIR... --out CACHE (block statistics from a job array, README "Past one machine")."""
from __future__ import annotations

import argparse
import logging
import sys

from . import plan
from .models import supported_models
from .params import ParamsError, load_params, task_sources
from .runner import RunError
from .runner import run as run_notebooks
from .shards import MergeError, parse_shard
from .shards import collect as collect_shard
from .shards import merge as merge_shards
from .study import cache_entries
from .tasks import ImageTasks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modsep_nb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks with papermill into outputs/<run>/")
    run.add_argument("params", help="a parameter set, e.g. params/default.yaml")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 01,02")
    run.add_argument("--out", help="run folder (default outputs/<run_name>, or the next free -N)")
    run.add_argument("--overwrite", action="store_true", help="reuse the run folder even if it has results")
    check = sub.add_parser("check", help="validate a parameter set and exit")
    check.add_argument("params")
    sub.add_parser("models", help="list the model classes modsep supports and where it reads their neurons")
    collect = sub.add_parser("collect", help="one shard's block statistics of every cache entry the notebooks read "
                                             "(a job array: shards 0/N ... N-1/N, then merge)")
    collect.add_argument("params")
    collect.add_argument("--shard", required=True, type=_shard, help="I/N with 0 <= I < N, e.g. $SLURM_ARRAY_TASK_ID/8")
    collect.add_argument("--out", required=True, help="folder for this shard's files")
    merge = sub.add_parser("merge", help="put collect's shard files together into the statistics cache")
    merge.add_argument("dirs", nargs="+", help="the folders collect wrote")
    merge.add_argument("--out", required=True, help="the cache folder the notebooks read: the params' cache_dir, "
                                                     "or $MODSEP_CACHE (default ~/.cache/modsep)")
    plan = sub.add_parser("plan", help="forward passes, tokens and estimated time of each notebook, before any work")
    plan.add_argument("params")
    plan.add_argument("--no-measure", action="store_true", help="do not load the models to time a few batches here")
    args = parser.parse_args(argv)
    if args.command == "models":
        rows = supported_models()
        print(f"{len(rows)} model classes (modsep_nb.models.ARCHITECTURES); a layer's neurons are the input of a "
              f"module inside each block (of a mixture of experts: each expert's hidden units):")
        for r in rows:
            print(f"{r['class']:28s} {r['kind']:5s} blocks {r['blocks']}; neurons: {r['neurons']}; W_in: {r['w_in']}")
        return 0
    try:
        if args.command == "check":
            params = load_params(args.params)
            print(f"{args.params}: ok")
            for line in task_sources(params):     # globs may reach any file: say which ones each task reads
                print(line)
            return 0
        if args.command in ("collect", "merge", "plan"):
            return _parallel(args)
        run_notebooks(args.params, only=args.only, out=args.out, overwrite=args.overwrite)
    except (ParamsError, RunError, MergeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the notebook client's pending tasks die with the kernel; asyncio would print their tracebacks at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print("modsep: interrupted; the run folder is marked incomplete (INCOMPLETE.md) and summary.md lists "
              "the notebooks that finished", file=sys.stderr)
        return 130
    except Exception as err:
        if type(err).__name__ != "PapermillExecutionError":
            raise
        # the notebook's traceback is in the kept .failed.ipynb (the runner printed its path)
        print(f"error: a notebook failed: {err.ename}: {str(err.evalue).splitlines()[0] if err.evalue else ''}",
              file=sys.stderr)
        return 1
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parallel(args) -> int:
    """collect, merge (shards.py) and plan (plan.py)."""
    if args.command == "merge":
        for path in merge_shards(args.dirs, args.out):
            print(path)
        return 0
    params = load_params(args.params)
    if args.command == "collect":
        if not params["evidence"]["blocks_alone"]:
            raise ParamsError(f"{args.params}: collect needs `evidence: {{blocks_alone: true}}` (each block batched "
                              f"alone, so that merged shards are the notebooks' statistics bit for bit); add it, and "
                              f"run the notebooks with the same file")
        collect_shard(cache_entries(params), args.shard, args.out)
        return 0
    kinds = [k for k, nbs in plan.USES.items() if set(params["notebooks"]) & set(nbs)]
    n_tasks = {}
    if "vit" in kinds and not isinstance(params["vit"]["tasks"], dict):     # classes / groups: read the dataset's
        n_tasks["vit"] = plan.known_n_tasks(params) or len(ImageTasks.from_params(params).names)
    stages = plan.count(params, n_tasks)
    sizes = {k: plan.model_size(params, k) for k in kinds}
    rates = {} if args.no_measure else {k: plan.measure_rate(params, k) for k in kinds}
    print(plan.report(params, stages, rates, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
