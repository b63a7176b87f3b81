"""Tests of ``llmscratch serve`` (serve/): the OpenAI API served over HTTP, checked with OpenAI's own client.

A tiny GPT-2-shaped model with a tiny byte-level BPE is served on a free loopback port by a server
on a thread of the test process (one for the module; ``BackgroundServer``), or by the real
command in a subprocess where signals matter. Every answer is compared with something
independent of the server: the Engine decoding the same prompt alone (greedy, or with the same
seed), the batcher's own counts, curl's view of the bytes, lm-evaluation-harness's ``hf`` backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

from llmscratch.data.chat_template import chat_format  # noqa: E402
from llmscratch.data.tokenizer import GPT2Tokenizer  # noqa: E402
from llmscratch.inference.engine import Engine  # noqa: E402
from llmscratch.inference.generate import SamplingConfig  # noqa: E402
from llmscratch.serve.server import BackgroundServer, ServeOptions  # noqa: E402
from llmscratch.store.checkpoint import save_run  # noqa: E402
from tiny_files import varied_gpt, write_tiny_gpt2_files  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
CONTEXT = 256
WORDS = "the heaven and the earth and the light the theory of the thing".split()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run: a GPT-2-shaped model (context 256) with a 260-token GPT-2-style BPE."""
    tmp = tmp_path_factory.mktemp("serve")
    write_tiny_gpt2_files(tmp / "tok")
    tokenizer = GPT2Tokenizer.from_files(tmp / "tok" / "merges.txt", tmp / "tok" / "vocab.json")
    save_run(tmp / "run", varied_gpt(0, vocab_size=260, context_length=CONTEXT), tokenizer)
    return tmp / "run"


@pytest.fixture(scope="module")
def engine(run_dir) -> Engine:
    return Engine.load(run_dir, "cpu")


def start(engine: Engine, **options) -> BackgroundServer:
    server = BackgroundServer(engine, ServeOptions(port=0, device="cpu", **options), model_name="tiny")
    assert requests.get(server.url + "/health").json() == {"status": "ok"}  # waits until it answers
    return server


@pytest.fixture(scope="module")
def server(engine):
    server = start(engine, max_batch=16, max_body_bytes=64 * 1024)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(engine: Engine, prompt, max_tokens: int, **sampling) -> str:
    """What the Engine completes for one prompt (text or ids) on its own: the reference."""
    sampling.setdefault("temperature", 0.0)
    return engine.complete([prompt], SamplingConfig(max_new_tokens=max_tokens, **sampling))[0]


