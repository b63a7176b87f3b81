"""``llmscratch chat``: a conversation with a run's model in the terminal, answers streamed.

The conversation itself (its messages, what fits the context, its JSON file) is
``inference.chat``'s; this module reads lines, runs the slash commands and prints.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from .commands import command
from .sampling import add_sampling_options, sampling_config

if TYPE_CHECKING:
    from ..inference.chat import Chat

COMMANDS_HELP = """\
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt (/system alone removes it)
/save FILE     write the conversation to FILE: JSON, a list of OpenAI-style messages
/help          this list
/exit          leave (Ctrl-D leaves too)
Ctrl-C stops an answer: what it wrote so far stays in the conversation, marked interrupted.
Ctrl-C twice at the prompt leaves. A message that starts with / : begin it with a space."""
LEAVE_HINT = "(to leave, press Ctrl-C again, Ctrl-D, or type /exit)"


class Repl:
    """Read a line, answer it or run its command, until the user leaves.

    ``interactive``: standard input is a terminal, so there is a prompt to show and a line
    editor (readline, where Python has it: arrows, history) behind it.
    """

    def __init__(self, chat: "Chat", out: TextIO, err: TextIO, interactive: bool):
        self.chat, self.out, self.err, self.interactive = chat, out, err, interactive
        self.told_dropped = False  # the notice that old exchanges are being dropped is given once

    def run(self) -> int:
        """The loop; 0 when the user leaves (``/exit``, Ctrl-D, or Ctrl-C twice at the prompt)."""
        armed = False  # the last thing the user did was Ctrl-C at the prompt
        while True:
            try:
                line = input(">>> " if self.interactive else "")
            except EOFError:  # Ctrl-D, or the end of piped input
                if self.interactive:
                    self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                if armed:  # (readline has already dropped whatever was typed on the line)
                    self.out.write("\n")
                    return 0
                self.out.write(f"\n{LEAVE_HINT}\n")
                armed = True
                continue
            armed = False
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                elif line.strip():
                    self.answer(line.strip())
            except KeyboardInterrupt:  # during a command: back to the prompt (an answer handles its own)
                self.out.write("\n")

    def command(self, line: str) -> bool:
        """Run a slash command; False when it is ``/exit``."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        conversation = self.chat.conversation
        if name in ("/exit", "/quit") and not rest:
            return False
        if name == "/help" and not rest:
            self.say(COMMANDS_HELP)
        elif name == "/reset" and not rest:
            conversation.reset()
            self.told_dropped = False
            self.say("(the conversation is forgotten; the system prompt stays)")
        elif name == "/system":
            conversation.system = rest or None
            self.say("(system prompt set)" if rest else "(system prompt removed)")
        elif name == "/save" and rest:
            self.save(rest)
        elif name in ("/exit", "/quit", "/help", "/reset"):
            self.error(f"{name} takes nothing after it")
        elif name == "/save":
            self.error("/save needs a file name: /save FILE")
        else:
            self.error(f"unknown command {name}; /help lists the commands (a message that starts with / : "
                       "begin it with a space)")
        return True

    def save(self, path: str) -> None:
        """``/save FILE``: the whole conversation as JSON (a folder that does not exist is an error)."""
        from pathlib import Path

        from ..errors import LLMScratchError

        conversation = self.chat.conversation
        try:
            conversation.save(Path(path).expanduser())
        except (OSError, LLMScratchError) as err:
            self.error(f"cannot save to {path}: {getattr(err, 'strerror', None) or err}")
            return
        self.say(f"(saved {len(conversation.messages())} messages to {path})")

    def answer(self, text: str) -> None:
        """Send the message and stream the answer; Ctrl-C stops it, keeping what was written."""
        from ..errors import LLMScratchError

        try:
            reply = self.chat.ask(text)
        except LLMScratchError as err:  # cannot be encoded, does not fit even alone, a template refuses it
            self.error(str(err))
            return
        if reply.dropped and not self.told_dropped:
            self.told_dropped = True
            self.say(f"(the conversation no longer fits the context of {self.chat.context_length} tokens with "
                     f"{self.chat.answer_tokens} kept for the answer: from now on its oldest exchanges are left "
                     "out, the system prompt kept)")
        try:
            for piece in reply:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            reply.stop()
            self.out.write("\n[interrupted]" if reply.text else "[interrupted]")
        self.out.write("\n")
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.out.flush()
        self.err.write(f"error: {text}\n")
        self.err.flush()


def _banner(chat: "Chat", run: str) -> str:
    how = ("the book's instruction format (it has no chat template of its own)" if chat.format.is_default
           else "its chat template")
    return (f"Chat with {run}: {how}; a context of {chat.context_length} tokens, answers of up to "
            f"{chat.answer_tokens}. /help lists the commands; Ctrl-D or /exit leaves.")


def _run_chat(args: argparse.Namespace) -> int:
    import dataclasses
    import importlib

    from ..data.tokenizer import check_utf8
    from ..inference.chat import Chat, Conversation, default_answer_tokens
    from ..inference.engine import Engine

    sampling = sampling_config(args, max_new_tokens=args.max_new_tokens or 0)  # checked before the model loads
    if args.system is not None:
        check_utf8(args.system, "--system")
    conversation = Conversation.load(args.load) if args.load is not None else Conversation()
    if args.system is not None:
        conversation.system = args.system
    engine = Engine.load(args.run_dir, args.device, use_cache=not args.no_cache)
    if args.max_new_tokens is None:
        sampling = dataclasses.replace(sampling, max_new_tokens=default_answer_tokens(engine.context_length))
    chat = Chat(engine, sampling, conversation, run=args.run_dir, ignore_eos=args.ignore_eos)
    interactive = sys.stdin.isatty()
    if interactive:
        try:  # once imported, input() edits lines (arrows, Ctrl-A/E...) and keeps their history (up, down)
            importlib.import_module("readline")
        except ImportError:  # Windows' Python has none
            pass
        print(_banner(chat, args.run_dir), flush=True)
    return Repl(chat, sys.stdout, sys.stderr, interactive).run()


@command("chat")
def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk with a run's chat model in the terminal, turn after turn",
                       description="A conversation in the terminal: each message is sent with the whole conversation "
                                   "in the model's chat template (its own, or for our models the book's instruction "
                                   "format), and the answer is printed as it is generated, up to the end of the turn. "
                                   "When the conversation outgrows the context, its oldest exchanges are left out. "
                                   "Inside: /reset, /system TEXT, /save FILE, /help, /exit; Ctrl-C stops an answer, "
                                   "Ctrl-D leaves.")
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    p.add_argument("--system", metavar="TEXT", help="the system prompt (change it inside with /system TEXT)")
    p.add_argument("--load", metavar="FILE",
                   help="go on with a conversation saved by /save (a JSON list of OpenAI-style messages)")
    add_sampling_options(p, max_new_tokens=None,
                         max_new_tokens_help="the longest answer, in tokens, kept free in the context for it "
                                             "(default: a quarter of the model's context, at most 512)")
