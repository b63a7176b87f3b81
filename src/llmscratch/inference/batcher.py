"""Continuous batching: many requests decoded as one batch, each joining and leaving on its own.

A server that decodes one request at a time leaves most of a CPU's (or GPU's) matrix units idle:
a decode step multiplies one row by every weight matrix, and reading the weights costs about
the same for one row as for sixteen. So the :class:`Batcher` runs one decode loop on a
background thread and puts every running request into it as a row of one batch. A request that
arrives while others are decoding is prefilled (its prompt run through the model once) and
joins the batch at the next step; a request that ends (end-of-text, a stop string,
``max_new_tokens``, cancelled, failed) leaves at once, and the first request waiting in the
queue (first in, first out) takes its row. At most ``max_batch`` requests decode at once.

```
batcher = Batcher(Engine.load("runs/latest", rows=16), max_batch=16)
batcher.start()
request = batcher.submit(prompt_ids, SamplingConfig(max_new_tokens=64, temperature=0.8, seed=1))
for event in request:                          # a thread; ``async for event in request.events()`` in asyncio
    print(event.text, end="", flush=True)      # event.finish_reason is set on the last event
request.finish_reason, request.text, request.completion_tokens
batcher.stop(grace_s=5.0)
```

**What a request gets.** Each request keeps its own :class:`SamplingConfig` (temperature, top-k,
top-p, seed, repetition penalty, stop strings, stop ids, ``max_new_tokens``), completed by
``Engine.sampling_for`` as every Engine method does (the tokenizer's end-of-text id unless
``ignore_eos``, never an id the tokenizer cannot decode), and its own seeded generator: a
request samples the tokens it samples alone (``Engine.generate`` of that one prompt, with the
same seed), whichever requests share its batch, up to the rounding of batched matrix products.
Its text streams through ``generate.RowText``: never half a character, never any of a stop
string. An error inside one request (a sampling value that fails only when used, say) ends that
request with ``finish_reason == "error"`` and its message; the others go on.

**The interface.**

* :meth:`Batcher.submit` ``(prompt, sampling, *, ignore_eos=False, logprobs=None) -> Request``,
  from any thread. ``prompt``: token ids (or text, encoded by the engine's tokenizer; empty:
  ``Engine.start_ids``). Bad ids or text raise ``ConfigError``/``TokenizerError`` here, before
  anything is queued; a stopped batcher raises :class:`BatcherClosed`. ``logprobs=k``: every
  event also carries each new token's log-probability and the ``k`` most likely alternatives.
* :class:`Request`: iterate it (``for event in request``, blocking) or ``async for event in
  request.events()`` (asyncio, no busy waiting: the decode thread wakes the event loop). Each
  step gives one :class:`Event`: ``text`` (the new text safe to show, often ``""`` while a
  character or a possible stop string is held back), ``token_ids`` (the new token; ``[]`` for
  the end-of-text token, which is never part of the output), ``finish_reason`` (``None`` until
  the last event: ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``) and ``logprobs``.
  Leaving either iteration early (``break``, a cancelled task, a client gone) cancels the
  request. ``request.cancel()`` frees its row at the next step (or takes it off the queue).
  Once finished: ``token_ids``, ``text``, ``finish_reason``, ``error`` (the message, for
  ``"error"``), ``prompt_tokens``, ``completion_tokens``; ``done`` and ``wait()`` tell when.
* :meth:`Batcher.stop` ``(grace_s)``: refuse new requests, let the running and queued ones finish
  for up to ``grace_s`` seconds, cancel the rest, end the thread. :attr:`Batcher.load`:
  ``(running, queued)``. :meth:`Batcher.run_step`: one step on the calling thread, for tests and
  callers without threads (instead of :meth:`start`).
* :func:`prompt_logprobs` ``(engine, ids, top=0)``: the log-probability of every prompt token
  given the ones before it (the completions API's ``echo`` with ``logprobs``), one forward pass.

**The KV cache of the batch** (:class:`BatchKVCache`). One ``(L, B_max, H_kv, T_cap, d)`` buffer
for keys and one for values. Rows ``0 … n-1`` hold the ``n`` running requests; a shared column
counter ``length`` says where the next token of every row goes, so one decode step appends one
column for all rows, as ``generate.py``'s left-padded batches do. Row ``i`` holds its request's
window (the tokens the model sees, ``n_i`` of them) right-aligned, in columns
``[length - n_i, length)``; a key-padding mask hides the columns before it (left over from the
row's earlier occupants) and per-row position ids start each window at 0, so every row computes
what it computes alone. This is the left-padded batch of ``generate.py`` with rows that start at
different times::

    columns:   0   1   2   3   4   5   6   7   (length = 8; next token → column 8)
    row 0:     a0  a1  a2  a3  a4  a5  a6  a7   n=8, positions 0..7, next at position 8
    row 1:     ·   ·   ·   ·   ·   b0  b1  b2   n=3  (a 2-token prompt, prefilled at length 7)
    row 2:     ·   ·   c0  c1  c2  c3  c4  c5   n=6  (· = hidden by the mask)

A new request is prefilled on its own and its keys and values are copied into the next free row,
ending at column ``length`` (if its window is longer than ``length``, every row first moves right
to make room). On its own, not as one left-padded batch with the others that join at the same
step: prompts of mixed lengths would be padded to the longest, and a prefill's matrix products
are already many rows each.
A request that leaves gives its row to the last row (one row copied), so the running rows stay
``0 … n-1`` and a step runs the model on exactly ``n`` rows; if it was the longest, leaving many
columns before every row (at least 16, and a quarter of them), the rows move left to column 0. When ``length`` reaches the buffer's
end, the rows move left to column 0 (they all end at ``length``, so it is one slice copy), and
the buffer doubles if they fill more than half of it, up to the context length.

**Past the context length**, a request follows ``generate.py``'s window rule: when its next token
would make its window longer than ``context_length``, the window is cut to its last half and
the request is prefilled again, like a new request, from the cut window.

The model runs only on the decode thread, under ``torch.inference_mode``, in eval mode.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import torch

from ..errors import ConfigError, LLMScratchError
from ..nn.model import GPT, KVCache
from .engine import Engine, Prompt
from .generate import (
    RowText,
    SamplingConfig,
    _check_prompts,
    crop_window,
    make_generator,
    sample_next,
    token_presence,
)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class BatcherClosed(LLMScratchError):
    """A request submitted to a batcher that has been stopped."""


@dataclass
class TokenLogprob:
    """One token's log-probability under the model, and the most likely alternatives at its place.

    Attributes:
        token_id: the token.
        logprob: ``log p(token | the tokens before it)`` from the model's raw distribution (before
            temperature or any filter); ``None`` for a prompt's first token, which has no context.
        top: the ``top`` most likely tokens at that place as ``(token_id, logprob)``, most likely
            first (empty where none were asked for, or for a prompt's first token).
    """

    token_id: int
    logprob: Optional[float]
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What one decode step adds to a request.

    Attributes:
        text: new text, safe to show (no half character, nothing of a stop string); may be ``""``.
        token_ids: the new token (``[]`` when it is the end-of-text or a stop id, or for an event
            that only ends the request).
        finish_reason: ``None`` while the request runs; on its last event, one of
            ``"stop"`` (end-of-text, a stop id or a stop string), ``"length"`` (``max_new_tokens``),
            ``"cancelled"`` or ``"error"``.
        logprobs: with ``submit(..., logprobs=k)``, one :class:`TokenLogprob` per token of ``token_ids``.
    """

    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None


class Request:
    """One submitted prompt: its events as they come, and its result once finished.

    Made by :meth:`Batcher.submit`. Attributes, final once :attr:`done`: ``prompt_ids``,
    ``token_ids`` (the new tokens, without the end-of-text token), ``text`` (the new text, cut
    before a stop string), ``finish_reason``, ``error`` (the message where ``finish_reason`` is
    ``"error"``), ``prompt_tokens``, ``completion_tokens``.
    """

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig, text: RowText, logprobs: Optional[int],
                 on_cancel: Callable[[], None]) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.logprobs = logprobs
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self._on_cancel = on_cancel
        self._cancelled = False
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        # The decode thread's state of the request.
        self._row_text = text
        self._window: list[int] = []  # the tokens the model sees (its KV cache row holds them all)
        self._next: Optional[int] = None  # the token sampled last, not yet run through the model
        self._sampled = 0  # tokens sampled so far (the end-of-text token included)
        self._generator: Optional[torch.Generator] = None
        self._seen: Optional[torch.Tensor] = None  # (1, V) ids already in the row, for the repetition penalty

    @property
    def prompt_tokens(self) -> int:
        """How many tokens the prompt has."""
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """How many new tokens the request has produced (the end-of-text token not counted)."""
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        """Whether the request has finished (its last event is out)."""
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def cancel(self) -> None:
        """Stop the request: its row is freed at the next step (a queued request leaves the queue),
        and its last event has ``finish_reason == "cancelled"``. Nothing happens once it is done."""
        if not self._cancelled and not self.done:
            self._cancelled = True
            self._on_cancel()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the request is done (or ``timeout`` seconds pass); whether it is done."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def __iter__(self) -> Iterator[Event]:
        """The events, blocking until each comes; ends after the one with a ``finish_reason``.
        Leaving the loop early cancels the request."""
        seen, finished = 0, False
        try:
            while not finished:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._events) > seen)
                    new = self._events[seen:]
                seen += len(new)
                for event in new:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            if not finished:
                self.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The events for asyncio: awaits each (the decode thread wakes this event loop, nothing
        polls); ends after the one with a ``finish_reason``. Leaving early cancels the request."""
        wake = asyncio.Event()
        waker = (asyncio.get_running_loop(), wake)
        with self._cond:
            self._wakers.append(waker)
        seen, finished = 0, False
        try:
            while not finished:
                wake.clear()  # before looking: an event published after the look sets it again
                with self._cond:
                    new = self._events[seen:]
                if not new:
                    await wake.wait()
                    continue
                seen += len(new)
                for event in new:
                    finished = event.finish_reason is not None
                    yield event
        finally:
            with self._cond:
                self._wakers.remove(waker)
            if not finished:
                self.cancel()

    def _publish(self, event: Event) -> None:
        """Hand an event to the readers (decode thread); the last one also sets the result."""
        with self._cond:
            self.token_ids.extend(event.token_ids)
            self.text += event.text
            self._events.append(event)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, wake in wakers:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that event loop is closed: nobody is listening there
                pass

    def _finish(self, reason: str, error: Optional[str] = None) -> None:
        """End the request without a new token (cancelled, failed)."""
        if not self.done:
            self.error = error
            self._publish(Event(self._row_text.finish() if reason != "error" else "", [], reason))


class BatchKVCache(KVCache):
    """The keys and values of the running requests: row ``i`` for the ``i``-th, right-aligned.

    A :class:`KVCache` whose ``(L, B_max, H_kv, T_cap, d)`` buffers hold up to ``B_max`` rows; a
    forward pass on ``b`` rows reads and writes rows ``0 … b-1`` (the batch size of the keys it
    is given). ``length`` is the column the next token of every row goes to. The buffers grow
    (:meth:`relayout`) up to ``max_cap`` columns.
    """

    def __init__(self, model: GPT, rows: int, cap: int) -> None:
        param = next(model.parameters())
        cfg = model.cfg
        super().__init__(cfg.n_layers, rows, cfg.kv_heads, cap, cfg.head_dim, param.device, param.dtype)
        self.max_cap = cfg.context_length  # no window is longer than the context

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (b, H, T_new, d)`` in rows ``0 … b-1`` at column ``length``; return those rows' keys and values."""
        b = k.shape[0]
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"batch KV cache overflow: column {end} of {self.max_len} (the batcher makes room first)")
        self.k[layer, :b, :, start:end] = k
        self.v[layer, :b, :, start:end] = v
        return self.k[layer, :b, :, :end], self.v[layer, :b, :, :end]  # (b, H, T_total, d) each

    def relayout(self, rows: int, live: int, length: int, cap: int) -> None:
        """Move the last ``live`` columns of rows ``0 … rows-1`` to end at column ``length`` of a buffer
        of ``cap`` columns (a new one if ``cap`` differs); ``live <= length <= cap``."""
        src = slice(self.length - live, self.length)
        dst = slice(length - live, length)
        if cap != self.max_len:
            k = torch.zeros(*self.k.shape[:3], cap, self.k.shape[-1], dtype=self.k.dtype, device=self.k.device)
            v = torch.zeros_like(k)  # (L, B_max, H, cap, d) each
            k[:, :rows, :, dst], v[:, :rows, :, dst] = self.k[:, :rows, :, src], self.v[:, :rows, :, src]
            self.k, self.v, self.max_len = k, v, cap
        elif src != dst:  # the slices may overlap: copy through a clone
            self.k[:, :rows, :, dst] = self.k[:, :rows, :, src].clone()
            self.v[:, :rows, :, dst] = self.v[:, :rows, :, src].clone()
        self.length = length

    def put(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one window's ``k, v (L, H, n, d)`` in ``row``, ending at column ``length``."""
        n = k.shape[-2]
        self.k[:, row, :, self.length - n : self.length] = k
        self.v[:, row, :, self.length - n : self.length] = v

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy row ``src``'s last ``n`` columns to row ``dst`` (a leaving row's place taken by the last row)."""
        cols = slice(self.length - n, self.length)
        self.k[:, dst, :, cols] = self.k[:, src, :, cols]
        self.v[:, dst, :, cols] = self.v[:, src, :, cols]


class Batcher:
    """Decodes the submitted requests together, on a background thread, up to ``max_batch`` at a time.

    ``engine``: the model and tokenizer (its weights are used as they are; load it with
    ``Engine.load(..., rows=max_batch)`` to lay the CPU weights out for batches). Requests beyond
    ``max_batch`` wait in a first-in, first-out queue. See the module docstring for the interface.
    """

    def __init__(self, engine: Engine, max_batch: int = 16) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch (the most requests decoded at once) must be an integer >= 1, got {max_batch!r}")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self._cond = threading.Condition()  # guards the queue and the flags below
        self._queue: collections.deque[Request] = collections.deque()
        self._accepting = True
        self._closing = False  # the thread ends once nothing is left
        self._abort = False  # cancel everything at the next step
        self._busy = False  # the thread holds requests (running, or being admitted)
        self._thread: Optional[threading.Thread] = None
        # The decode thread's own state: row i of the cache holds self._rows[i].
        self._rows: list[Request] = []
        self._cache: Optional[BatchKVCache] = None

    # ----------------------------------------------------------------------- the caller's side

    def start(self) -> None:
        """Start the decode thread (once)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="llmscratch-batcher", daemon=True)
            self._thread.start()

    def submit(self, prompt: Prompt, sampling: SamplingConfig, *, ignore_eos: bool = False,
               logprobs: Optional[int] = None) -> Request:
        """Queue a prompt (token ids, or text for the engine's tokenizer); thread-safe.

        ``sampling`` is completed by ``Engine.sampling_for(sampling, ignore_eos)``. ``logprobs``:
        how many alternatives each event's :class:`TokenLogprob` lists (0: only the token's own).
        Raises ``ConfigError`` (ids outside the vocabulary, a bad ``logprobs``), ``TokenizerError``
        (text it cannot encode) or :class:`BatcherClosed` (after :meth:`stop`).
        """
        ids = self.engine.encode([prompt])[0]
        _check_prompts(self.model, [ids])
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ConfigError(f"logprobs (alternatives listed per token) must be an integer >= 0 or None, got {logprobs!r}")
        sampling = self.engine.sampling_for(sampling, ignore_eos)
        request = Request(list(ids), sampling, RowText(self.engine.tokenizer.decode, sampling.stop), logprobs,
                          self._wake)
        with self._cond:
            if not self._accepting:
                raise BatcherClosed("the server is shutting down and takes no new requests; try again later")
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def stop(self, grace_s: float = 10.0) -> None:
        """Take no new requests; let the running and queued ones finish for up to ``grace_s`` seconds,
        then cancel what is left and end the decode thread."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            if self._thread is None:  # never started: nothing runs them
                self._abort = True
                self._cancel_queued(everything=True)
                return
            self._cond.wait_for(lambda: not self._queue and not self._busy, timeout=max(0.0, grace_s))
            self._abort = self._closing = True
            self._cond.notify_all()
        self._thread.join()

    @property
    def load(self) -> tuple[int, int]:
        """``(running, queued)``: requests decoding now and requests waiting (a snapshot)."""
        with self._cond:
            return len(self._rows), len(self._queue)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ----------------------------------------------------------------------- the decode thread

    def _run(self) -> None:
        """The decode thread: wait for work, run steps, until stopped."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._rows or self._closing)
                if self._closing and not self._rows and not self._queue:
                    return
            self.run_step()

    def run_step(self) -> bool:
        """One step of the decode loop, now, on the calling thread; whether requests remain (running or queued).

        The decode thread (:meth:`start`) calls it in a loop; a test or a caller without threads
        may call it instead of starting the thread (never both).
        """
        if self.model.training:
            self.model.eval()
        joining: list[Request] = []
        try:
            with torch.inference_mode():
                with self._cond:
                    if self._abort:
                        self._cancel_queued(everything=True)
                        for request in self._rows:
                            request.cancel()
                    self._cancel_queued()
                for request in [r for r in self._rows if r.cancelled]:  # their rows are free for this very step
                    self._retire(request, "cancelled")
                with self._cond:
                    room = self.max_batch - len(self._rows)
                    joining = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
                    self._busy = bool(joining or self._rows)
                self._step(joining)
        except Exception as err:  # a bug or an out-of-memory: fail what was running, keep serving
            for request in self._rows + joining:
                request._finish("error", _message(err))
            self._rows, self._cache = [], None
        with self._cond:
            self._busy = bool(self._rows)
            self._cond.notify_all()
            return bool(self._rows or self._queue)

    def _cancel_queued(self, everything: bool = False) -> None:
        """Finish the queued requests that were cancelled (all of them with ``everything``); holds ``_cond``."""
        for request in [r for r in self._queue if everything or r.cancelled]:
            self._queue.remove(request)
            request._finish("cancelled")

    def _step(self, joining: list[Request]) -> None:
        """One step: every running row gets a token from one batched forward, every joining
        request (and every row whose window is cut) a first token from its prefill."""
        for request in list(self._rows):
            if len(request._window) + 1 > self.engine.context_length:  # the window rule: prefill again
                request._window = crop_window(request._window + [request._next], self.engine.context_length)
                self._remove(request)
                joining.append(request)
        fresh = []
        for request in joining:
            if request.cancelled:
                request._finish("cancelled")
            elif request.sampling.max_new_tokens == 0:
                request._publish(Event(request._row_text.finish(), [], "length"))
            else:
                fresh.append(request)
        if self._rows:
            self._decode()
        if fresh:
            self._prefill(fresh)

    def _decode(self) -> None:
        """Run every row's newest token through the model at once and sample each row's next."""
        rows, cache = self._rows, self._cache
        self._make_room()
        counts = torch.tensor([len(r._window) for r in rows], device=cache.k.device)  # (b,) tokens in each row
        tokens = torch.tensor([[r._next] for r in rows], device=cache.k.device)  # (b, 1)
        positions = counts.unsqueeze(1)  # (b, 1): each row's next position
        mask = None  # (b, length + 1) True where a column holds the row's own tokens
        if any(len(r._window) != cache.length for r in rows):
            columns = torch.arange(cache.length + 1, device=cache.k.device)  # (length + 1,)
            mask = columns.unsqueeze(0) >= (cache.length - counts).unsqueeze(1)  # (b, length + 1)
        logits = self.model(tokens, positions=positions, key_padding_mask=mask, cache=cache)[:, -1]  # (b, V)
        for request in rows:
            request._window.append(request._next)
        for row, request in enumerate(list(rows)):
            self._sample(request, logits[row : row + 1])

    def _prefill(self, requests: list[Request]) -> None:
        """Run each joining request's window through the model alone (the module docstring says
        why), sample its first token, and give it a row of the batch cache if it goes on."""
        param = next(self.model.parameters())
        for request in requests:
            if not request._window:  # new (a cut window is already set)
                request._window = list(crop_window(request.prompt_ids, self.engine.context_length))  # a copy: it grows
                request._generator = make_generator(request.sampling.seed, param.device)
                if request.sampling.repetition_penalty != 1.0:
                    request._seen = token_presence([request.prompt_ids], self.model.cfg.vocab_size, param.device)
            n = len(request._window)
            try:  # a prefill that fails (out of memory, say) fails its own request only
                cache = KVCache.for_model(self.model.cfg, 1, n, device=param.device, dtype=param.dtype)
                idx = torch.tensor([request._window], device=param.device)  # (1, n)
                logits = self.model(idx, cache=cache, last_only=True)[:, -1]  # (1, V)
            except Exception as err:
                request._finish("error", _message(err))
                continue
            if not bool(torch.isfinite(logits).all()):
                request._finish("error", "the model's logits for the prompt are not finite (NaN or inf): its weights "
                                         "are damaged or diverged")
            elif self._sample(request, logits):
                self._place(request, cache.k[:, 0], cache.v[:, 0])  # (L, H, n, d) each

    def _sample(self, request: Request, logits: torch.Tensor) -> bool:
        """Sample ``request``'s next token from ``logits (1, V)`` and publish it; whether it goes on.

        A request that ends here leaves its row; one whose sampling fails ends with ``"error"``.
        """
        try:
            token = int(sample_next(logits, request.sampling, [request._generator], request._seen)[0])
            event = self._event(request, token, logits)
        except Exception as err:
            self._retire(request, "error", _message(err))
            return False
        request._publish(event)
        if event.finish_reason is not None:
            self._retire(request, event.finish_reason)
            return False
        if request._seen is not None:
            request._seen[0, token] = True
        request._next = token
        return True

    def _event(self, request: Request, token: int, logits: torch.Tensor) -> Event:
        """The event for ``token``: its text, and whether it ends the request (as ``generate._end_rows``)."""
        sampling, text = request.sampling, request._row_text
        request._sampled += 1
        last = request._sampled == sampling.max_new_tokens
        logprobs = None
        if sampling.ends(token):  # the end-of-text token (or a stop id): not part of the output
            return Event(text.finish(), [], "stop", [] if request.logprobs is not None else None)
        piece = text.push(token)
        reason = "stop" if text.stopped else "length" if last else None
        if last and not text.stopped:
            piece += text.finish()
        if request.logprobs is not None:
            logprobs = [_token_logprob(torch.log_softmax(logits[0].float(), dim=-1), token, request.logprobs)]
        return Event(piece, [token], reason, logprobs)

    # ----------------------------------------------------------------------- rows of the batch cache

    def _place(self, request: Request, k: torch.Tensor, v: torch.Tensor) -> None:
        """Give ``request`` the next free row, its window's ``k, v (L, H, n, d)`` ending at ``length``."""
        n = k.shape[-2]
        if self._cache is None:
            self._cache = BatchKVCache(self.model, self.max_batch, _initial_cap(n, self.engine.context_length))
        cache = self._cache
        if n > cache.length:  # longer than every row: they move right to make room
            live = max((len(r._window) for r in self._rows), default=0)
            cache.relayout(len(self._rows), live, n, max(cache.max_len, min(cache.max_cap, 2 * n)))
        cache.put(len(self._rows), k, v)
        self._rows.append(request)

    def _make_room(self) -> None:
        """Make sure the cache has a free column for the next step: move the rows left to column 0
        when they reach its end, doubling it (up to the context) if they fill over half of it."""
        cache = self._cache
        if cache.length < cache.max_len:
            return
        live = max(len(r._window) for r in self._rows)
        cap = cache.max_len if 2 * (live + 1) <= cache.max_len else max(live + 1, min(cache.max_cap, 2 * cache.max_len))
        cache.relayout(len(self._rows), live, live, cap)

    def _remove(self, request: Request) -> None:
        """Take ``request`` off its row; the last row moves into it."""
        row, last = self._rows.index(request), len(self._rows) - 1
        if row != last:
            self._cache.move(last, row, len(self._rows[last]._window))
            self._rows[row] = self._rows[last]
        self._rows.pop()
        live = max((len(r._window) for r in self._rows), default=0)
        if self._cache.length - live >= max(16, self._cache.length // 4):
            # The longest row left: the others move left, so that no step reads the columns
            # before them (every step's attention reads all `length` columns of every row).
            self._cache.relayout(len(self._rows), live, live, self._cache.max_len)

    def _retire(self, request: Request, reason: str, error: Optional[str] = None) -> None:
        """End ``request`` (publishing its last event where it has none yet) and free its row."""
        request._finish(reason, error)
        if request in self._rows:
            self._remove(request)


def _initial_cap(n: int, context: int) -> int:
    """The batch cache's first width: room for the first window and some steps, a power of two."""
    return min(context, max(64, 1 << math.ceil(math.log2(2 * n))))


def _message(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry from one place's log-probabilities ``(V,)``, with the ``top`` most likely."""
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))  # (top,) each
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def prompt_logprobs(engine: Engine, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, in one forward pass.

    For the completions API's ``echo`` with ``logprobs``: entry ``i`` is ``log p(ids[i] | ids[:i])``
    under the model's raw distribution, with the ``top`` most likely tokens at place ``i``; the
    first token has no context, so its ``logprob`` is ``None``. A prompt longer than the context
    is refused (its first tokens would need another window). Safe to call while a
    :class:`Batcher` decodes on the same engine (no state of the model changes).
    """
    model = engine.model
    ids = list(ids)
    _check_prompts(model, [ids])
    if len(ids) > engine.context_length:
        raise ConfigError(f"the prompt has {len(ids)} tokens, more than the model's context of {engine.context_length}; "
                          f"its log-probabilities need one window: shorten it")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"top (alternatives listed per token) must be an integer >= 0, got {top!r}")
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            idx = torch.tensor([ids], device=engine.device)  # (1, T)
            logprobs = torch.log_softmax(model(idx)[0, :-1].float(), dim=-1)  # (T-1, V): place i predicts ids[i+1]
            entries = [TokenLogprob(ids[0], None)]
            entries += [_token_logprob(logprobs[i], ids[i + 1], top) for i in range(len(ids) - 1)]
    finally:
        if was_training:
            model.train()
    return entries
