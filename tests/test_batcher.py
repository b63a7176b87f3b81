"""Tests of inference/batcher.py: requests decoded together give what each gives alone.

The reference is always the library's own decode of one request alone (``Engine.generate`` /
``Engine.complete`` of that prompt with that seed), which shares no code with the batcher's
batch KV cache, its row bookkeeping or its joining and leaving. Most tests drive the loop by hand
(``run_step``) so that requests join at known steps; the threaded and asyncio paths are tested
on their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llmscratch.data.tokenizer import CharTokenizer
from llmscratch.errors import ConfigError
from llmscratch.inference.batcher import Batcher, BatcherClosed, BatchKVCache, prompt_logprobs
from llmscratch.inference.engine import Engine
from llmscratch.inference.generate import SamplingConfig
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.nn.positions import POSITION_KINDS
from tiny_files import varied_gpt

CORPUS = "the quick brown fox jumps over the lazy dog, and god said let there be light.\n"
# Of different lengths; the last is past the context of 32 (its window is cut to 16), and 24 new tokens
# take it (and the 12-token prompt) past the context again.
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7] * 12, [3, 1, 4, 1, 5, 9, 2, 6] * 5]
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.from_text(CORPUS)


def llama_model(vocab_size: int, seed: int = 0) -> GPT:
    """The tiny Llama-shaped preset (grouped-query attention, RoPE, RMSNorm, SwiGLU), weights of std 0.1."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("test-llama", vocab_size=vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def engine(request, chars) -> Engine:
    model = varied_gpt(0, vocab_size=chars.vocab_size) if request.param == "gpt2" else llama_model(chars.vocab_size)
    return Engine(model, chars)


def staggered(batcher: Batcher, prompts, configs, every: int = 3):
    """Submit the prompts one by one, ``every`` steps apart, while the others decode; run to the end."""
    requests = []
    for prompt, cfg in zip(prompts, configs):
        requests.append(batcher.submit(prompt, cfg))
        for _ in range(every):
            batcher.run_step()
    while batcher.run_step():
        pass
    return requests


# --------------------------------------------------------------------------- equal to decoding alone


def test_greedy_requests_joining_mid_decode_give_the_tokens_they_give_alone(engine):
    batcher = Batcher(engine, max_batch=4)
    requests = staggered(batcher, PROMPTS, [GREEDY] * len(PROMPTS))
    for request, prompt in zip(requests, PROMPTS):
        assert request.token_ids == engine.generate([prompt], GREEDY)[0]
        assert request.finish_reason == "length" and request.completion_tokens == 24
        assert request.prompt_tokens == len(prompt)
    assert len({tuple(r.token_ids) for r in requests}) == len(requests)  # the prompts matter


def test_requests_really_overlap_and_the_cache_is_freed(chars):
    engine = Engine(varied_gpt(0, vocab_size=chars.vocab_size), chars)
    batcher = Batcher(engine, max_batch=4)
    first = batcher.submit(PROMPTS[0], GREEDY)
    batcher.run_step()
    second = batcher.submit(PROMPTS[1], GREEDY)
    batcher.run_step()
    assert batcher.load == (2, 0) and not first.done and not second.done
    assert len(first._events) == 2 and len(second._events) == 1  # the second joined while the first ran
    while batcher.run_step():
        pass
    assert batcher.load == (0, 0) and batcher._cache.length == 0


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_every_position_kind_decodes_in_the_batch_as_alone(chars, pos_emb):
    engine = Engine(varied_gpt(1, vocab_size=chars.vocab_size, pos_emb=pos_emb), chars)
    prompts = PROMPTS[::2]
    requests = staggered(Batcher(engine, max_batch=2), prompts, [GREEDY] * len(prompts), every=2)
    assert [r.token_ids for r in requests] == [engine.generate([p], GREEDY)[0] for p in prompts]


def test_each_seeded_request_samples_what_it_samples_alone(engine):
    configs = [SamplingConfig(max_new_tokens=25, temperature=1.3, top_k=12 + i, top_p=0.9, seed=100 + i,
                              repetition_penalty=1.0 + 0.1 * (i % 2)) for i in range(len(PROMPTS))]
    requests = staggered(Batcher(engine, max_batch=3), PROMPTS, configs, every=2)
    for request, prompt, cfg in zip(requests, PROMPTS, configs):
        assert request.token_ids == engine.generate([prompt], cfg)[0]
    again = staggered(Batcher(engine, max_batch=5), PROMPTS[::-1], configs[::-1], every=1)
    assert [r.token_ids for r in again[::-1]] == [r.token_ids for r in requests]  # other neighbours, same tokens


