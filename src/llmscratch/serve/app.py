"""The FastAPI application: OpenAI's chat and completions endpoints over an Engine and a Batcher.

Every generation goes through the :class:`~llmscratch.inference.batcher.Batcher`: a request's
rows (``n`` choices of each prompt) join the batch that is already decoding, and leave it as
soon as they end, or at once when the client goes away (a closed stream cancels its rows).
The HTTP side only turns bodies into token ids and :class:`SamplingConfig`, and events into
JSON or server-sent events; nothing here runs the model except the log-probabilities a
completion asks for (``logprobs``, ``echo``), which are one forward pass over its tokens.

Choice ``i`` of a request samples with ``seed + i`` (prompt by prompt, ``n`` choices each), as
``Engine.complete(prompts, samples=n)`` numbers its rows; with ``temperature: 0`` a choice is the
greedy completion, the same whatever else shares the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..data.chat_template import chat_format
from ..errors import LLMScratchError
from ..inference.batcher import BatcherClosed
from ..inference.engine import Engine
from ..inference.generate import SamplingConfig
from . import protocol
from .logprobs import completion_logprobs
from .protocol import APIError, Answer, ChatRequest, CompletionRequest, Usage, bad_request, sse

log = logging.getLogger("llmscratch.serve")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclasses.dataclass
class ServeConfig:
    """What the server decides besides the model: its name, the key it asks for, the body size it reads."""

    model_name: str
    api_key: Optional[str] = None
    max_body_bytes: int = 8 * 2**20


@dataclasses.dataclass
class Row:
    """One choice being generated: its prompt ids, what has come back so far, how it ended."""

    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None


def create_app(engine: Engine, batcher: Any, config: ServeConfig) -> FastAPI:
    """The application serving ``engine``'s model through ``batcher`` (started and stopped by the caller)."""
    app = FastAPI(title="llmscratch", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(engine, batcher, config)
    app.state.server = server  # the endpoints' state, for a test or a notebook to look at

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        request.state.error = err.message
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)
        request.state.error = f"{type(err).__name__}: {err}"
        return JSONResponse(APIError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                                     code="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = protocol.parse(ChatRequest, await server.read_body(request))
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = protocol.parse(CompletionRequest, await server.read_body(request))
        return await server.complete(body, request)

    _tokenizer_routes(app, server)
    if config.api_key:
        app.add_middleware(_RequireKey, key=config.api_key)
    return app


class _RequireKey:
    """ASGI middleware: ``/v1/`` requests need ``Authorization: Bearer KEY`` (401 otherwise); ``/health`` does not.
    (A plain ASGI class, not ``BaseHTTPMiddleware``, which would re-stream every response.)"""

    def __init__(self, app: Any, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected):
            err = APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY' with the "
                           "key the server was started with (--api-key)", code="invalid_api_key")
            scope.setdefault("state", {})["error"] = "no valid API key"
            return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


