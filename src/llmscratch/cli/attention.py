"""``llmscratch attention``: attention maps of a run on a prompt."""

from __future__ import annotations

import argparse

from .commands import command


def _run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.tokenizer import check_utf8
    from ..inference.engine import Engine, prompt_label
    from ..tools.inspect import attention_maps, write_attention_outputs

    check_utf8(args.prompt, "--prompt")
    engine = Engine.load(args.run_dir, args.device, use_cache=False, purpose="the prompt to draw")
    maps = attention_maps(engine.model, engine.tokenizer, args.prompt, name=f"--prompt {prompt_label(args.prompt)}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "attention"
    written = write_attention_outputs(maps, out, layers=args.layer, heads=args.head, html_page=args.html,
                                      json_file=args.json, title=f"Attention of {args.run_dir} on {args.prompt!r}")
    print(f"{len(maps.tokens)} tokens, {maps.n_layers} layers × {maps.n_heads} heads; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


@command("attention")
def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw what a trained or imported model attends to, for one prompt",
        description="Run a model on a prompt and write its attention weights: grid.png (layers × heads, "
        "token labels on both axes), one PNG per chosen --layer/--head, and on request a self-contained "
        "HTML page (--html) and bertviz head_view JSON (--json).",
    )
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    p.add_argument("--prompt", required=True, help="the text whose attention to show (at most the model's context)")
    p.add_argument("--out", default=None, help="folder for the outputs (default RUN_DIR/attention)")
    p.add_argument("--layer", type=int, nargs="+", default=None,
                   help="layer(s) to draw one large PNG per head for (with --head: only those heads)")
    p.add_argument("--head", type=int, nargs="+", default=None,
                   help="head(s) to draw one large PNG each for (with --layer: in those layers; else in every layer)")
    p.add_argument("--html", action="store_true",
                   help="also write attention.html, opening on the first --layer and --head given: pick a layer "
                   "and head, hover or click a token (or use the keyboard); works offline from disk")
    p.add_argument("--json", action="store_true",
                   help='also write attention.json: {"tokens", "attention": per layer (1, heads, T, T)}, bertviz\'s layout')
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