def test_the_end_of_text_token_ends_a_request_and_is_not_returned(engine):
    free = engine.generate([PROMPTS[1]], GREEDY)[0]
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # the first new id after two tokens
    eos = free[cut]
    cfg = dataclasses.replace(GREEDY, eos_id=eos)
    requests = staggered(Batcher(engine, max_batch=2), PROMPTS[:3], [cfg] * 3, every=1)
    for request, prompt in zip(requests, PROMPTS):
        expected = engine.generate([prompt], cfg)[0]
        assert request.token_ids == expected and eos not in expected
        assert request.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert requests[1].token_ids == free[:cut] and requests[1].finish_reason == "stop"
    assert requests[1]._events[-1] == dataclasses.replace(requests[1]._events[-1], token_ids=[], finish_reason="stop")


def test_stop_strings_cut_the_text_as_alone_and_the_stream_never_shows_them(engine):
    base = SamplingConfig(max_new_tokens=30, temperature=1.5, top_k=20, seed=7)
    free = engine.complete([PROMPTS[1]], base)[0]
    stop = free[6:8]
    cfg = dataclasses.replace(base, stop=(stop, "@@"))
    requests = staggered(Batcher(engine, max_batch=4), PROMPTS, [cfg] * len(PROMPTS), every=2)
    for request, prompt in zip(requests, PROMPTS):
        expected = engine.complete([prompt], cfg)[0]
        assert request.text == expected and stop not in request.text
        shown = ""
        for event in request._events:
            shown += event.text
            assert expected.startswith(shown)  # never a character past the cut, not even for a while
        assert request.finish_reason == ("stop" if expected != engine.complete([prompt], base)[0] else "length")
    assert requests[1].text == free[:6] and requests[1].finish_reason == "stop"


def test_zero_new_tokens_finishes_at_once(engine):
    batcher = Batcher(engine)
    request = batcher.submit([1, 2], dataclasses.replace(GREEDY, max_new_tokens=0))
    batcher.run_step()
    assert request.done and request.finish_reason == "length" and request.token_ids == [] and request.text == ""


# --------------------------------------------------------------------------- slots, queue, cancel, errors


def test_requests_beyond_max_batch_wait_first_in_first_out(engine):
    batcher = Batcher(engine, max_batch=2)
    cfgs = [dataclasses.replace(GREEDY, max_new_tokens=n) for n in (3, 6, 4, 4)]
    requests = [batcher.submit(p, c) for p, c in zip(PROMPTS, cfgs)]
    started = []  # after each step, which requests have had an event
    while batcher.run_step():
        started.append([i for i, r in enumerate(requests) if r._events])
        assert batcher.load[0] <= 2
    assert started[0] == [0, 1]
    assert started[2] == [0, 1] and started[3] == [0, 1, 2]  # the first ends at step 3; the third takes its row
    assert started[5] == [0, 1, 2] and started[6] == [0, 1, 2, 3]  # the second ends at step 6, then the fourth
    for request, prompt, cfg in zip(requests, PROMPTS, cfgs):
        assert request.token_ids == engine.generate([prompt], cfg)[0]


def test_cancel_frees_the_slot_at_once_and_the_queued_request_runs(engine):
    batcher = Batcher(engine, max_batch=1)
    long = batcher.submit(PROMPTS[0], GREEDY)
    queued = batcher.submit(PROMPTS[1], GREEDY)
    for _ in range(3):
        batcher.run_step()
    assert batcher.load == (1, 1) and not queued._events
    long.cancel()
    batcher.run_step()
    assert long.finish_reason == "cancelled" and long.completion_tokens == 3
    assert long.token_ids == engine.generate([PROMPTS[0]], GREEDY)[0][:3]
    assert len(queued._events) == 1  # it joined at that very step
    while batcher.run_step():
        pass
    assert queued.token_ids == engine.generate([PROMPTS[1]], GREEDY)[0]
    waiting = batcher.submit(PROMPTS[2], GREEDY)
    blocker = batcher.submit(PROMPTS[0], GREEDY)
    batcher.run_step()
    blocker.cancel()  # a queued request cancelled leaves the queue
    waiting.cancel()
    batcher.run_step()
    assert blocker.finish_reason == waiting.finish_reason == "cancelled" and batcher.load == (0, 0)


def test_an_error_in_one_request_fails_it_alone(engine):
    bad = dataclasses.replace(GREEDY, temperature=1.0, seed=3)
    batcher = Batcher(engine, max_batch=4)
    good = [batcher.submit(p, GREEDY) for p in PROMPTS[:2]]
    batcher.run_step()
    failing = batcher.submit(PROMPTS[2], bad)
    failing.sampling.top_k = 0  # wrong only when used (the config was checked when it was made)
    batcher.run_step()
    late = batcher.submit(PROMPTS[3], GREEDY)
    while batcher.run_step():
        pass
    assert failing.finish_reason == "error" and failing.error and failing.token_ids == []
    assert failing._events[-1].finish_reason == "error"
    for request, prompt in zip(good + [late], PROMPTS[:2] + PROMPTS[3:4]):
        assert request.finish_reason == "length" and request.token_ids == engine.generate([prompt], GREEDY)[0]


