"""Instruction fine-tuning (training/instruct.py, training/finetune.py, `llmscratch finetune`),
checked against the book's own chapter 7 code (``llms_from_scratch.ch07``: ``format_input``,
``InstructionDataset``, ``custom_collate_fn``; ``ch05.calc_loss_batch`` on its ``GPTModel``).
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch

from tiny_files import write_tiny_gpt2_files

ch07 = pytest.importorskip("llms_from_scratch.ch07")
ch05 = pytest.importorskip("llms_from_scratch.ch05")
ch04 = pytest.importorskip("llms_from_scratch.ch04")

from llmscratch.cli.app import main  # noqa: E402
from llmscratch.data.tokenizer import GPT2Tokenizer, load_tokenizer  # noqa: E402
from llmscratch.nn.model import GPT, GPTConfig  # noqa: E402
from llmscratch.store.checkpoint import book_config_dict, load_model, ours_to_book, save_run  # noqa: E402
from llmscratch.training.finetune import FinetuneOptions, finetuned_from  # noqa: E402
from llmscratch.training.instruct import (  # noqa: E402
    IGNORE, InstructDataError, collate, encode_example, finetune_instruct, judge_file, prompt_format,
    read_examples, split_examples,
)

WORDS = ["cat", "dog", "sun", "tree", "blue", "fish", "rain", "star", "milk", "bird", "moon", "leaf"]


def alpaca_records(n: int = 36) -> list[dict]:
    """Short, learnable examples: half with an input (the book's ``### Input:`` section), half without."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        if i % 2:
            out.append({"instruction": "Repeat the word.", "input": w, "output": f"{w} {w}"})
        else:
            out.append({"instruction": f"Say {w}.", "input": "", "output": w})
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2tok")
    write_tiny_gpt2_files(d, names=("encoder.json", "vocab.bpe"))
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return GPT2Tokenizer.find(tok_dir)


def gpt2_shaped(vocab: int, seed: int = 0, context: int = 256) -> GPT:
    """A GPT-2-shaped model (learned positions, GELU, LayerNorm, untied head) the book's GPTModel can hold."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=context, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_weights=False)
    return GPT(cfg)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("base") / "base"
    save_run(d, gpt2_shaped(tokenizer.vocab_size), tokenizer)
    return d


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def encoded(tokenizer, records, tmp_path, context=256, template="alpaca"):
    examples = read_examples(write_json(tmp_path / "d.json", records))
    fmt = prompt_format(tokenizer, template)
    return [encode_example(e, fmt, context) for e in examples]


# --------------------------------------------------------------------------- batches against the book


def test_batches_equal_the_books_collate(tokenizer, tmp_path):
    records = alpaca_records(6)
    ours = encoded(tokenizer, records, tmp_path)
    book_items = ch07.InstructionDataset(records, tokenizer)  # format_input + "### Response:" + output
    eot = tokenizer.eot_id
    x, y = collate(ours, eot, mask_prompt=False)
    bx, by = ch07.custom_collate_fn([book_items[i] for i in range(len(records))], pad_token_id=eot)
    assert torch.equal(x, bx) and torch.equal(y, by)
    # the prompt is exactly the book's format_input with the response header
    for e, r in zip(ours, records):
        prompt = ch07.format_input(r) + "\n\n### Response:\n"
        assert e.ids[:e.prompt_len] == tokenizer.encode(prompt)


def test_mask_prompt_leaves_only_response_targets(tokenizer, tmp_path):
    records = alpaca_records(4)
    ours = encoded(tokenizer, records, tmp_path)
    _, y_all = collate(ours, tokenizer.eot_id, mask_prompt=False)
    _, y = collate(ours, tokenizer.eot_id, mask_prompt=True)
    for i, r in enumerate(records):
        n_prompt = len(tokenizer.encode(ch07.format_input(r) + "\n\n### Response:\n"))
        expected = y_all[i].clone()
        expected[:n_prompt - 1] = IGNORE  # the book's exercise 7.2, with the response header as prompt
        assert torch.equal(y[i], expected)
        learned = y[i][y[i] != IGNORE].tolist()
        assert learned == tokenizer.encode(r["output"]) + [tokenizer.eot_id]  # the answer and its end


def test_long_examples_are_cut_as_the_books_allowed_max_length(tokenizer, tmp_path):
    records = [{"instruction": "Say it.", "input": "", "output": "word " * 80}, *alpaca_records(2)]
    ours = encoded(tokenizer, records, tmp_path, context=200)
    assert [e.cut for e in ours] == [True, False, False]
    book_items = ch07.InstructionDataset(records, tokenizer)
    x, y = collate(ours, tokenizer.eot_id, mask_prompt=False)
    bx, by = ch07.custom_collate_fn([book_items[i] for i in range(3)], pad_token_id=tokenizer.eot_id,
                                    allowed_max_length=200)
    assert torch.equal(x, bx) and torch.equal(y, by)


def test_loss_equals_the_books_calc_loss_batch(tokenizer, tmp_path):
    records = alpaca_records(5)
    x, y = collate(encoded(tokenizer, records, tmp_path), tokenizer.eot_id, mask_prompt=True)
    model = gpt2_shaped(tokenizer.vocab_size, seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    book = ch04.GPTModel(book_config_dict(model.cfg)).eval()
    book.load_state_dict(ours_to_book(model, model.cfg), strict=True)
    with torch.no_grad():
        ours = model(x, y)
        theirs = ch05.calc_loss_batch(x, y, book, "cpu")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_split_is_the_books_85_10_5_and_seeded(tmp_path):
    examples = read_examples(write_json(tmp_path / "d.json", alpaca_records(100)))
    train, val, test = split_examples(examples, seed=1, val_fraction=0.05, test_fraction=0.1)
    assert (len(train), len(test), len(val)) == (85, 10, 5)
    again = split_examples(examples, seed=1, val_fraction=0.05, test_fraction=0.1)
    assert [e.where for e in again[0]] == [e.where for e in train]
    assert {e.where for e in train + val + test} == {e.where for e in examples}


def test_chat_jsonl_uses_the_models_template_shape(tokenizer, tmp_path):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say cat."},
                        {"role": "assistant", "content": "cat"}]}
    [e] = read_examples(write_jsonl(tmp_path / "c.jsonl", [rec]))
    enc = encode_example(e, prompt_format(tokenizer, "alpaca"), 256)
    assert tokenizer.decode(enc.ids[:enc.prompt_len]) == "Be brief.\n\n### Instruction:\nSay cat.\n\n### Response:\n"
    assert enc.ids[enc.prompt_len:] == tokenizer.encode("cat") + [tokenizer.eot_id]


# --------------------------------------------------------------------------- bad data


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "x", "input": ""}]', r"line 1: no \"output\" field"),
    ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "output": "  "}\n',
     r"line 2: the \"output\" \(the response\) is empty"),
    ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "output": \n', r"line 2: not a JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: the last message must be the assistant"),
    ('[\n{"instruction": "a", "output": "b"},\n 7\n]', r"line 3: a record must be a JSON object"),
    ('[{"instruction": "a", "output": "b"}', r"not closed"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InstructDataError, match=message) as err:
        read_examples(path)
    assert str(path) in str(err.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(InstructDataError, match=r"bad.jsonl, line 2: not valid UTF-8"):
        read_examples(path)


def test_an_instruction_longer_than_the_context_is_refused(tokenizer, tmp_path):
    records = [*alpaca_records(2), {"instruction": "long " * 50, "input": "", "output": "b"}]
    with pytest.raises(InstructDataError, match=r"d.json, line \d+: the prompt is \d+ tokens, longer than the "
                                                 r"model's context \(64\)"):
        encoded(tokenizer, records, tmp_path, context=64)


def test_the_command_reports_bad_data_in_one_line(base_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    code = main(["finetune", str(base_run), "--data", str(bad), "--out-dir", str(tmp_path / "runs"), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl, line 2: not a JSON object" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing left behind


# --------------------------------------------------------------------------- end to end


def finetune_opts(base_run, data, out, **kw) -> FinetuneOptions:
    defaults = dict(base=str(base_run), data=str(data), out_dir=str(out), steps=16, lr=3e-3, batch_size=4,
                    eval_every=8, log_every=4, progress=False, extra={"max_new_tokens": 8})
    return FinetuneOptions(**{**defaults, **kw})


@pytest.mark.slow
def test_finetune_lowers_the_response_loss_and_the_run_generates(base_run, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_records(40))
    logs: list[str] = []
    run_dir = finetune_instruct(finetune_opts(base_run, data, tmp_path / "runs", name="ft"), log=logs.append)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("before"))
    after = next(r for r in records if r.get("after"))
    assert after["test_response_loss"] < before["test_response_loss"] - 0.5
    assert after["val_response_loss"] < before["val_response_loss"] - 0.5
    assert finetuned_from(run_dir) == str(base_run.resolve())
    responses = [json.loads(line) for line in (run_dir / "test_responses.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and all({"instruction", "output", "model_response"} <= set(r) for r in responses)
    # a run like any other: load_model, the tokenizer, and `generate --chat` through the CLI
    assert load_model(run_dir).cfg == load_model(base_run).cfg
    assert load_tokenizer(run_dir).vocab_size == load_tokenizer(base_run).vocab_size
    assert main(["generate", str(run_dir), "--chat", "Say cat.", "--max-new-tokens", "4"]) == 0
    from llmscratch.store.describe import describe_run

    assert f"fine-tuned from {base_run.resolve()} (--task instruct, --train all)" in describe_run(run_dir)


@pytest.mark.slow
def test_resume_continues_exactly(base_run, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_records(24))
    whole = finetune_instruct(finetune_opts(base_run, data, tmp_path / "a", steps=8, checkpoint_every=4,
                                            extra={"max_new_tokens": 2, "test_limit": 1}), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):  # a stop at step 4 saves, as Ctrl-C does
        import signal
        import os

        def interrupt_at_4(message: str) -> None:
            if message.startswith("step 4:"):
                os.kill(os.getpid(), signal.SIGINT)

        finetune_instruct(finetune_opts(base_run, data, tmp_path / "b", steps=8, checkpoint_every=100, log_every=1,
                                        extra={"max_new_tokens": 2, "test_limit": 1}), log=interrupt_at_4)
    [half] = [p for p in (tmp_path / "b").iterdir() if p.is_dir() and not p.is_symlink()]
    assert json.loads((half / "finetune.json").read_text())["base"] == str(base_run.resolve())
    resumed = finetune_instruct(FinetuneOptions(resume=str(half), progress=False), log=lambda m: None,
                                given={"resume"})
    a, b = load_model(whole).state_dict(), load_model(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_refuses_a_change_of_what_it_learns(base_run, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_records(12))
    run = finetune_instruct(finetune_opts(base_run, data, tmp_path / "r", steps=1, extra={"max_new_tokens": 1,
                                                                                           "test_limit": 1}),
                            log=lambda m: None)
    from llmscratch.errors import ConfigError

    with pytest.raises(ConfigError, match="--lr"):
        finetune_instruct(FinetuneOptions(resume=str(run), lr=1.0, steps=3), given={"resume", "lr", "steps"})


# --------------------------------------------------------------------------- the judge


class FakeJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat completions endpoint that scores by the response's length."""

    prompts: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.prompts.append({"path": self.path, **body})
        prompt = body["messages"][0]["content"]
        score = "not a number" if "`skip`" in prompt else str(len(prompt) % 101)
        answer = {"choices": [{"message": {"role": "assistant", "content": score}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_sends_the_books_prompt_to_an_openai_endpoint(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        records = [{"instruction": "Say cat.", "input": "", "output": "cat", "model_response": "cat"},
                   {"instruction": "Repeat.", "input": "dog", "output": "dog dog", "model_response": "skip"}]
        path = write_jsonl(tmp_path / "test_responses.jsonl", records)
        FakeJudge.prompts.clear()
        result = judge_file(path, f"http://127.0.0.1:{server.server_port}/v1", "judge-x", log=lambda m: None)
    finally:
        server.shutdown()
        server.server_close()
    sent = FakeJudge.prompts
    assert [s["path"] for s in sent] == ["/v1/chat/completions"] * 2 and sent[0]["model"] == "judge-x"
    book_prompt = (f"Given the input `{ch07.format_input(records[0])}` and correct output `cat`, score the model "
                   "response `cat` on a scale from 0 to 100, where 100 is the best score. Respond with the integer "
                   "number only.")
    assert sent[0]["messages"][0]["content"] == book_prompt  # ch07.generate_model_scores' prompt
    scored = [json.loads(line) for line in path.read_text().splitlines()]
    assert scored[0]["judge_score"] == len(book_prompt) % 101 and scored[1]["judge_score"] is None
    assert result == {"judged": 1, "of": 2, "mean_score": float(len(book_prompt) % 101)}


def test_judge_unreachable_is_a_clear_error(tmp_path):
    from llmscratch.training.instruct import JudgeError

    path = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "a", "input": "", "output": "b", "model_response": "c"}])
    with pytest.raises(JudgeError, match="cannot reach it"):
        judge_file(path, "http://127.0.0.1:9/v1", "m")
    from llmscratch.errors import ConfigError

    with pytest.raises(ConfigError, match="not an http"):
        judge_file(path, "localhost:11434/v1", "m")


@pytest.mark.slow
def test_lora_run_saves_a_plain_model_and_resumes_exactly(base_run, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_records(16))
    kw = dict(steps=6, lr=1e-2, train="lora", lora_rank=4, lora_targets="qkv,mlp_out", checkpoint_every=100,
              eval_every=100, extra={"max_new_tokens": 2, "test_limit": 1})
    whole = finetune_instruct(finetune_opts(base_run, data, tmp_path / "a", **kw), log=lambda m: None)
    half = finetune_instruct(finetune_opts(base_run, data, tmp_path / "b", stop_at=3, **kw), log=lambda m: None)
    resumed = finetune_instruct(FinetuneOptions(resume=str(half), progress=False), log=lambda m: None,
                                given={"resume"})
    from llmscratch.nn.lora import has_lora, merge_lora

    models = [load_model(p) for p in (base_run, whole, resumed)]  # the base with the run's adapters on it
    assert [has_lora(m) for m in models] == [False, True, True] and (whole / "adapter.json").is_file()
    for m in models[1:]:
        merge_lora(m)
    base, a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = sorted(k for k in base if not torch.equal(base[k], a[k]))
    assert changed and all(k.endswith(("attn.qkv.weight", "ff.fc_out.weight")) for k in changed)
    assert json.loads((whole / "finetune.json").read_text())["lora"]["rank"] == 4


@pytest.mark.slow
def test_last_block_learns_only_the_last_block_and_final_norm(base_run, tmp_path, capsys):
    data = write_json(tmp_path / "data.json", alpaca_records(12))
    run = finetune_instruct(finetune_opts(base_run, data, tmp_path / "r", steps=2, train="last-block",
                                          extra={"max_new_tokens": 1, "test_limit": 1}), log=lambda m: None)
    base, tuned = load_model(base_run).state_dict(), load_model(run).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    last = f"blocks.{load_model(base_run).cfg.n_layers - 1}."
    assert changed and all(k.startswith((last, "final_norm.")) for k in changed)
    # `train --resume` on a fine-tuning run points at `finetune --resume`
    assert main(["train", "--resume", str(run)]) == 2
    assert f"llmscratch finetune --resume {run}" in capsys.readouterr().err


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_models_chat_template_is_what_transformers_renders(tmp_path):
    """``--template model``: the prompt is transformers' ``apply_chat_template`` with the generation prompt;
    the learned ids are the answer and its ``<|im_end|>`` (not the newline after it)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmscratch.data.pretrained_tokenizer import PretrainedTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(WORDS) + " Repeat the word. Say it."] * 10, trainer=trainer)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                               chat_template=CHATML)
    ref.save_pretrained(str(tmp_path / "tok"))
    tok = PretrainedTokenizer.from_hf_dir(tmp_path / "tok")
    records = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say cat."},
                             {"role": "assistant", "content": "cat cat"}]},
               {"instruction": "Repeat the word.", "input": "dog", "output": "dog dog"}]
    examples = read_examples(write_jsonl(tmp_path / "c.jsonl", records))
    fmt = prompt_format(tok, "auto")
    assert not fmt.is_default
    for example, messages in zip(examples, [records[0]["messages"],
                                            [{"role": "user", "content": "Repeat the word.\n\ndog"},
                                             {"role": "assistant", "content": "dog dog"}]]):
        enc = encode_example(example, fmt, 256)
        prompt = ref.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        assert enc.ids[:enc.prompt_len] == ref.encode(prompt, add_special_tokens=False)
        assert enc.ids[enc.prompt_len:] == ref.encode(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)


@pytest.mark.slow
def test_the_benchmark_script_runs_at_a_tiny_size(base_run, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    data = write_json(tmp_path / "data.json", alpaca_records(30))
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "finetune_instruct.py"), str(base_run), "--data", str(data),
         "--steps", "1", "--batch-size", "2", "--held-out", "2", "--max-new-tokens", "2", "--lora-rank", "2",
         "--lora-targets", "qkv", "--out", str(tmp_path / "bench")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| all |", "| lora |"))]
    assert len(rows) == 2 and "--- lora: five test responses ---" in result.stdout
