"""The registry of subcommands: each command module declares its pair with ``@command``."""

from __future__ import annotations

import sys
from typing import Callable

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str) -> Callable[[Callable], Callable]:
    """Register ``_add_<name>`` / ``_run_<name>`` (both in the decorated function's module) as a subcommand."""

    def wrap(add: Callable) -> Callable:
        run = vars(sys.modules[add.__module__])[add.__name__.replace("_add_", "_run_")]
        COMMANDS[name] = (add, run)
        return add

    return wrap
