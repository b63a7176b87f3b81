"""``llmscratch serve``: a run's model behind an OpenAI-compatible HTTP API (FastAPI and uvicorn, the
``serve`` extra; imported only here, so no other command needs them)."""

from __future__ import annotations

import argparse

from .commands import command


def _run_serve(args: argparse.Namespace) -> int:
    import logging

    from ..errors import ConfigError

    try:
        from ..serve.server import ServeOptions, serve
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise ConfigError(f"llmscratch serve needs {err.name}, which is not installed: "
                          "pip install 'llmscratch[serve]'") from None
    options = ServeOptions(host=args.host, port=args.port, api_key=args.api_key, grace_s=args.grace,
                           max_batch=args.max_batch, model_name=args.model_name, device=args.device,
                           max_body_bytes=args.max_body_bytes)
    logging.basicConfig(level=logging.WARNING, format="llmscratch serve: %(message)s")
    return serve(args.run_dir, options, write=lambda line: print(line, flush=True))


@command("serve")
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a run's model over HTTP with the OpenAI API (chat, completions, streaming)",
        description="Serve one model over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions "
        "(streamed as server-sent events with stream: true; log-probabilities with logprobs and echo), "
        "GET /v1/models and /health. Requests are decoded together in one continuously refilled batch. "
        "SIGTERM or Ctrl-C stops accepting, finishes the requests in flight (--grace) and exits 0. "
        "Needs the serve extra: pip install 'llmscratch[serve]'.")
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="the port (default 8000; 0 picks a free one, named in "
                   "the startup line)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require the header 'Authorization: Bearer KEY' on /v1/ requests (401 without it)")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long the requests in flight may take to finish (default 10)")
    p.add_argument("--max-batch", type=int, default=16, metavar="ROWS",
                   help="the most rows decoded together (each choice of each request is a row; more wait "
                   "for a free one; default 16)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the run directory's name)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, metavar="BYTES",
                   help="refuse request bodies larger than this with 413 (default 8 MiB)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
