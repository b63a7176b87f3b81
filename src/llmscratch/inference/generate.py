"""Turning a GPT into text: sampling strategies and the decode loop.

Generation repeats one step: run the model, look at the logits of the last token,
pick the next token, append it. Two parts, kept apart:

* **Sampling** (:func:`sample_next`): logits ``(B, V)`` → token ids ``(B,)``. The repetition
  penalty comes first (on the raw logits, as in Hugging Face transformers). Greedy
  (temperature 0) takes the argmax; otherwise the logits are divided by the temperature,
  filtered (top-k, then top-p) and one token is drawn from the softmax with a seeded
  ``torch.Generator`` (never the global RNG), so a seed fixes the tokens. Every row of a
  batch draws from its own generator, row ``i`` seeded with ``seed + i``: a row samples the
  same tokens in a batch as alone with that seed (as ``llmscratch generate --num-samples``
  numbers its samples), not tokens that depend on which other prompts share the batch.
* **Decoding** (:func:`decode_steps`): the loop. With a KV cache the prompt is run once
  (prefill) and each step then runs only the newest token against the stored keys and
  values; without one, each step runs the whole window again. Both give the same tokens.

Batched prompts of different lengths are **left-padded**: every row's newest token sits in
the last column, so one step appends one column for all rows. A key-padding mask hides
the pad columns, and per-row position ids start each row's real tokens at 0, so a row
computes exactly what it computes alone.

**Past the context length — the window rule.** The *window* of a row is the tokens the
model sees for its next prediction (initially the prompt). When appending a token would
make a row's window longer than ``context_length``, the window is cut to its last
``max(1, context_length // 2)`` tokens and their positions restart at 0. The uncached path
simply runs the cut window; the cached path resets the cache and re-prefills the cut
windows of all rows (rows that were not cut get the same keys back). A prompt longer than
``context_length`` is cut by the same rule before the first step. The window therefore
never exceeds ``context_length``, which keeps learned positions in range and bounds the
cache, and both paths run the model on identical windows with identical positions.
Cutting to half (not sliding by one) makes the cached path re-prefill only once every
``context_length // 2`` tokens instead of at every step.

The eos token (``eos_id``) ends its row and is not returned, as in the book's ``generate``.

**Stop strings** end a row when its *text* contains one of them, and the text is cut just
before it, as the OpenAI API does. They are found in text, not tokens (a stop string may
span several tokens, or begin inside one), so they need the tokenizer's ``decode`` and come
out of the text functions, :func:`generate_text` and :func:`stream_text`; :class:`RowText`
holds back the end of the text that could still be the start of a stop string (and a
multi-byte character still missing bytes), so that streamed text never shows any of it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..nn.model import GPT, WEIGHT_LAYOUTS, KVCache, StaticKVCache, store_weight


def decodable_limit(tokenizer_vocab: int, model_vocab: int) -> Optional[int]:
    """The :class:`SamplingConfig` ``vocab_limit`` that keeps sampling to the ids a tokenizer of
    ``tokenizer_vocab`` ids can decode, on a model of ``model_vocab``; ``None`` where it decodes all."""
    return tokenizer_vocab if tokenizer_vocab < model_vocab else None


@dataclass
class SamplingConfig:
    """How to pick tokens and when to stop.

    Attributes:
        max_new_tokens: the most tokens to generate per row.
        temperature: 0 for greedy (argmax); otherwise logits are divided by it
            (<1 sharpens the distribution, >1 flattens it).
        top_k: keep only the k most likely tokens (``None``: all).
        top_p: nucleus sampling, keep the smallest set of most likely tokens whose
            probability mass reaches ``top_p`` (always at least one); ``None``: all.
        eos_id: the end-of-text token id; a row stops when it samples it.
        stop_ids: more ids that end a row as ``eos_id`` does (a chat model's end of turn, say
            ``<|im_end|>``, beside its end of text).
        seed: seeds the sampling; the same seed gives the same tokens. Row ``i`` of a batch
            draws with ``seed + i``, so it samples what its prompt samples alone with that seed.
        vocab_limit: draw only ids below this (``None``: all). For a model whose vocabulary
            is larger than its tokenizer's (padded, as nanoGPT's 50,304 against GPT-2's
            50,257): the ids the tokenizer cannot decode are never picked.
        repetition_penalty: as Hugging Face transformers defines it (from the CTRL paper): the
            logit of every id already in the row (prompt and generated so far) is divided by it
            if positive, multiplied by it if negative. 1.0 is off; above 1 discourages repeats.
        stop: strings that end a row when its text contains one; the text is cut before it.
            A single string counts as one stop string. Needs a ``decode`` (see :func:`generate_text`).
    """

    max_new_tokens: int = 50
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    eos_id: Optional[int] = None
    stop_ids: tuple[int, ...] = ()
    seed: Optional[int] = None
    vocab_limit: Optional[int] = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check every field. A message names the command-line option first and the field after
        it (``--top-k (top_k)``): the option is what a user of ``llmscratch generate`` typed."""
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        optional = lambda v, ok: v is None or ok(v)  # noqa: E731
        rules = (  # (the field's value is fine, the message when it is not)
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 0,
             "--max-new-tokens (max_new_tokens) must be an integer >= 0, got {max_new_tokens!r}"),
            (number(self.temperature) and self.temperature >= 0,
             "--temperature (temperature) must be a finite number >= 0 (0 = greedy), got {temperature!r}"),
            (optional(self.top_k, lambda k: _is_int(k) and k >= 1),
             "--top-k (top_k) must be an integer >= 1 (leave it out to keep every token), got {top_k!r}"),
            (optional(self.top_p, lambda p: number(p) and 0.0 < p <= 1.0),
             "--top-p (top_p) must be a number in (0, 1] (leave it out to keep every token), got {top_p!r}"),
            (optional(self.eos_id, lambda i: _is_int(i) and i >= 0),
             "SamplingConfig.eos_id must be None or a token id >= 0, got {eos_id!r}"),
            (isinstance(self.stop_ids, tuple) and all(_is_int(i) and i >= 0 for i in self.stop_ids),
             "SamplingConfig.stop_ids must be a tuple of token ids >= 0, got {stop_ids!r}"),
            (optional(self.vocab_limit, lambda n: _is_int(n) and n >= 1),
             "SamplingConfig.vocab_limit must be None or an integer >= 1, got {vocab_limit!r}"),
            (optional(self.seed, lambda n: _is_int(n) and -(2**63) <= n < 2**63),
             "--seed (seed) must be a 64-bit signed integer (row i uses seed + i), got {seed!r}"),
            (number(self.repetition_penalty) and self.repetition_penalty > 0,
             "--repetition-penalty (repetition_penalty) must be a finite number > 0 (1.0 = off, above 1 "
             "discourages repeats, e.g. 1.2), got {repetition_penalty!r}"),
        )
        for ok, message in rules:
            if not ok:
                raise ConfigError(message.format(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))
        self.stop = _check_stop(self.stop)

    def ends(self, token: int) -> bool:
        """Whether sampling ``token`` ends a row: it is ``eos_id`` or one of ``stop_ids`` (never part of the text)."""
        return token == self.eos_id or token in self.stop_ids