def _tokenizer_routes(app: FastAPI, server: "_Server") -> None:
    """vLLM's ``/tokenizer_info``, ``/tokenize`` and ``/detokenize``: with them lm-evaluation-harness's
    ``local-completions`` counts tokens with the server's own tokenizer, nothing to download."""
    tokenizer = server.engine.tokenizer

    def text_of(token_id: Optional[int]) -> Optional[str]:
        return None if token_id is None else tokenizer.decode([token_id])

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"eos_token": text_of(tokenizer.eot_id), "bos_token": text_of(tokenizer.bos_id), "pad_token": None,
                "chat_template": tokenizer.chat_template, "model_max_length": server.engine.context_length}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await server.json_object(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("prompt must be a string", "prompt")
        ids = tokenizer.prompt_ids(prompt) if body.get("add_special_tokens", True) else tokenizer.encode(prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        tokens = (await server.json_object(request)).get("tokens")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise bad_request("tokens must be a list of token ids", "tokens")
        return {"prompt": server.decode(tokens, "tokens")}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Server:
    """The endpoints' work, kept out of the route functions so each reads as one step."""

    def __init__(self, engine: Engine, batcher: Any, config: ServeConfig):
        self.engine, self.batcher, self.config = engine, batcher, config
        self.chat_format = chat_format(engine.tokenizer)
        self.created = int(time.time())

    # ---------------------------------------------------------------- requests in

    def model_card(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "llmscratch",
                "max_model_len": self.engine.context_length}

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.config.model_name:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves "
                           f"{self.config.model_name!r} (GET /v1/models lists it)", param="model",
                           code="model_not_found")

    async def read_body(self, request: Request) -> bytes:
        """The request's body, refused with 413 past ``max_body_bytes`` (read no further than that)."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_object(self, request: Request) -> dict[str, Any]:
        """A body that must be a JSON object (the tokenizer endpoints, which take a few loose fields)."""
        try:
            body = json.loads(await self.read_body(request))
        except ValueError as err:
            raise bad_request(f"the body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object", code="invalid_json")
        return body

    def decode(self, ids: Sequence[int], param: str) -> str:
        vocab = self.engine.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param)
        return self.engine.tokenizer.decode(list(ids))

    def encode(self, prompt: protocol.Prompt, param: str) -> list[int]:
        """A prompt's ids: text encoded as the engine encodes it; ids checked against the vocabulary."""
        if isinstance(prompt, str):
            try:
                return self.engine.encode([prompt])[0]
            except LLMScratchError as err:
                raise bad_request(f"{param}: {err}", param) from None
        self.decode(prompt, param)  # checks the ids
        return list(prompt) or self.engine.start_ids

    def budget(self, prompt_ids: list[int], asked: Optional[int], default: Optional[int], param: str) -> int:
        """How many new tokens a row may generate: ``asked`` (or ``default``), all within the context."""
        context, used = self.engine.context_length, len(prompt_ids)
        if used > context:
            raise bad_request(f"{param} is {used} tokens, longer than the model's context of {context} tokens; "
                              "shorten it", param, "context_length_exceeded")
        room = context - used
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise bad_request(f"max_tokens is {asked}, but the prompt takes {used} of the model's {context} tokens "
                              f"of context, which leaves {room}; ask for at most {room}", "max_tokens",
                              "context_length_exceeded")
        return asked

    def sampling(self, body: protocol._Sampling, max_new_tokens: int, seed_offset: int) -> SamplingConfig:
        """The :class:`SamplingConfig` of one choice (choice ``i`` samples with ``seed + i``)."""
        seed = None if body.seed is None else (body.seed + seed_offset + 2**63) % 2**64 - 2**63
        try:
            sampling = SamplingConfig(
                max_new_tokens=max_new_tokens, temperature=body.temperature,
                top_p=None if body.top_p >= 1.0 else body.top_p,
                top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                seed=seed, repetition_penalty=body.repetition_penalty, stop=body.stops())
        except LLMScratchError as err:  # a rule SamplingConfig holds that the body's types did not
            raise bad_request(str(err)) from None
        return sampling  # the batcher completes it with the tokenizer's end-of-text and stop ids

    # ---------------------------------------------------------------- generation

    def submit(self, rows: list[Row], samplings: list[SamplingConfig], ignore_eos: bool) -> list[Any]:
        """Each row joins the running batch; returns the batcher's requests, in order."""
        requests = []
        try:
            for row, sampling in zip(rows, samplings):
                requests.append(self.batcher.submit(row.prompt_ids, sampling, ignore_eos=ignore_eos))
        except BatcherClosed:
            for req in requests:
                req.cancel()
            raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")
        except BaseException:
            for req in requests:
                req.cancel()
            raise
        return requests

    async def events(self, requests: list[Any]) -> AsyncIterator[tuple[int, Any]]:
        """``(row, event)`` from every request as they come; cancels every unfinished request when the
        consumer stops early (a client that went away), so their rows leave the batch at once."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: Any) -> None:
            try:
                async for event in req.events():
                    await queue.put((i, event))
                await queue.put((i, None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which fails the request
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, req)) for i, req in enumerate(requests)]
        try:
            left = len(requests)
            while left:
                i, event = await queue.get()
                if event is None:
                    left -= 1
                    req = requests[i]
                    if getattr(req, "error", None):
                        raise RuntimeError(f"generation failed: {req.error}")
                elif isinstance(event, BaseException):
                    raise event
                else:
                    yield i, event
        finally:
            for req in requests:
                req.cancel()
            for task in tasks:
                task.cancel()

    async def run(self, request: Request, rows: list[Row], samplings: list[SamplingConfig], ignore_eos: bool) -> None:
        """Generate every row to its end (no stream), cancelling all if the client disconnects meanwhile."""
        requests = self.submit(rows, samplings, ignore_eos)
        watch = asyncio.create_task(_wait_disconnect(request))
        try:
            async with contextlib.aclosing(self.events(requests)) as events:
                async for i, event in events:
                    _apply(rows[i], event)
                    if watch.done():
                        break
        finally:
            watch.cancel()
        for row, req in zip(rows, requests):
            row.finish_reason = row.finish_reason or getattr(req, "finish_reason", None) or "length"

    # ---------------------------------------------------------------- endpoints

    async def chat(self, body: ChatRequest, request: Request):
        body.check()
        self.check_model(body.model)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in body.messages]
        try:
            prompt_ids = self.chat_format.prompt_ids(messages, add_generation_prompt=True)
        except LLMScratchError as err:
            raise bad_request(f"messages: {err}", "messages") from None
        budget = self.budget(prompt_ids, body.new_tokens, None, "messages")
        rows = [Row(prompt_ids) for _ in range(body.n)]
        samplings = [self.sampling(body, budget, i) for i in range(body.n)]
        answer = Answer(model=self.config.model_name, chat=True)
        request.state.prompt_tokens = len(prompt_ids)
        if body.stream:
            opening = [protocol.chat_delta(i, text="", role=True) for i in range(len(rows))]
            return _event_stream(self.stream(request, answer, rows, samplings, _chat_piece, opening, body))
        await self.run(request, rows, samplings, body.ignore_eos)
        usage = _usage(rows[:1], rows, request)
        return answer.full([protocol.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)], usage)

    async def complete(self, body: CompletionRequest, request: Request):
        body.check()
        self.check_model(body.model)
        prompts = body.prompts()
        many = len(prompts) > 1
        ids = [self.encode(p, f"prompt[{k}]" if many else "prompt") for k, p in enumerate(prompts)]
        budgets = [self.budget(p, body.max_tokens, DEFAULT_COMPLETION_TOKENS, f"prompt[{k}]" if many else "prompt")
                   for k, p in enumerate(ids)]
        rows = [Row(p) for p in ids for _ in range(body.n)]
        samplings = [self.sampling(body, budgets[k // body.n], k) for k in range(len(rows))]
        answer = Answer(model=self.config.model_name, chat=False)
        request.state.prompt_tokens = sum(len(p) for p in ids)
        if body.stream:
            opening = [protocol.text_choice(k, self._prompt_text(prompts[k // body.n], row), None)
                       for k, row in enumerate(rows)] if body.echo else []
            return _event_stream(self.stream(request, answer, rows, samplings, _text_piece, opening, body))
        live = [k for k, s in enumerate(samplings) if s.max_new_tokens > 0]
        if live:
            await self.run(request, [rows[k] for k in live], [samplings[k] for k in live], body.ignore_eos)
        for row in rows:
            row.finish_reason = row.finish_reason or "length"
        choices = []
        for k, row in enumerate(rows):
            prompt_text = self._prompt_text(prompts[k // body.n], row)
            logprobs = None
            if body.logprobs is not None:
                logprobs = await run_in_threadpool(completion_logprobs, self.engine, row.prompt_ids, row.token_ids,
                                                   body.logprobs, body.echo)
            choices.append(protocol.text_choice(k, (prompt_text if body.echo else "") + row.text,
                                                row.finish_reason, logprobs))
        return answer.full(choices, _usage(rows[::body.n], rows, request))

    def _prompt_text(self, prompt: protocol.Prompt, row: Row) -> str:
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(row.prompt_ids)

    async def stream(self, request: Request, answer: Answer, rows: list[Row], samplings: list[SamplingConfig],
                     choice: Callable[..., dict[str, Any]], opening: list[dict[str, Any]], body: Any) -> AsyncIterator[str]:
        """The server-sent events of a streamed request: the ``opening`` chunks' choices, one chunk per event
        that shows text or ends a row (``choice(row, text, finish_reason)``), the usage if asked, ``[DONE]``.
        A failure after the stream began cannot change its status: it is sent as an error event."""
        def chunk(choices: list[dict[str, Any]], usage: Optional[Usage] = None) -> str:
            return sse(answer.chunk(choices, usage, with_usage_field=with_usage))

        with_usage = body.include_usage
        requests = self.submit(rows, samplings, body.ignore_eos)
        for opened in opening:
            yield chunk([opened])
        try:
            async with contextlib.aclosing(self.events(requests)) as events:
                async for i, event in events:
                    _apply(rows[i], event)
                    if event.text or event.finish_reason:
                        yield chunk([choice(i, event.text or None, event.finish_reason)])
        except Exception as err:  # noqa: BLE001 - this request fails, the server goes on
            log.exception("a streamed request failed")
            request.state.error = f"{type(err).__name__}: {err}"
            yield sse(APIError(500, f"the server failed on this request: {type(err).__name__}: {err}",
                               code="internal_error").body())
            yield sse("[DONE]")
            return
        for i, row in enumerate(rows):
            if row.finish_reason is None:  # ended without saying how in an event
                row.finish_reason = "length"
                yield chunk([choice(i, None, row.finish_reason)])
        usage = _usage(rows[::body.n], rows, request)
        if with_usage:
            yield sse(answer.chunk([], usage, with_usage_field=True))
        yield sse("[DONE]")


def _chat_piece(i: int, text: Optional[str], finish_reason: Optional[str]) -> dict[str, Any]:
    return protocol.chat_delta(i, finish_reason, text)


def _text_piece(i: int, text: Optional[str], finish_reason: Optional[str]) -> dict[str, Any]:
    return protocol.text_choice(i, text or "", finish_reason)


def _apply(row: Row, event: Any) -> None:
    """Add one event (new text, new ids, perhaps the finish reason) to its row."""
    row.text += event.text or ""
    row.token_ids.extend(event.token_ids or ())
    if event.finish_reason:
        row.finish_reason = event.finish_reason


def _usage(prompts: list[Row], rows: list[Row], request: Request) -> Usage:
    """Each prompt counted once (as OpenAI counts a prompt with ``n`` choices); every choice's new tokens."""
    usage = Usage(prompt_tokens=sum(len(r.prompt_ids) for r in prompts),
                  completion_tokens=sum(len(r.token_ids) for r in rows))
    request.state.prompt_tokens = usage.prompt_tokens
    request.state.completion_tokens = usage.completion_tokens
    return usage


def _event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone away (its connection closed before the answer was sent)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size:,} bytes or more, past this server's limit of {limit:,} "
                    "bytes (--max-body-bytes); send fewer or shorter prompts per request", code="request_too_large")
