"""Command line: python -m modsep_nb run PARAMS.yaml [--only 01,02] [--out DIR] [--overwrite]."""
from __future__ import annotations

import argparse
import logging
import sys

from .params import ParamsError, load_params, task_sources
from .runner import RunError
from .runner import run as run_notebooks


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
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            params = load_params(args.params)
            print(f"{args.params}: ok")
            for line in task_sources(params):     # globs may reach any file: say which ones each task reads
                print(line)
            return 0
        run_notebooks(args.params, only=args.only, out=args.out, overwrite=args.overwrite)
    except (ParamsError, RunError) as err:
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


if __name__ == "__main__":
    sys.exit(main())
