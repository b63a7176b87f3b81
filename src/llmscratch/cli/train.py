"""``llmscratch train``: options from the command line and config files, then one training run."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .commands import command

if TYPE_CHECKING:
    from ..training.config import TrainConfig


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the ``--config`` file and the command line (which wins)."""
    return _train_config(train_options_from_args(args), args)


def _train_config(options: dict, args: argparse.Namespace) -> TrainConfig:
    """``TrainConfig.from_dict(options)``; an error that the ``--config`` file causes names the file.

    The file is at fault where the command line alone gives a valid config: the message's
    ``(--lr)`` is then no option the user typed, and the file is where to look.
    """
    from ..errors import ConfigError
    from ..training.config import TrainConfig

    try:
        return TrainConfig.from_dict(options)
    except ConfigError as err:
        if not args.config:
            raise
        try:
            TrainConfig.from_dict(train_options_from_args(args, with_file=False))
        except ConfigError:
            raise err from None  # the command line is wrong on its own: its error stands as it is
        raise ConfigError(f"config file {args.config}: {err}") from err


def train_options_from_args(args: argparse.Namespace, with_file: bool = True) -> dict:
    """The training options the user set, in the ``--config`` file or on the command line (which wins)."""
    import dataclasses

    from ..nn.model import FIELD_OPTIONS
    from ..training.config import TrainConfig, load_config_file

    values: dict = load_config_file(args.config) if args.config and with_file else {}
    model = dict(values.pop("model", {}) or {})
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag")
        if flag == "off":  # --no-progress
            if getattr(args, "no_" + f.name, False):
                values[f.name] = False
        elif flag is not None and f.name != "model" and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    for field_name, flag in FIELD_OPTIONS.items():
        v = getattr(args, _dest(flag), None)
        if field_name == "scale_attn":  # --no-scale-attn
            if v:
                model["scale_attn"] = False
        elif v is not None:
            model[field_name] = v
    if model:
        values["model"] = model
    return values


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _run_train(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc is the number of processes to launch: at least 1, got {args.nproc}")
    options = train_options_from_args(args)
    if isinstance(options.get("sample_prompt"), str):  # checked now, not at the first sample after training
        from ..data.tokenizer import check_utf8

        check_utf8(options["sample_prompt"], "--sample-prompt")
    if args.print_config:  # what would run, as a --config file holds it; nothing is trained or launched
        import yaml

        from ..training.setup import resolved_options

        resolved = resolved_options(_train_config(options, args), set(options))
        print("# llmscratch train: the resolved options (defaults, then --config, then the command line); "
              "`llmscratch train --config FILE` runs them")
        print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=1000), end="")
        return 0
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from ..training.distributed import launch_torchrun, micro_batch_size

        cfg = _train_config(options, args)  # a bad option is reported once, here, not by every process
        if not cfg.resume:  # (a resumed run's batch is its own, read by each process)
            micro_batch_size(cfg.batch_size, cfg.grad_accum, args.nproc, cfg.micro_batch)
        return launch_torchrun(args.nproc, sys.argv[1:])
    from ..training.train import train

    run_dir = train(_train_config(options, args), given=set(options))  # it prints the closing sample, once
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved in {run_dir}  (generate more: llmscratch generate {run_dir} --prompt \"...\")")
    return 0


@command("train")
def _add_train(sub: argparse._SubParsersAction) -> None:
    """The options are TrainConfig's fields (training/config.py: help, group, default) and the
    model options of ``MODEL_OPTIONS``; ``--nproc``, ``--config`` and ``--print-config`` act on the command itself."""
    import dataclasses

    from ..nn.model import FIELD_OPTIONS
    from ..training.config import GROUPS, MODEL_OPTIONS, TrainConfig

    p = sub.add_parser(
        "train", help="train a GPT on a corpus (default: the built-in King James Bible)",
        description="Train a GPT. With no arguments: the built-in corpus, a 4096-token BPE and the `cpu` "
        "preset, sized to finish in about 4 minutes on a 2-core CPU. The run is saved in "
        "runs/<name>, with runs/latest pointing at the newest.",
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if f.name == "model":
            for field_name, text, kind, choices in MODEL_OPTIONS:
                flag = FIELD_OPTIONS[field_name]
                if kind is bool:
                    groups["model"].add_argument(flag, action="store_true", help=text)
                else:
                    groups["model"].add_argument(flag, type=kind, choices=choices, help=text)
            continue
        flag = ("--no-" if meta["flag"] == "off" else "--") + f.name.replace("_", "-")
        text = meta["help"] + (f" (default {_shown_default(f.default)})" if meta["show_default"] else "")
        if meta["flag"] == "on":
            groups[meta["group"]].add_argument(flag, action="store_const", const=True, help=text)
        elif meta["flag"] == "off":
            groups[meta["group"]].add_argument(flag, action="store_true", help=text)
        else:
            groups[meta["group"]].add_argument(flag, type=_kind(f.type), choices=meta["choices"], help=text)
    groups["runtime"].add_argument("--nproc", type=int,
                                   help="launch this many processes with torchrun (DDP) on this machine")
    groups["run directory"].add_argument("--config", help="a YAML or JSON file of options; command-line options "
                                         "override it")
    groups["run directory"].add_argument("--print-config", action="store_true",
                                         help="print the resolved options (defaults, --config and the command line "
                                         "merged; a --resume's as the run would continue) as YAML that --config "
                                         "accepts, and exit without training")


def _kind(annotation: str) -> type:
    """The argparse type of a field annotated ``int``, ``Optional[float]``, …"""
    name = annotation if isinstance(annotation, str) else annotation.__name__
    return {"int": int, "float": float, "str": str}[name.removeprefix("Optional[").removesuffix("]")]


def _shown_default(value: object) -> str:
    """How a help text states a default: ``"And God said"`` quoted, ``0.003``, ``cpu``."""
    if isinstance(value, str) and (" " in value or "," in value or not value):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)