def test_a_failing_prefill_fails_its_request_and_a_failing_step_those_running_then_serving_goes_on(engine, monkeypatch):
    forward = engine.model.forward
    broken = {"prefill": True, "step": False}

    def failing_forward(idx, *args, **kwargs):
        if broken["prefill"] and idx.shape[1] > 1 and 13 in idx[0].tolist():
            raise RuntimeError("out of memory (pretend)")
        if broken["step"] and idx.shape[1] == 1:
            raise RuntimeError("a kernel failed (pretend)")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", failing_forward)
    batcher = Batcher(engine, max_batch=4)
    others = [batcher.submit(p, GREEDY) for p in PROMPTS[:2]]
    batcher.run_step()
    failing = batcher.submit([13, 1, 2], GREEDY)
    while batcher.run_step():
        pass
    assert failing.finish_reason == "error" and failing.error == "out of memory (pretend)"
    assert [r.token_ids for r in others] == [engine.generate([p], GREEDY)[0] for p in PROMPTS[:2]]
    running = [batcher.submit(p, GREEDY) for p in PROMPTS[:2]]
    batcher.run_step()
    broken["step"] = True
    batcher.run_step()
    assert [r.finish_reason for r in running] == ["error", "error"] and "kernel failed" in running[0].error
    broken["step"] = False
    after = batcher.submit(PROMPTS[2], GREEDY)
    while batcher.run_step():
        pass
    assert after.token_ids == engine.generate([PROMPTS[2]], GREEDY)[0]


def test_bad_requests_are_refused_when_submitted(engine):
    batcher = Batcher(engine)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        batcher.submit([1, 10_000], GREEDY)
    with pytest.raises(ConfigError, match="logprobs"):
        batcher.submit([1], GREEDY, logprobs=-1)
    with pytest.raises(ConfigError, match="max_batch"):
        Batcher(engine, max_batch=0)
    assert batcher.load == (0, 0)


def test_text_prompts_and_empty_prompts_are_encoded_by_the_engine(engine):
    batcher = Batcher(engine)
    text = batcher.submit("god said", GREEDY)
    empty = batcher.submit([], GREEDY)
    while batcher.run_step():
        pass
    assert text.text == engine.complete(["god said"], GREEDY)[0]
    assert empty.prompt_ids == engine.start_ids and empty.text == engine.complete([""], GREEDY)[0]


# --------------------------------------------------------------------------- the cache's layout


def test_the_batch_cache_moves_rows_left_and_grows_without_changing_them(chars):
    model = varied_gpt(0, vocab_size=chars.vocab_size)
    cache = BatchKVCache(model, rows=3, cap=8)
    cache.length = 6
    cache.k.normal_()
    before = cache.k[:, :3, :, 2:6].clone()  # the last 4 columns of 3 rows
    cache.relayout(rows=3, live=4, length=4, cap=8)  # moved left (overlapping copy)
    assert torch.equal(cache.k[:, :3, :, 0:4], before) and cache.length == 4
    cache.relayout(rows=3, live=4, length=10, cap=16)  # moved right into a bigger buffer
    assert torch.equal(cache.k[:, :3, :, 6:10], before) and cache.k.shape[3] == 16 == cache.max_len


def test_when_the_longest_row_leaves_the_others_move_left_and_decode_on_unchanged(engine):
    batcher = Batcher(engine, max_batch=2)
    short = batcher.submit([4], GREEDY)
    long = batcher.submit(list(range(1, 29)), dataclasses.replace(GREEDY, max_new_tokens=2))
    batcher.run_step()
    batcher.run_step()
    assert long.done and batcher._cache.length == len(short._window) == 2  # not 29: the columns before it are gone
    while batcher.run_step():
        pass
    assert short.token_ids == engine.generate([[4]], GREEDY)[0]


# --------------------------------------------------------------------------- threads and asyncio


def test_the_thread_serves_concurrent_clients(engine):
    batcher = Batcher(engine, max_batch=3)
    batcher.start()
    configs = [SamplingConfig(max_new_tokens=20, temperature=0.8, seed=i) for i in range(len(PROMPTS))]
    results = [None] * len(PROMPTS)

    def client(i: int) -> None:
        request = batcher.submit(PROMPTS[i], configs[i])
        events = list(request)
        results[i] = ([t for e in events for t in e.token_ids], "".join(e.text for e in events), request)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.stop(grace_s=0)
    for (ids, text, request), prompt, cfg in zip(results, PROMPTS, configs):
        assert ids == request.token_ids == engine.generate([prompt], cfg)[0]
        assert text == request.text == engine.complete([prompt], cfg)[0]
    with pytest.raises(BatcherClosed):
        batcher.submit([1], GREEDY)


