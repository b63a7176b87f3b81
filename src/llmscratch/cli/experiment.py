"""``llmscratch experiment``: the rerunnable experiments."""

from __future__ import annotations

import argparse

from .commands import command


def _run_experiment(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tools.experiments import NAMES, run_experiment, summaries

    if args.list:
        width = max(map(len, NAMES))
        for name, summary in summaries().items():
            print(f"{name:<{width}}  {summary}")
        return 0
    if args.name is None:
        raise ConfigError(f"name an experiment ({', '.join(NAMES)}) or pass --list")
    if args.quick and args.tiny:
        raise ConfigError("--quick and --tiny are two sizes: pick one")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), as NumPy's seed, got {args.seed}")
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    report = run_experiment(args.name, mode, args.out, device=args.device, seed=args.seed, data=args.data,
                            encoding=args.encoding)
    folder = f"{args.out}/{args.name}"
    for table in report.tables:
        print(table.markdown() + "\n")
    print("findings:")
    for finding in report.findings:
        print(f"- {finding}")
    print(f"\nreport: {folder}/report.md  (results.json and the plots beside it)")
    return 0


@command("experiment")
def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="run one of the attention experiments (scaling, positions, heads, batching)",
        description="Train a few small models that differ in one thing and write OUT/NAME/report.md, "
        "results.json and PNG plots. The default size is meant for a GPU; --quick takes a few minutes on a "
        "2-core CPU; --tiny takes seconds (for tests).",
    )
    p.add_argument("name", nargs="?", default=None, help="the experiment: scaling, positions, heads or batching")
    p.add_argument("--list", action="store_true", help="list the experiments, one line each")
    p.add_argument("--quick", action="store_true", help="small models and short training: a few minutes on a CPU")
    p.add_argument("--tiny", action="store_true", help="a synthetic corpus and a few steps: seconds (smoke test)")
    p.add_argument("--out", default="experiments", help="parent folder of the reports (default experiments)")
    p.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--data", default=None, help="a text file, folder or glob to use instead of the built-in corpus")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the --data files (default utf-8)")