def prompt_of(i: int) -> str:
    """Client ``i``'s own prompt: different words and lengths (1 to 16 words)."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 16))


# --------------------------------------------------------------------------- the endpoints


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert requests.get(server.url + "/health").status_code == 200


def test_chat_greedy_is_the_engine_alone_and_counts_usage(engine, client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the heaven"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, n=2)
    prompt = chat_format(engine.tokenizer).prompt_ids(messages, add_generation_prompt=True)
    expected = alone(engine, prompt, 12)
    assert [c.message.content for c in r.choices] == [expected, expected]
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.role == "assistant"
    new_ids = engine.generate([prompt], SamplingConfig(max_new_tokens=12, temperature=0.0))[0]
    assert r.usage.prompt_tokens == len(prompt)  # the prompt once, as OpenAI counts it for n > 1
    assert r.usage.completion_tokens == 2 * len(new_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(new_ids) == 12 else "stop")


def test_completions_of_several_prompts_with_a_seed(engine, client):
    prompts = ["the earth", "and the light of the"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=1.0, seed=7, n=2)
    # choice k: prompt k // n, sampled with seed + k, as Engine.complete numbers its rows
    expected = engine.complete(prompts, SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7), samples=2)
    assert [c.text for c in r.choices] == expected
    again = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=1.0, seed=7, n=2)
    assert [c.text for c in again.choices] == expected  # the same seed, the same text
    ids = engine.encode(prompts)
    assert r.usage.prompt_tokens == sum(len(p) for p in ids)


def test_completions_take_token_ids(engine, client):
    ids = engine.encode(["the theory of"])[0]
    one = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    two = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=8, temperature=0)
    assert one.choices[0].text == two.choices[0].text == alone(engine, ids, 8)
    assert two.choices[1].text == alone(engine, ids[:2], 8)


def test_stop_string_cuts_the_text(engine, client):
    full = alone(engine, "the light", 24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = client.completions.create(model="tiny", prompt="the light", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streams_add_up_to_the_whole_answer(engine, client):
    messages = [{"role": "user", "content": "and the earth"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])

    pieces = list(client.completions.create(model="tiny", prompt="the thing", max_tokens=12, temperature=0,
                                            stream=True, n=2))
    for k in (0, 1):
        assert "".join(p.choices[0].text for p in pieces if p.choices[0].index == k) == alone(engine, "the thing", 12)


def test_curl_shows_the_sse_framing(server):
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "-i", server.url + "/v1/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, check=True)
    head, _, events = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert "content-type: text/event-stream" in head.lower()
    blocks = events.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"  # every event ends with a blank line
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block
        assert json.loads(block[len("data: "):])["object"] == "text_completion"


def test_echo_and_logprobs_are_the_models(engine, client):
    import torch

    ids = engine.encode(["the heaven and the earth"])[0]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(logp[t - 1, ids[t]].item(), abs=1e-4)
        assert max(lp.top_logprobs[t].values()) == pytest.approx(logp[t - 1].max().item(), abs=1e-4)
    assert r.choices[0].text == engine.tokenizer.decode(ids) and "".join(lp.tokens) == r.choices[0].text
    assert r.usage.completion_tokens == 0


# --------------------------------------------------------------------------- continuous batching


def test_sixteen_concurrent_clients_each_get_their_own_answer(engine, server, client):
    def ask(i: int) -> str:
        r = client.completions.create(model="tiny", prompt=prompt_of(i), max_tokens=20 + i, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [alone(engine, prompt_of(i), 20 + i) for i in range(16)]
    assert server.batcher.load == (0, 0)


def test_a_client_that_disconnects_mid_stream_frees_its_row(engine):
    server = start(engine, max_batch=1)  # one row: the next request runs only once the row is free
    submitted = []
    submit = server.batcher.submit
    server.batcher.submit = lambda *a, **k: submitted.append(submit(*a, **k)) or submitted[-1]
    try:
        body = {"model": "tiny", "prompt": "the", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
        with requests.post(server.url + "/v1/completions", json=body, stream=True) as r:
            next(r.iter_lines())  # the first event: the request is decoding
        # the connection is closed: the server cancels the request and frees its row for the next
        assert submitted[0].wait(60) and submitted[0].finish_reason == "cancelled"
        assert submitted[0].completion_tokens < CONTEXT - 10
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r2 = client.completions.create(model="tiny", prompt="the earth", max_tokens=10, temperature=0)
        assert r2.choices[0].text == alone(engine, "the earth", 10)
    finally:
        server.stop()


def test_one_failing_request_fails_alone(engine, server, client, monkeypatch):
    state = server.state
    sampling = state.sampling

    class Poisoned(SamplingConfig):
        def ends(self, token: int) -> bool:
            raise RuntimeError("poisoned sampling")

    def poisoned(body, max_new_tokens, offset):
        s = sampling(body, max_new_tokens, offset)
        return Poisoned(**{f: getattr(s, f) for f in s.__dataclass_fields__}) if body.seed == 666 else s

    monkeypatch.setattr(state, "sampling", poisoned)
    with ThreadPoolExecutor(3) as pool:
        bad = pool.submit(requests.post, server.url + "/v1/completions",
                          json={"model": "tiny", "prompt": "the", "max_tokens": 8, "seed": 666})
        good = [pool.submit(client.completions.create, model="tiny", prompt=prompt_of(i), max_tokens=8,
                            temperature=0) for i in (3, 4)]
        assert bad.result().status_code == 500
        assert "poisoned sampling" in bad.result().json()["error"]["message"]
        assert bad.result().json()["error"]["type"] == "server_error"
        assert [g.result().choices[0].text for g in good] == [alone(engine, prompt_of(i), 8) for i in (3, 4)]
    stream = requests.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 8,
                                                                 "seed": 666, "stream": True})
    events = [line for line in stream.text.split("\n\n") if line]
    assert "poisoned sampling" in json.loads(events[-2][len("data: "):])["error"]["message"]
    assert events[-1] == "data: [DONE]"


# --------------------------------------------------------------------------- bad input


ERRORS = [  # (endpoint, body, status, param)
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"model": "tiny"}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "the " * CONTEXT}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 9999]}, 400, "prompt"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
]


@pytest.mark.parametrize("endpoint,body,status,param", ERRORS)
def test_bad_requests_get_an_openai_error_naming_the_field(server, endpoint, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(f"{server.url}/v1/{endpoint}", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert param.split("[")[0].split(".")[0] in error["message"]
    assert requests.get(server.url + "/health").status_code == 200  # and it goes on serving


def test_an_oversized_body_is_refused(server):
    r = requests.post(server.url + "/v1/completions", json={"prompt": "x" * 100_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the server counts what it reads
        for _ in range(100):
            yield b" " * 1024

    r = requests.post(server.url + "/v1/completions", data=chunks())
    assert r.status_code == 413


def test_the_api_key_is_required_when_set(engine):
    server = start(engine, api_key="s3cret")
    try:
        r = requests.get(server.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="the", max_tokens=3, temperature=0).choices[0].text \
            == alone(engine, "the", 3)
    finally:
        server.stop()


def test_the_access_log_has_a_line_per_request(server, client):
    client.completions.create(model="tiny", prompt="the heaven", max_tokens=4, temperature=0)
    line = [x for x in server.lines if "POST /v1/completions 200" in x][-1]
    assert " prompt=" in line and " completion=" in line and line.endswith("s")


@pytest.mark.slow
def test_fastapi_is_imported_only_by_serve(run_dir):
    code = ("import sys; from llmscratch.cli.app import build_parser; build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_0(run_dir, engine):
    proc = subprocess.Popen([sys.executable, "-m", "llmscratch", "serve", str(run_dir), "--port", "0",
                             "--device", "cpu", "--grace", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        startup = proc.stdout.readline()
        assert "llmscratch serve: run" in startup and "/v1" in startup
        url = startup.split(" at ")[1].split("/v1")[0]
        assert requests.get(url + "/health").status_code == 200
        body = {"prompt": "the", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
        with requests.post(url + "/v1/completions", json=body, stream=True) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)  # while the stream is being written
            rest = list(lines)
        events = [x for x in [first, *rest] if x]
        assert events[-1] == b"data: [DONE]"
        text = "".join(json.loads(e[len(b"data: "):])["choices"][0]["text"] for e in events[:-1])
        assert text == alone(engine, "the", CONTEXT - 10)  # the whole answer, not cut by the signal
        assert proc.wait(60) == 0
        log = proc.stdout.read()
        assert "POST /v1/completions 200" in log and "llmscratch serve: stopped" in log
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- lm-evaluation-harness


TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_scores_through_the_server_as_its_hf_backend_does(tmp_path, run_dir, server, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm-eval's API models need it: pip install 'lm-eval[api]'")
    from lm_eval.tasks import TaskManager

    from llmscratch.store.convert import export_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    questions = [{"question": " ".join(WORDS[i:i + 3]), "choices": [" the", " heaven", " and earth", " light"],
                  "answer": i % 4} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    export_checkpoint(run_dir, tmp_path / "hf", "hf")

    def evaluate(model: str, args: dict) -> dict:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tiny_mc"], task_manager=tasks,
                                      log_samples=True, limit=None)
        scores = [float(r[0][0]) for s in out["samples"]["tiny_mc"] for r in s["resps"]]  # each choice's log p
        return {"acc": out["results"]["tiny_mc"]["acc,none"], "scores": scores}

    # the server's own tokenizer (its /tokenizer_info and /tokenize, as vLLM's): nothing downloaded
    ours = evaluate("local-completions", {"base_url": server.url + "/v1/completions", "model": "tiny",
                                          "tokenizer_backend": "remote", "max_length": CONTEXT, "num_concurrent": 4})
    hf = evaluate("hf", {"pretrained": str(tmp_path / "hf"), "device": "cpu", "dtype": "float32"})
    assert ours["acc"] == hf["acc"] and len(ours["scores"]) == 4 * len(questions)
    assert ours["scores"] == pytest.approx(hf["scores"], abs=1e-3)
