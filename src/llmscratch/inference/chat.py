"""A conversation with a chat model: its messages, the prompt that fits the context, its JSON file.

``llmscratch chat`` (a terminal REPL), ``llmscratch generate --chat`` (one message) and a server
turn a conversation into a prompt here, the same way:

* **The format.** The model's own chat template (a pretrained model's, from its files), else, for
  the models of our own tokenizers (char, bpe, gpt2: GPT-2-shaped runs trained or imported here),
  the book's instruction format (``data.chat_template.DEFAULT_TEMPLATE``). A pretrained tokenizer
  without a template (a base model) has neither: it was never taught where a turn ends, so
  :func:`chat_format_for` refuses it and names ``llmscratch generate``, which continues raw text.
* **The whole history, every turn.** Each answer is generated from the whole conversation
  rendered again (the system prompt, every exchange still kept, the new user message, the start
  of the assistant's turn), and ends at the tokenizer's end-of-turn ids (:func:`chat_sampling`).
* **Fitting the context.** The prompt and its answer must fit in the model's context together:
  the prompt may take ``context_length - max_new_tokens`` tokens. When it would take more, the
  oldest exchanges (a user message and its answer) are dropped one at a time until it fits; the
  system prompt always stays (:func:`fit`). A dropped exchange stays dropped (a short answer
  later does not bring it back, so the model's view only ever loses its oldest part) but stays in
  the transcript (:meth:`Conversation.messages`, saved files). A new message that does not fit
  even alone after the system prompt is refused, and the conversation is left as it was.
* **Requests.** ``Conversation.from_messages(messages, pending=True)`` takes the messages of a
  request that ends with a user message, and :func:`fit` makes the prompt for its answer.
* **The file.** A conversation is saved as a JSON list of OpenAI-style messages,
  ``{"role": "system" | "user" | "assistant", "content": text}``; an answer stopped by the user
  carries ``"interrupted": true``. :meth:`Conversation.load` reads it back (a list, or an object
  with a ``"messages"`` list, as an OpenAI request holds it).

```
chat = Chat(Engine.load("runs/smollm2"), SamplingConfig(max_new_tokens=200, temperature=0.0))
reply = chat.ask("What is the capital of France?")
for piece in reply:          # the answer, streamed; when it ends it joins chat.conversation
    print(piece, end="")
chat.conversation.save("talk.json")
```
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

from ..data.chat_template import ChatFormat, chat_format
from ..errors import ChatError
from ..files import PathLike, write_text_atomic
from .generate import SamplingConfig

if TYPE_CHECKING:
    from ..data.tokenizer_base import Tokenizer
    from .engine import Engine

# An OpenAI-style message: {"role": ..., "content": ...}, and "interrupted": True on a stopped answer.
Message = dict[str, Any]
# The tokenizer kinds of the models trained here, which the default template (the book's format) is for.
DEFAULT_KINDS = ("char", "bpe", "gpt2")
# The most tokens an answer gets when no --max-new-tokens is given (less on a short context).
DEFAULT_ANSWER_TOKENS = 512


def chat_format_for(tokenizer: "Tokenizer", run: str = "RUN") -> ChatFormat:
    """The chat format of ``tokenizer``'s model (:func:`data.chat_template.chat_format`), if it can chat.

    A tokenizer with a chat template gets it; one of our own kinds (:data:`DEFAULT_KINDS`) gets
    the default template. A pretrained tokenizer without a template raises :class:`ChatError`,
    which names ``llmscratch generate`` (``run``: how the user named the model's run directory).
    """
    fmt = chat_format(tokenizer)
    if fmt.is_default and tokenizer.kind not in DEFAULT_KINDS:
        raise ChatError(f"{run} has no chat template: its tokenizer (a pretrained model's) brings none, as a base "
                        "model's does, and the default chat format (the book's instruction format) is for the "
                        f"models trained here; continue text with `llmscratch generate {run} --prompt TEXT` instead")
    return fmt


def chat_sampling(fmt: ChatFormat, sampling: SamplingConfig) -> SamplingConfig:
    """``sampling`` whose answer also ends at the chat format's end-of-turn ids (SmolLM2's ``<|im_end|>``)."""
    return dataclasses.replace(sampling, stop_ids=tuple(dict.fromkeys(sampling.stop_ids + fmt.stop_ids)))


def default_answer_tokens(context_length: int) -> int:
    """The room kept for an answer when none is asked for: a quarter of the context, at most 512 tokens.

    A quarter leaves three quarters of a short context to the conversation (our small models
    have 64 to 256 tokens); 512 is plenty of answer on a long one (SmolLM2's 8,192).
    """
    return max(1, min(DEFAULT_ANSWER_TOKENS, context_length // 4))


# --------------------------------------------------------------------------- the conversation


@dataclass
class Conversation:
    """A system prompt and the exchanges so far.

    Attributes:
        system: the system prompt (``None``: none; the template may add its own default).
        turns: user and assistant messages, alternating, a user message first.
        dropped: how many exchanges at the start of ``turns`` the model no longer sees (:func:`fit`).
    """

    system: Optional[str] = None
    turns: list[Message] = field(default_factory=list)
    dropped: int = 0

    def messages(self) -> list[Message]:
        """The whole conversation as OpenAI-style messages: the system message (if any), then every
        turn, dropped ones included (copies)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(message) for message in self.turns]

    def sent(self) -> list[Message]:
        """What the model is given: the system message (if any), then the turns from the first
        exchange still kept, each as role and content only."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        kept = self.turns[2 * self.dropped:]
        return head + [{"role": m["role"], "content": m["content"]} for m in kept]

    def add_user(self, text: str) -> None:
        """Add the user's next message (after an answer, or first)."""
        if self.turns and self.turns[-1]["role"] == "user":
            raise ValueError("the last user message has no answer yet: add the assistant's before the next message")
        self.turns.append({"role": "user", "content": text})

    def add_assistant(self, text: str, interrupted: bool = False) -> None:
        """Add the answer to the last user message; ``interrupted``: the user stopped it part way."""
        if not self.turns or self.turns[-1]["role"] != "user":
            raise ValueError("an answer follows a user message: add the user's message first")
        self.turns.append({"role": "assistant", "content": text, **({"interrupted": True} if interrupted else {})})

    def reset(self) -> None:
        """Forget every exchange; the system prompt stays."""
        self.turns.clear()
        self.dropped = 0

    def to_json(self) -> str:
        """:meth:`messages` as indented JSON (non-ASCII text as it is), ending with a newline."""
        return json.dumps(self.messages(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: PathLike) -> None:
        """Write :meth:`to_json` to ``path`` (staged and renamed: never half a file)."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_messages(cls, messages: Any, source: str = "the conversation", *,
                      pending: bool = False) -> "Conversation":
        """A conversation from OpenAI-style messages: an optional system message first, then user
        and assistant messages alternating, ending with an answer, or with ``pending`` a user
        message still to be answered (a request, as a server gets it; then :func:`fit` makes its
        prompt). Keys other than ``role``, ``content`` and ``interrupted`` are left out. Anything
        else raises :class:`ChatError` naming ``source`` and the message's number (from 1)."""
        if isinstance(messages, Mapping) and "messages" in messages:
            messages = messages["messages"]
        if not isinstance(messages, list):
            raise ChatError(f"{source} should be a JSON list of messages ({{\"role\": ..., \"content\": ...}}), "
                            f"not {type(messages).__name__}")
        conversation = cls()
        for n, message in enumerate(messages, start=1):
            role, content, interrupted = _check_message(message, n, source)
            expected = "user" if len(conversation.turns) % 2 == 0 else "assistant"
            if role == "system" and n == 1:
                conversation.system = content
            elif role != expected:
                where = "only as the first message" if role == "system" else "here"
                raise ChatError(f"message {n} of {source} is a {role} message {where}: after the system message, "
                                f"user and assistant messages alternate, a user message first; expected {expected}")
            elif role == "user":
                conversation.add_user(content)
            else:
                conversation.add_assistant(content, interrupted)
        if pending and len(conversation.turns) % 2 == 0:
            raise ChatError(f"{source} should end with a user message to answer, not "
                            f"{'an assistant message' if conversation.turns else 'nothing but a system message'}")
        if not pending and len(conversation.turns) % 2:
            raise ChatError(f"{source} ends with a user message (message {len(messages)}) that has no answer: "
                            "remove it and ask it again")
        return conversation

    @classmethod
    def load(cls, path: PathLike) -> "Conversation":
        """A conversation saved by :meth:`save` (or any OpenAI-style messages list in a JSON file)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ChatError(f"cannot read the conversation {path}: {err.strerror or err}") from None
        except (UnicodeDecodeError, ValueError) as err:
            raise ChatError(f"{path} is not a JSON conversation ({err}): give a file saved by /save") from None
        return cls.from_messages(data, str(path))


def _check_message(message: Any, n: int, source: str) -> tuple[str, str, bool]:
    """``(role, content, interrupted)`` of message ``n``, or a ChatError saying what is wrong with it."""
    if not isinstance(message, Mapping):
        raise ChatError(f"message {n} of {source} should be an object with \"role\" and \"content\", not {message!r}")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant"):
        raise ChatError(f"message {n} of {source} has the role {role!r}: use \"system\", \"user\" or \"assistant\"")
    if not isinstance(content, str):
        raise ChatError(f"message {n} of {source} should have a text \"content\", not {content!r}")
    interrupted = message.get("interrupted", False)
    if not isinstance(interrupted, bool) or (interrupted and role != "assistant"):
        raise ChatError(f"message {n} of {source}: \"interrupted\" is true or false, on an assistant message only")
    return role, content, interrupted


def fit(conversation: Conversation, fmt: ChatFormat, context_length: int, answer_tokens: int) -> tuple[list[int], int]:
    """The prompt for the answer to the conversation's last (user) message, in at most
    ``context_length - answer_tokens`` tokens, and how many exchanges were dropped to fit it.

    The oldest exchanges still kept are dropped (``conversation.dropped`` grows) until the prompt
    fits. If even the last message alone (after the system prompt) does not fit, nothing is
    dropped and :class:`ChatError` says by how much it is too long.
    """
    budget = context_length - answer_tokens
    before = conversation.dropped
    while True:
        ids = fmt.prompt_ids(conversation.sent())
        if len(ids) <= budget:
            return ids, conversation.dropped - before
        if 2 * (conversation.dropped + 1) >= len(conversation.turns):  # the last user message is all that is left
            conversation.dropped = before
            system = " with the system prompt" if conversation.system is not None else ""
            raise ChatError(f"this message does not fit: rendered{system} it takes {len(ids)} tokens, and the "
                            f"model's context of {context_length} holds {budget} besides the {answer_tokens} kept "
                            "for the answer (--max-new-tokens); shorten it, or keep less room for the answer")
        conversation.dropped += 1


# --------------------------------------------------------------------------- talking to a model


class Reply:
    """One answer as it is generated: iterate over it for its pieces of text.

    When the pieces run out the answer joins the conversation; :meth:`stop` ends it part way (the
    user pressed Ctrl-C) and adds what was generated so far, marked interrupted. One of the two
    must happen before the conversation's next message.

    Attributes:
        prompt_ids: the ids the model was given (the conversation as it fit the context).
        dropped: how many old exchanges were dropped to fit this prompt.
        text: the answer so far.
        interrupted: whether :meth:`stop` ended it.
    """

    def __init__(self, conversation: Conversation, pieces: Iterator[str], prompt_ids: list[int], dropped: int):
        self.conversation = conversation
        self.prompt_ids = prompt_ids
        self.dropped = dropped
        self.text = ""
        self.interrupted = False
        self.done = False
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        if self.done:
            return
        for piece in self._pieces:
            self.text += piece
            yield piece
        self._finish(interrupted=False)

    def stop(self) -> None:
        """End the answer where it is: the text so far joins the conversation, marked interrupted.
        Nothing happens if the answer has already ended."""
        if self.done:
            return
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()  # the decode loop's own clean-up (the model's train/eval mode) runs now
        self._finish(interrupted=True)

    def _finish(self, interrupted: bool) -> None:
        self.done, self.interrupted = True, interrupted
        self.conversation.add_assistant(self.text, interrupted)


class Chat:
    """A conversation with an engine's model: :meth:`ask` sends it whole, as far as it fits.

    ``sampling`` decides how answers are sampled and how long they may be (``max_new_tokens``,
    the room kept in the context); the chat format's end-of-turn ids end them (unless
    ``ignore_eos``). ``run`` names the model in errors (how the user named its run directory).
    Raises :class:`ChatError` for a model that cannot chat (:func:`chat_format_for`) or an
    answer that leaves no room for the conversation.
    """

    def __init__(self, engine: "Engine", sampling: SamplingConfig, conversation: Optional[Conversation] = None,
                 *, run: str = "RUN", ignore_eos: bool = False):
        self.engine = engine
        self.format = chat_format_for(engine.tokenizer, run)
        self.sampling = chat_sampling(self.format, sampling)
        self.conversation = conversation if conversation is not None else Conversation()
        self.ignore_eos = ignore_eos
        if sampling.max_new_tokens >= engine.context_length:
            raise ChatError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for the conversation: the "
                            f"prompt and the answer share the model's context of {engine.context_length} tokens; "
                            f"give fewer (the default is {default_answer_tokens(engine.context_length)})")

    @property
    def context_length(self) -> int:
        """The model's context, which the prompt and its answer share."""
        return self.engine.context_length

    @property
    def answer_tokens(self) -> int:
        """The most tokens an answer takes, kept free in the context."""
        return self.sampling.max_new_tokens

    def prompt_ids(self) -> list[int]:
        """The ids the model would be given now for an answer to the conversation's last message
        (as :meth:`ask` computes them: the oldest exchanges dropped as needed)."""
        return fit(self.conversation, self.format, self.context_length, self.answer_tokens)[0]

    def ask(self, text: str) -> Reply:
        """Add the user's message and start the answer; iterate over the :class:`Reply` for it.

        The prompt is made now: a message that cannot be encoded or does not fit raises here
        (and is not added), before anything is generated.
        """
        self.conversation.add_user(text)
        try:
            ids, dropped = fit(self.conversation, self.format, self.context_length, self.answer_tokens)
            pieces = self.engine.stream(ids, self.sampling, ignore_eos=self.ignore_eos)
        except BaseException:
            self.conversation.turns.pop()
            raise
        return Reply(self.conversation, pieces, ids, dropped)


def single_turn(fmt: ChatFormat, user: str, system: Optional[str] = None) -> list[int]:
    """The prompt ids of a conversation of one user message (after ``system``, if given), as
    ``llmscratch generate --chat`` sends it."""
    conversation = Conversation(system=system)
    conversation.add_user(user)
    return fmt.prompt_ids(conversation.sent())

