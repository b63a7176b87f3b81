"""``llmscratch runs``: the runs under a folder, one line each."""

from __future__ import annotations

import argparse

from .commands import command


def _run_runs(args: argparse.Namespace) -> int:
    from ..store.runs import format_runs, list_runs

    print(format_runs(list_runs(args.folder), args.folder))
    return 0


@command("runs")
def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs in a folder: step, best validation bits per byte, size, date",
                       description="List the runs saved in FOLDER, one line each: name, step (of the steps asked "
                       "for), best validation bits per byte, size on disk and when it was last saved; `latest` is "
                       "marked, and a folder that is not a run says what it is.")
    p.add_argument("folder", nargs="?", default="runs", metavar="FOLDER",
                   help="the folder of runs (train's --out-dir; default runs)")