def _check_stop(stop: object) -> tuple[str, ...]:
    """The stop strings as a tuple (one string is one stop string); an empty one is refused."""
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (tuple, list)) or not all(isinstance(s, str) for s in strings):
        raise ConfigError(f"--stop (stop) must be strings, got {stop!r}")
    if "" in strings:
        raise ConfigError("--stop (stop) must not be empty, got '': every text contains the empty string, so no "
                          "row would produce anything; give the text to stop at (a newline in bash: --stop $'\\n')")
    return tuple(strings)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- sampling


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide the logits by a temperature > 0: below 1 sharpens, above 1 flattens.

    Each row's largest logit is taken off first (the softmax is the same), so that a tiny
    temperature gives -inf for the others, not an overflow to +inf and a NaN softmax. A
    temperature below the logits' smallest normal number counts as that number: in float32 it
    would round to 0, and the top logit would become 0 / 0.
    """
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make the ids a row already holds less likely: ``(B, V)`` → ``(B, V)``.

    Hugging Face transformers' ``RepetitionPenaltyLogitsProcessor`` (from the CTRL paper, Keskar
    et al. 2019): where ``seen`` (``(B, V)`` bool) is true, a logit below 0 is multiplied by
    ``penalty`` and any other is divided by it, so for ``penalty > 1`` both move towards less
    likely. Logits, not probabilities: the same id is penalised by how far its logit is from 0,
    not by how often it occurred (once is enough). ``penalty == 1`` changes nothing.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def token_presence(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """``(B, V)`` bool, true where id ``v`` occurs in row ``b``: the ``seen`` of the repetition penalty."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool)  # (B, V)
    for row, ids in enumerate(rows):
        seen[row, list(ids)] = True
    return seen.to(device)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. ``(B, V)`` → ``(B, V)``."""
    k = min(k, logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens with probability mass >= p.

    A token is kept when the mass of the tokens ranked above it is still below ``p``;
    the most likely token has nothing above it, so at least one token always survives.
    ``p >= 1`` keeps every token. The running mass is summed in float64: in float32 it
    reaches 1.0 before the tail of a 50,257-token distribution, which would drop thousands
    of tokens of positive probability even at ``p = 1``.
    """
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.double(), dim=-1)  # (B, V)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V) each
    mass_above = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (B, V), in sorted order
    drop_sorted = mass_above >= p  # (B, V)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V), vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: Optional[torch.Generator | Sequence[torch.Generator]] = None,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pick the next token of each row from the last position's logits ``(B, V)`` → ``(B,)``.

    ``generator``: one generator for the whole batch, or one per row (see
    :func:`make_generators`), so that each row's draws do not depend on the other rows.
    ``seen``: ``(B, V)`` bool, the ids already in each row (:func:`token_presence`), which
    ``cfg.repetition_penalty`` applies to; without it no id is penalised.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)  # first, on the raw logits
    if cfg.vocab_limit is not None:
        logits = logits[..., : cfg.vocab_limit]  # (B, V_limit): ids past it are never drawn
    if cfg.temperature == 0:
        return torch.argmax(logits, dim=-1)  # (B,)
    logits = apply_temperature(logits, cfg.temperature)
    if cfg.top_k is not None:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"sample_next got {len(generator)} generators for {probs.shape[0]} rows; pass one per row")
    rows = [torch.multinomial(probs[i : i + 1], num_samples=1, generator=g) for i, g in enumerate(generator)]
    return torch.cat(rows).squeeze(-1)  # B × (1, 1) → (B,)


