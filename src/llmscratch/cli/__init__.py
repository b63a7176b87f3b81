"""``llmscratch …``: a thin command-line layer over the package's typed functions.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options (every option
has help text), ``_run_<name>(args)`` calls the library function that does the work.
Imports of heavy modules happen inside ``_run_*`` so ``--help`` stays fast.

One module per command (``explain.py``, ``train.py``, …); ``app.py`` builds the parser
and runs one.
"""

from .app import build_parser, main
from .commands import COMMANDS

__all__ = ["COMMANDS", "build_parser", "main"]
