"""Running the server: a socket, uvicorn, the batcher's thread, an access log and a graceful stop.

``serve(run_dir, ServeOptions(...))`` loads the model once, starts the batcher, binds the socket
itself (so that ``port=0`` can name the port the system chose before the first request), prints
one line saying what is served where, and serves until SIGTERM or Ctrl-C. Then it stops
accepting connections, lets the requests in flight finish for up to ``grace_s`` seconds (those
still running after that are cancelled), stops the batcher and returns normally: the command
exits 0. A second Ctrl-C stops at once.

Each request leaves one access-log line on standard error when its last byte is sent:
``POST /v1/chat/completions 200 prompt=12 completion=30 tokens 0.84s`` (a stream's time
included).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..errors import ConfigError
from ..inference.engine import Engine
from .app import ServeConfig, create_app

log = logging.getLogger("llmscratch.serve")


@dataclass
class ServeOptions:
    """How ``llmscratch serve`` serves (each field is one of its options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    grace_s: float = 10.0
    max_batch: int = 16
    model_name: Optional[str] = None
    device: str = "auto"
    max_body_bytes: int = 8 * 2**20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0 (any free port) to 65535, got {self.port}")
        if self.grace_s < 0:
            raise ConfigError(f"--grace must be >= 0 seconds, got {self.grace_s}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty; leave it out to serve without a key")


class AccessLog:
    """ASGI middleware: one line per request, written when its response's last byte is sent."""

    def __init__(self, app: Any, write: Callable[[str], None]):
        self.app, self.write = app, write

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        state = scope.setdefault("state", {})

        async def logged_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._line(scope, status[0], state, time.perf_counter() - start)  # before the client can see the end
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except BaseException:
            if status[0] == 0:
                self._line(scope, 500, state, time.perf_counter() - start)
            raise

    def _line(self, scope: dict, status: int, state: dict, seconds: float) -> None:
        tokens = ""
        if "prompt_tokens" in state:
            tokens = f" prompt={state['prompt_tokens']} completion={state.get('completion_tokens', 0)} tokens"
        error = f" ({state['error']})" if state.get("error") else ""
        client = scope.get("client") or ("-", 0)
        self.write(f"{client[0]} {scope['method']} {scope['path']} {status}{tokens} {seconds:.2f}s{error}")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); a clear error if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port "
                          "(0 picks a free one) or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def build(engine: Engine, options: ServeOptions, model_name: str, write: Callable[[str], None]) -> tuple[Any, Any]:
    """``(asgi app, batcher)``: the app over a batcher that is started (the caller stops it)."""
    from ..inference.batcher import Batcher

    batcher = Batcher(engine, options.max_batch)
    batcher.start()
    app = create_app(engine, batcher, ServeConfig(model_name=model_name, api_key=options.api_key,
                                                  max_body_bytes=options.max_body_bytes))
    return AccessLog(app, write), batcher


class _Server:
    """uvicorn's server, with signals that end it gracefully and let the command exit 0 (uvicorn
    itself raises the signal again once it has stopped, which would end the process with 143)."""

    def __init__(self, config: Any):
        import uvicorn

        self.inner = uvicorn.Server(config)

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(signum: int, frame: Any) -> None:
            if self.inner.should_exit and signum == signal.SIGINT:
                self.inner.force_exit = True  # a second Ctrl-C: stop now
            self.inner.should_exit = True

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self, sock: socket.socket) -> None:
        self.inner.capture_signals = self.signals  # type: ignore[method-assign]
        self.inner.run(sockets=[sock])


class BackgroundServer:
    """A server on a thread of this process (a notebook, a test): ``url`` at once, :meth:`stop` to end it.

    ``BackgroundServer(engine, ServeOptions(port=0))`` serves an engine already loaded; the batcher,
    the app and uvicorn are the command's own. ``lines`` collects the access log.
    """

    def __init__(self, engine: Engine, options: ServeOptions, model_name: str = "model"):
        import uvicorn

        self.lines: list[str] = []
        self.sock = bind(options.host, options.port)
        self.app, self.batcher = build(engine, options, model_name, self.lines.append)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.options = options
        self._server = _Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=options.grace_s))
        self._thread = threading.Thread(target=self._server.run, args=(self.sock,), name="llmscratch-serve",
                                        daemon=True)
        self._thread.start()  # the socket already listens: a request made now waits until uvicorn accepts it

    @property
    def state(self) -> Any:
        """The app's endpoint state (``_Server``): its engine, batcher and config."""
        return self.app.app.state.server

    def stop(self) -> None:
        """Stop as SIGTERM does: no new connections, the requests in flight finish, the batcher stops."""
        self._server.inner.should_exit = True
        self._thread.join()
        self.batcher.stop(self.options.grace_s)
        self.sock.close()


def serve(run_dir: str | Path, options: ServeOptions, write: Callable[[str], None] = print,
          ready: Optional[Callable[[str], None]] = None) -> int:
    """Serve the run's model until SIGTERM or Ctrl-C; returns 0 after a graceful stop.

    ``write`` prints the startup line and the access log; ``ready`` (tests) gets the base URL once
    the socket listens.
    """
    import uvicorn

    sock = bind(options.host, options.port)
    engine = Engine.load(run_dir, options.device, rows=options.max_batch)
    name = options.model_name or Path(run_dir).resolve().name
    app, batcher = build(engine, options, name, write)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    cfg = engine.model.cfg
    write(f"llmscratch serve: {name} ({run_dir}, {cfg.n_layers} layers, context {cfg.context_length}, "
          f"on {engine.device}) at {url}/v1 — batch up to {options.max_batch}, "
          f"{'API key required' if options.api_key else 'no API key'}; Ctrl-C or SIGTERM stops "
          f"(grace {options.grace_s:g}s)")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=options.grace_s, timeout_keep_alive=5)
    server = _Server(config)
    try:
        if ready is not None:
            ready(url)
        server.run(sock)
    finally:
        batcher.stop(options.grace_s)
        sock.close()
    write("llmscratch serve: stopped")
    return 0