def make_generator(seed: Optional[int], device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when ``None``)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # non-deterministic, and the global RNG is left untouched
    else:
        generator.manual_seed(seed)
    return generator


def make_generators(seed: Optional[int], rows: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per row, row ``i`` seeded with ``seed + i`` (``seed`` drawn fresh when ``None``).

    With one generator for the batch, a row's draws would depend on how many rows come
    before it; with its own, row ``i`` samples exactly what its prompt samples alone with
    ``seed + i`` (up to the rounding of batched matrix products).
    """
    if seed is None:
        seed = torch.Generator().seed() % 2**63  # non-deterministic; the global RNG is left untouched
    return [make_generator(seed + i, device) for i in range(rows)]


# --------------------------------------------------------------------------- windows and batches


def crop_window(window: list[int], context_length: int) -> list[int]:
    """The window rule: a window longer than ``context_length`` keeps its last half."""
    if len(window) <= context_length:
        return window
    return window[-max(1, context_length // 2):]


def left_pad(
    windows: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Stack rows of different lengths, aligned on the right.

    Returns ``idx (B, T)`` (pad id 0), ``positions (B, T)`` (each row's real tokens at
    ``0..len-1``, padding at 0) and ``key_padding_mask (B, T)`` (``True`` = real token),
    or ``None`` for the mask when no row is padded (so attention keeps its fast path).
    """
    width = max(len(w) for w in windows)
    idx = torch.zeros(len(windows), width, dtype=torch.long)  # (B, T)
    positions = torch.zeros(len(windows), width, dtype=torch.long)  # (B, T)
    real = torch.zeros(len(windows), width, dtype=torch.bool)  # (B, T)
    for row, window in enumerate(windows):
        n = len(window)
        idx[row, width - n:] = torch.tensor(window, dtype=torch.long)
        positions[row, width - n:] = torch.arange(n)
        real[row, width - n:] = True
    mask = None if bool(real.all()) else real.to(device)
    return idx.to(device), positions.to(device), mask


# --------------------------------------------------------------------------- text and stop strings


class RowText:
    """One row's new text as its tokens come: what is safe to show, cut before the first stop string.

    Each :meth:`push` decodes the row's tokens so far and releases the text that can no longer
    change or turn out to be part of a stop string. Two endings are held back: a multi-byte
    character still missing bytes (the decoder shows U+FFFD until they come), and the longest
    end of the text that is the start of a stop string (``"\\n\\n"`` held while the text ends in
    ``"\\n"``), which the next tokens may complete. Once a stop string appears, the text before
    it is released and nothing after; :meth:`finish` releases what was held when the row ends
    otherwise (eos, or the last token). The pieces released add up to :attr:`text`.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # every piece released so far
        self.stopped = False  # a stop string appeared: nothing more is released

    def push(self, token: int) -> str:
        """Add a generated token; returns the text it makes safe to show (often ``""``)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        return self._release(self.decode(self.tokens).rstrip("\ufffd"), hold=True)

    def finish(self) -> str:
        """The row has ended without a stop string so far: release the rest of its text."""
        return "" if self.stopped else self._release(self.decode(self.tokens), hold=False)

    def _release(self, text: str, hold: bool) -> str:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            end = min(found)  # the earliest stop string: the text ends before it
        else:
            end = len(text) - (self._could_start_a_stop(text) if hold else 0)
        piece = text[len(self.text):end]  # (empty if end falls before what is already shown)
        self.text += piece
        return piece

    def _could_start_a_stop(self, text: str) -> int:
        """The length of the longest end of ``text`` that a stop string begins with (0: none)."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


@dataclass
class Step:
    """One decode step: the tokens picked for every row and the logits they came from.

    Attributes:
        tokens: ``(B,)`` the sampled ids (rows that already finished still get one; ignore it).
        logits: ``(B, V)`` the last position's logits (before the repetition penalty) the
            tokens were sampled from.
        finished: per row, whether the row had already stopped before this step.
        text: with a ``decode``, per row the text this step makes safe to show (:class:`RowText`;
            ``""`` for a row that had finished); ``None`` without one.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    finished: list[bool]
    text: Optional[list[str]] = None


class _Decoder:
    """The per-row windows, the optional KV cache, and the two ways to get the next logits."""

    def __init__(self, model: GPT, prompts: list[list[int]], use_cache: bool, max_new_tokens: int):
        self.model = model
        self.ctx = model.cfg.context_length
        param = next(model.parameters())
        self.device = param.device
        self.windows = [crop_window(list(p), self.ctx) for p in prompts]
        self.cache: Optional[KVCache] = None
        if use_cache:
            # As long as this decode can fill it, not the whole context: the longest window and every
            # new token but the last (sampled, never fed back), at most the context (the window rule
            # keeps every window within it). SmolLM2's 8,192 positions at batch 8 would be 3 GB of
            # zeros written on every call, for 136 tokens used.
            longest = max(len(w) for w in self.windows) + max_new_tokens - 1
            self.cache = KVCache.for_model(
                model.cfg, len(prompts), min(self.ctx, longest), device=self.device, dtype=param.dtype
            )
        self.mask: Optional[torch.Tensor] = None  # (B, T_total) key padding of the cached keys

    def run_windows(self) -> torch.Tensor:
        """Run every row's whole window (uncached step, or cached prefill); last logits ``(B, V)``."""
        idx, positions, mask = left_pad(self.windows, self.device)  # (B, T) each
        if self.cache is not None:
            self.cache.reset()
            self.mask = mask
        logits = self.model(idx, positions=positions, key_padding_mask=mask, cache=self.cache)  # (B, T, V)
        return logits[:, -1]  # (B, V)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens (B,)`` to the windows (applying the window rule); next logits ``(B, V)``."""
        cut = False
        for row, token in enumerate(tokens.tolist()):
            window = self.windows[row] + [token]
            self.windows[row] = crop_window(window, self.ctx)
            cut = cut or len(self.windows[row]) < len(window)
        if self.cache is None or cut:
            return self.run_windows()
        # Only the new column runs (one token per row, at its next position); the model appends
        # its keys and values to the cache and attends over all of them.
        positions = torch.tensor([[len(w) - 1] for w in self.windows], device=self.device)  # (B, 1)
        if self.mask is not None:
            new_col = torch.ones(len(self.windows), 1, dtype=torch.bool, device=self.device)  # (B, 1)
            self.mask = torch.cat([self.mask, new_col], dim=1)  # (B, T_total)
        logits = self.model(
            tokens.unsqueeze(1),  # (B,) → (B, 1): one new token per row
            positions=positions, key_padding_mask=self.mask, cache=self.cache,
        )  # (B, 1, V)
        return logits[:, -1]  # (B, V)


def _check_prompts(model: GPT, prompts: list[list[int]]) -> None:
    if not prompts:
        raise ConfigError("generate needs at least one prompt, got an empty list")
    vocab = model.cfg.vocab_size
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ConfigError(f"prompt {row} is empty; give at least one token id (e.g. the eos id)")
        bad = [t for t in prompt if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(
                f"prompt {row} holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
            )


def decode_steps(
    model: GPT,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    use_cache: bool = True,
    decode: Optional[Callable[[list[int]], str]] = None,
) -> Iterator[Step]:
    """The decode loop, one :class:`Step` per generated position, for inspection and tests.

    Stops after ``max_new_tokens`` steps or once every row has ended: by sampling ``eos_id``
    or, given ``decode`` (a tokenizer's), when its text contains a stop string; ``decode`` also
    fills each step's ``text``. The repetition penalty counts the ids of the whole prompt
    (before any window cut) and of the tokens generated since. The model is put in eval mode
    while the iterator runs and its training mode restored when the iterator ends (or is
    closed). Each step's computation runs under ``torch.inference_mode``, which is not held
    across ``yield`` (it would leak into the caller's code).
    """
    _check_prompts(model, prompts)
    if sampling.stop and decode is None:
        raise ConfigError("stop strings (--stop) are found in the text: pass decode (the tokenizer's decode) "
                          "to decode_steps, or use generate_text or stream_text")
    was_training = model.training
    model.eval()
    try:
        if sampling.max_new_tokens == 0:
            return
        with torch.inference_mode():
            decoder = _Decoder(model, prompts, use_cache, sampling.max_new_tokens)
            generators = make_generators(sampling.seed, len(prompts), decoder.device)
            logits = decoder.run_windows()  # (B, V)
            if not bool(torch.isfinite(logits).all()):  # once, after the prompt: broken weights say so here
                raise ConfigError("the model's logits for the prompt are not finite (NaN or inf): its weights "
                                  "are damaged or diverged; check them (llmscratch eval) or use an earlier checkpoint")
            seen = (token_presence(prompts, logits.shape[-1], decoder.device)  # (B, V)
                    if sampling.repetition_penalty != 1.0 else None)
        texts = [RowText(decode, sampling.stop) for _ in prompts] if decode is not None else None
        finished = [False] * len(prompts)
        for i in range(sampling.max_new_tokens):
            with torch.inference_mode():
                tokens = sample_next(logits, sampling, generators, seen)  # (B,)
            last = i + 1 == sampling.max_new_tokens
            ended, text = _end_rows(tokens.tolist(), finished, sampling, texts, last)
            yield Step(tokens=tokens, logits=logits, finished=list(finished), text=text)
            finished = ended
            if all(finished) or last:
                return
            with torch.inference_mode():
                if seen is not None:
                    seen[torch.arange(len(prompts), device=seen.device), tokens] = True
                logits = decoder.advance(tokens)
    finally:
        model.train(was_training)


def _end_rows(
    tokens: list[int], finished: list[bool], sampling: SamplingConfig, texts: Optional[list[RowText]], last: bool
) -> tuple[list[bool], Optional[list[str]]]:
    """After one step's ``tokens``: which rows have ended (eos or a stop string), and with ``texts``
    the text each row releases (all of what it held back, where the row ends)."""
    ended = list(finished)
    released = None if texts is None else [""] * len(tokens)
    for row, token in enumerate(tokens):
        if finished[row]:
            continue
        if sampling.ends(token):  # eos or a stop id: ends the row; not part of its text
            ended[row] = True
        elif texts is not None:
            released[row] = texts[row].push(token)
            ended[row] = texts[row].stopped
        if texts is not None and (ended[row] or last):
            released[row] += texts[row].finish()
    return ended, released


def _tokens_only(sampling: SamplingConfig, use: str) -> None:
    if sampling.stop:
        raise ConfigError(f"stop strings (--stop) cut the text, which may end inside a token: use {use}(model, "
                          f"prompts, sampling, decode) with the tokenizer's decode, which returns text")


def generate(
    model: GPT,
    prompts: list[list[int]],
    sampling: Optional[SamplingConfig] = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generate a continuation of every prompt; returns only the new tokens of each row.

    Rows stop independently at ``eos_id`` (which is not returned); row ``i`` equals what its
    prompt generates alone with ``seed + i`` (``SamplingConfig.seed``; greedy rows need no seed).
    Stop strings are refused here: they cut text, see :func:`generate_text`.
    """
    sampling = sampling or SamplingConfig()
    _tokens_only(sampling, "generate_text")
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in decode_steps(model, prompts, sampling, use_cache):
        for row, token in enumerate(step.tokens.tolist()):
            if step.finished[row] or sampling.ends(token):
                continue
            outputs[row].append(token)
    return outputs


def generate_text(
    model: GPT,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    decode: Callable[[list[int]], str],
    use_cache: bool = True,
) -> list[str]:
    """Generate a continuation of every prompt; returns each row's new text, cut before its first
    stop string (``sampling.stop``). Rows end on their own, as in :func:`generate`."""
    outputs = [""] * len(prompts)
    for step in decode_steps(model, prompts, sampling, use_cache, decode):
        outputs = [text + piece for text, piece in zip(outputs, step.text)]
    return outputs


def stream(
    model: GPT, prompt: list[int], sampling: Optional[SamplingConfig] = None, use_cache: bool = True
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are generated (stops before ``eos_id``).

    Stop strings are refused here: they cut text, see :func:`stream_text`.
    """
    sampling = sampling or SamplingConfig()
    _tokens_only(sampling, "stream_text")
    for step in decode_steps(model, [prompt], sampling, use_cache):
        token = int(step.tokens[0])
        if sampling.ends(token):
            return
        yield token


def stream_text(
    model: GPT,
    prompt: list[int],
    sampling: SamplingConfig,
    decode: Callable[[list[int]], str],
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield the new text of one prompt as it becomes safe to show: never a character of a stop
    string, even one that spans several tokens (:class:`RowText` holds back what could begin one),
    never half a multi-byte character. The pieces add up to :func:`generate_text`'s text."""
    for step in decode_steps(model, [prompt], sampling, use_cache, decode):
        if step.text[0]:
            yield step.text[0]


# --------------------------------------------------------------------------- the fast path


def _seconds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` timed calls of each run, after one untimed call each.

    The runs take turns (A, B, C, A, B, C, …), so a load that passes on a shared machine
    slows them alike instead of one of them; and the fastest call is kept, since interference
    only adds time.
    """
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _available_memory() -> Optional[int]:
    """Bytes the OS could still give this process (Linux's MemAvailable); ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def choose_weight_layout(
    model: GPT, rows: int = 1, repeats: int = 3, budget_bytes: int = 256 << 20, margin: float = 0.05,
    pack: bool = True,
) -> dict[tuple[int, int], str]:
    """Make each shape of the model's weight matrices multiply ``rows`` rows as fast as this CPU can.

    A decode step multiplies one row per sequence by every weight matrix: products bound by
    reading the weights from memory, which a matrix library runs at very different speeds
    depending on the library, the CPU, the shape and how the matrix lies in memory. So it is
    measured here, not assumed: each shape is timed on the model's own weights (up to
    ``budget_bytes`` of them) three ways, taking turns:

    * ``"row"``: row-major, PyTorch's default, multiplied by MKL through ``F.linear``;
    * ``"column"``: the same values stored column-major (:func:`model.store_weight`), kept
      if at least ``margin`` faster than row-major;
    * ``"packed"``: a copy packed for oneDNN (:meth:`model.Linear.pack`), if ``pack``, kept
      if at least ``margin`` faster than the better of those two. It costs memory, as much
      again as the weights of that shape, so a shape is packed only while its copies need
      under half of the memory still available.

    On this project's 2-core x86 VM (MKL and oneDNN), gpt2-124m decoded 22.0 tokens/s at batch
    1 with the weights as built and 28.1 with most shapes column-major (packing was no
    faster); at batch 8, 69.6 as built, 73.4 laid out, 134.3 with every shape packed
    (docs/performance.md). Values, shapes and parameters never change, so the tokens are the
    same up to the rounding of the products; training is untouched (packed copies are used
    only without gradients, and go stale at the first update; ``model.unpack_weights()``
    frees them).

    For inference on the CPU (elsewhere the weights are left alone and ``{}`` returned).
    Returns the way chosen for each ``(out, in)`` shape.
    """
    first = next(model.parameters())
    if first.device.type != "cpu":
        return {}
    chosen: dict[tuple[int, int], str] = {}
    for shape, layers in model.linear_layers().items():
        weight = layers[0].weight
        per_matrix = weight.numel() * weight.element_size()
        timed = layers[: max(1, budget_bytes // per_matrix)]
        x = torch.randn(rows, shape[1], dtype=weight.dtype)  # (rows, in)
        for layer in layers:
            layer.unpack()
        # The timed weights in each way at once (copies, as the way needs), so the ways take turns.
        # "column": .t().contiguous().t() keeps the (out, in) shape but stores Wᵀ row by row.
        copies = {way: [(layer.weight.detach().t().contiguous().t() if way == "column" else
                         layer.weight.detach().contiguous(), layer.bias) for layer in timed]
                  for way in WEIGHT_LAYOUTS}
        runs = {way: (lambda pairs=pairs: [F.linear(x, w, b) for w, b in pairs])  # (rows, out) each
                for way, pairs in copies.items()}
        free = _available_memory()
        if pack and (free is None or 2 * per_matrix * len(layers) < free) and all(layer.pack(rows) for layer in timed):
            runs["packed"] = lambda: [layer(x) for layer in timed]  # Linear.forward: the packed product
        seconds = _seconds(runs, repeats)
        del copies, runs
        fastest = min(WEIGHT_LAYOUTS, key=seconds.__getitem__)
        way = fastest if seconds[fastest] < (1 - margin) * seconds["row"] else "row"
        if seconds.get("packed", math.inf) < (1 - margin) * seconds[way]:  # it costs memory: it must earn it
            way = "packed"
        for layer in layers:
            if way != "packed":
                layer.unpack()
            store_weight(layer.weight, "row" if way == "packed" else way)
        if way == "packed" and not all(layer.is_packed() or layer.pack(rows) for layer in layers):
            for layer in layers:  # could not pack them all: none are
                layer.unpack()
            way = "row"
        chosen[shape] = way
    return chosen


class StaticDecoder:
    """Fast decoding: a :class:`StaticKVCache` and a one-token step with fixed shapes.

    The prompt is run once (prefill, eager); then every step runs the newest token of every
    row at the position held in a device tensor, so no step asks the host for anything and
    every step has the same shapes. With ``compile=True`` that step is compiled with
    ``torch.compile(mode="reduce-overhead")``: on CUDA, one CUDA graph replays the whole
    step, so a small model at batch 1 is limited by memory bandwidth rather than by Python
    and kernel launches. Greedy output equals :func:`generate` with the KV cache token for
    token (up to the rounding of the compiled kernels).

    Limits of the fast path: prompts of equal length (no padding), no eos stop and no stop
    strings (every row gets ``max_new_tokens``), no ALiBi positions, and prompt + new tokens within ``max_len``
    (no window cut). So it equals :func:`generate` while prompt + new tokens fit the context
    length; a ``max_len`` past it (allowed for positions other than learned ones) lets the
    model attend further back than it was trained to, where :func:`generate` would cut the window.
    """

    def __init__(self, model: GPT, batch: int, max_len: Optional[int] = None, compile: bool = False):
        param = next(model.parameters())
        self.model = model
        self.batch = batch
        self.max_len = max_len or model.cfg.context_length
        if self.max_len > model.cfg.context_length and model.cfg.pos_emb == "learned":
            raise ValueError(f"max_len {self.max_len} is past the context length {model.cfg.context_length}")
        if model.cfg.pos_emb == "alibi":  # its bias is built per call from the cache's length
            raise ValueError("the static decoder does not support alibi positions; use generate() (a growing KV cache)")
        self.device = param.device
        self.cache = StaticKVCache.for_model(model.cfg, batch, self.max_len, device=self.device, dtype=param.dtype)
        self.compiled = compile
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True) if compile else self._step

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One decode step: ``token (B, 1)`` at ``position (1,)`` → logits of the next token ``(B, V)``."""
        return self.model(token, positions=position, cache=self.cache)[:, -1]  # (B, V)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``(B, T0)`` into the cache; logits of its last position ``(B, V)``."""
        positions = torch.arange(prompt.shape[1], device=self.device)  # (T0,)
        return self.model(prompt, positions=positions, cache=self.cache)[:, -1]  # (B, V)

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, sampling: SamplingConfig,
        on_first_token: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """New tokens ``(B, max_new_tokens)`` after ``prompt (B, T0)`` (token ids on any device).

        ``on_first_token`` is called once the first new token exists (for time to first token).
        """
        prompt = prompt.to(self.device)
        b, t0 = prompt.shape
        n = sampling.max_new_tokens
        if b != self.batch:
            raise ValueError(f"this decoder was built for batch {self.batch}, got {b} prompts")
        if t0 + n - 1 > self.max_len:  # the last new token is sampled, never fed back into the cache
            raise ValueError(f"prompt {t0} + {n} new tokens do not fit in a cache of {self.max_len}")
        if sampling.stop:
            raise ValueError("the static decoder does not stop on strings; use generate_text()")
        was_training = self.model.training
        self.model.eval()
        try:
            generators = make_generators(sampling.seed, b, self.device)
            out = torch.empty(b, n, dtype=torch.long, device=self.device)  # (B, N)
            if n == 0:
                return out
            logits = self.prefill(prompt)  # (B, V)
            seen = None  # (B, V) the ids each row holds, for the repetition penalty
            if sampling.repetition_penalty != 1.0:
                seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, prompt, True)
            out[:, 0] = sample_next(logits, sampling, generators, seen)
            if on_first_token is not None:
                on_first_token(out[:, 0])
            position = torch.full((1,), t0, dtype=torch.long, device=self.device)  # (1,) a device counter
            for i in range(1, n):
                if self.compiled:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
                logits = self.step(out[:, i - 1 : i].clone(), position)  # (B, V)
                if seen is not None:
                    seen.scatter_(1, out[:, i - 1 : i], True)
                out[:, i] = sample_next(logits, sampling, generators, seen)
                position += 1
            return out
        finally:
            self.model.train(was_training)