def test_asyncio_clients_get_their_events_and_leaving_early_cancels(engine):
    batcher = Batcher(engine, max_batch=2)
    batcher.start()
    long = dataclasses.replace(GREEDY, max_new_tokens=10_000)  # would run long past the context

    async def main():
        async def whole(prompt):
            request = batcher.submit(prompt, GREEDY)
            return [t async for event in request.events() for t in event.token_ids], request

        async def leave_early():
            request = batcher.submit(PROMPTS[0], long)
            async for event in request.events():
                if len(request._events) >= 3:
                    break
            return request

        return await asyncio.gather(whole(PROMPTS[1]), whole(PROMPTS[2]), leave_early(), whole(PROMPTS[3]))

    (ids1, r1), (ids2, r2), left, (ids3, r3) = asyncio.run(main())
    assert left.wait(timeout=60) and left.finish_reason == "cancelled"
    for ids, request, prompt in ((ids1, r1, PROMPTS[1]), (ids2, r2, PROMPTS[2]), (ids3, r3, PROMPTS[3])):
        assert ids == request.token_ids == engine.generate([prompt], GREEDY)[0]
    batcher.stop(grace_s=0)


def test_stop_lets_running_requests_finish_within_the_grace_then_cancels(engine):
    batcher = Batcher(engine, max_batch=1)
    short = batcher.submit(PROMPTS[0], dataclasses.replace(GREEDY, max_new_tokens=5))
    batcher.start()
    short.wait(timeout=60)
    endless = batcher.submit(PROMPTS[1], dataclasses.replace(GREEDY, max_new_tokens=1_000_000))
    queued = batcher.submit(PROMPTS[2], GREEDY)
    next(iter(endless))  # it runs
    batcher.stop(grace_s=0.0)
    assert short.finish_reason == "length"
    assert endless.finish_reason == "cancelled" and queued.finish_reason == "cancelled"
    assert not batcher._thread.is_alive()


def test_stopping_a_batcher_that_never_started_cancels_what_was_queued(engine):
    batcher = Batcher(engine)
    queued = batcher.submit(PROMPTS[0], GREEDY)
    batcher.stop(grace_s=0)
    assert queued.finish_reason == "cancelled" and [e.finish_reason for e in queued] == ["cancelled"]
    with pytest.raises(BatcherClosed):
        batcher.submit(PROMPTS[0], GREEDY)


# --------------------------------------------------------------------------- log-probabilities


def test_prompt_logprobs_are_the_model_s_log_softmax(engine):
    ids = PROMPTS[1]
    entries = prompt_logprobs(engine, ids, top=3)
    with torch.no_grad():
        logprobs = torch.log_softmax(engine.model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    assert entries[0].token_id == ids[0] and entries[0].logprob is None and entries[0].top == []
    for i, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == ids[i]
        assert entry.logprob == pytest.approx(float(logprobs[i - 1, ids[i]]), abs=1e-5)
        best = torch.topk(logprobs[i - 1], 3)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match="context"):
        prompt_logprobs(engine, [1] * 33)


def test_generated_logprobs_are_those_of_the_prompt_and_completion_read_at_once(engine):
    batcher = Batcher(engine, max_batch=2)
    other = batcher.submit(PROMPTS[3], GREEDY)
    batcher.run_step()
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)
    request = batcher.submit(PROMPTS[1], cfg, logprobs=2)
    while batcher.run_step():
        pass
    assert other.done
    whole = prompt_logprobs(engine, PROMPTS[1] + request.token_ids, top=2)[len(PROMPTS[1]):]
    got = [lp for event in request._events for lp in event.logprobs]
    assert [e.token_id for e in got] == request.token_ids == [e.token_id for e in whole]
    for mine, reference in zip(got, whole):
        assert mine.logprob == pytest.approx(reference.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in reference.top]


def test_the_model_s_last_only_logits_are_the_last_column_of_all(chars):
    model = varied_gpt(0, vocab_size=chars.vocab_size)
    idx = torch.tensor([PROMPTS[1], PROMPTS[0] * 2 + [1]])  # (2, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:])


@pytest.mark.slow
def test_the_speed_benchmark_runs_at_a_tiny_size():
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "benchmarks/batcher_speed.py", "--preset", "test", "--rounds", "1", "--requests", "1",
         "--new-tokens", "4", "--prompt-lengths", "3,5", "--clients", "1,2", "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=root, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert result.returncode == 0, result.stderr
    assert "2 clients / 1: median of per-round ratios" in result.stdout
