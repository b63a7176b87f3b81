"""``llmscratch info`` (and ``runs``): what a run directory, or a folder of runs, holds."""

from __future__ import annotations

import argparse

from .commands import command


def _run_info(args: argparse.Namespace) -> int:
    from ..store.describe import describe_run
    from ..store.runs import format_runs, is_runs_folder, list_runs

    if is_runs_folder(args.run_dir):  # the folder of runs itself (runs/): the listing of `llmscratch runs`
        print(format_runs(list_runs(args.run_dir), args.run_dir))
        return 0
    print(describe_run(args.run_dir))
    return 0


@command("info")
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a run's config, size, training progress and best validation numbers",
                       description="Describe a run directory: model config, parameter count, tokenizer, "
                       "training progress and the best validation numbers. Given the folder of runs "
                       "(runs/), list its runs as `llmscratch runs` does.")
    p.add_argument("run_dir", help="a run directory (or the folder of runs, to list them)")
