"""Chat templates: a conversation laid out as the text a model was fine-tuned on.

A conversation is a list of messages, ``{"role": "system" | "user" | "assistant", "content": text}``.
A pretrained chat model (SmolLM2, Qwen, Llama 3 Instruct) ships a Jinja template that turns it
into one string (ChatML's ``<|im_start|>user\\n…<|im_end|>``, Llama 3's ``<|start_header_id|>``…);
:func:`render_chat` renders such a template exactly as transformers' ``apply_chat_template`` does:
a sandboxed Jinja environment (templates come from downloaded files) with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception(message)``, a ``tojson`` filter that leaves HTML characters
alone, ``strftime_now(format)``, loop controls (``break``/``continue``), and the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools``, ``documents``
plus any extra keyword. Any failure (a syntax error, ``raise_exception``, a role the template
refuses) becomes a :class:`~llmscratch.errors.ChatTemplateError` that names the template's source.

The default template
--------------------
Our own models (char, bpe and gpt2 tokenizers) have no chat tokens and no template of their own;
they get :data:`DEFAULT_TEMPLATE`, the book's Alpaca-style instruction format (chapter 7)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {user message}

    ### Response:
    {assistant message}<|endoftext|>

    ### Instruction:
    {next user message}

    ### Response:

- A single user message with ``add_generation_prompt=True`` gives exactly the book's prompt
  (``format_input`` + ``"\\n\\n### Response:\\n"``), so a model fine-tuned the book's way answers.
- A system message (first only) replaces the opening sentence, which is the same kind of text:
  a standing instruction above the exchange.
- Each assistant message ends with the end-of-text token's text (``eos_token``, empty for the
  char tokenizer), as the book's instruction data does, so a model learns to stop there and
  stops on :attr:`ChatFormat.stop_ids`; the next turn starts a new ``### Instruction:``.
- Other roles, or a system message after the first, are refused with a clear error.

:func:`chat_format` picks, for any tokenizer, its own template or this default, and the ids
that end a turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..errors import ChatTemplateError

if TYPE_CHECKING:
    import jinja2

    from .tokenizer_base import Tokenizer

DEFAULT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "    {{- messages[0]['content'] -}}\n"
    "    {%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {{- 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' -}}\n"
    "    {%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in turns -%}\n"
    "    {%- if message['role'] == 'user' -%}\n"
    "        {{- '\\n\\n### Instruction:\\n' + message['content'] -}}\n"
    "    {%- elif message['role'] == 'assistant' -%}\n"
    "        {{- '\\n\\n### Response:\\n' + message['content'] + (eos_token or '') -}}\n"
    "    {%- else -%}\n"
    "        {{- raise_exception('it knows the roles user and assistant, and system as the first message "
    "only, not a message with the role ' + message['role']) -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '\\n\\n### Response:\\n' -}}\n"
    "{%- endif -%}\n"
)
DEFAULT_SOURCE = "the default chat template (llmscratch.data.chat_template.DEFAULT_TEMPLATE, the book's Alpaca format)"


# --------------------------------------------------------------------------- rendering


class _Refused(Exception):
    """Raised by a template's ``raise_exception``: the template refuses the conversation."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[tuple[str, str]] = None, sort_keys: bool = False) -> str:
    """JSON as ``json.dumps`` writes it; Jinja's own ``tojson`` would escape ``<``, ``>``, ``&`` and ``'`` for HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The current local time in ``format`` (templates put today's date in the system prompt)."""
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _environment() -> "jinja2.Environment":
    """The sandbox templates run in: they cannot reach Python internals, files or the mutable state of our objects."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}``: marks the assistant's text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> "jinja2.Template":
    return _environment().from_string(template)


def _plain(value: Any) -> Any:
    """A copy made of dicts, lists and scalars only, so a template can neither change nor reach into the caller's objects."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_messages(messages: Any, source: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"a conversation for {source} is a list of messages, not {type(messages).__name__}")
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {n} of the conversation for {source} should be a dict with a "
                                    f"\"role\" string and a \"content\", not {message!r}")


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: Optional[str] = None,
    eos_token: Optional[str] = None,
    source: str = "the chat template",
    **extra: Any,
) -> str:
    """The text of ``messages`` laid out by the Jinja ``template``, as transformers' ``apply_chat_template``.

    ``add_generation_prompt`` appends the start of the assistant's turn (for a model to answer).
    ``bos_token``/``eos_token``: the tokens' texts (left undefined when None, as transformers
    does). ``extra`` reaches the template as variables (``tools``, ``enable_thinking``, ``date_string``…).
    ``source`` names the template in errors. Raises ChatTemplateError on any failure.
    """
    import jinja2

    _check_messages(messages, source)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{source} is not a valid Jinja template: {e.message} (line {e.lineno}); "
                                "fix the template or use another") from None
    variables: dict[str, Any] = {"tools": None, "documents": None, **_plain(extra)}
    variables.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
    try:
        return compiled.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt, **variables)
    except _Refused as e:
        raise ChatTemplateError(f"{source} refuses this conversation: {e}") from None
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"{source} tried something the sandbox forbids ({e}); "
                                "the template is not safe to run") from None
    except Exception as e:  # an undefined variable, a type error in the template's own code …
        raise ChatTemplateError(f"{source} failed on this conversation: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- per tokenizer


@dataclass(frozen=True)
class ChatFormat:
    """How to turn a conversation into a prompt for one tokenizer's model, and which ids end the answer.

    ``template`` (Jinja text), ``source`` (for errors), ``stop_ids``, ``bos_token``/``eos_token``
    (their texts, given to the template), ``is_default`` (the tokenizer has no template of its own).
    """

    template: str = field(repr=False)
    source: str
    stop_ids: tuple[int, ...]
    bos_token: Optional[str]
    eos_token: Optional[str]
    is_default: bool
    tokenizer: "Tokenizer" = field(repr=False, compare=False)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The conversation's text (see :func:`render_chat`)."""
        return render_chat(self.template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, source=self.source, **extra)

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                   **extra: Any) -> list[int]:
        """The conversation's token ids, ready for the model to continue.

        The rendered text is encoded raw (special tokens in it, such as ``<|im_start|>``,
        become their ids); BOS is put first where the tokenizer's prompts start with BOS and the
        template did not already write it (Llama 3's template does; one BOS, never two).
        """
        ids = self.tokenizer.encode(self.render(messages, add_generation_prompt, **extra))
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids


def chat_format(tokenizer: "Tokenizer") -> ChatFormat:
    """The chat format for ``tokenizer``'s model: its own template, else :data:`DEFAULT_TEMPLATE`; its stop ids.

    Works for every kind: our char, bpe and gpt2 tokenizers have no template (the default is
    used) and end a turn with the end-of-text token where they have one; a pretrained ("hf")
    tokenizer brings its template and stop ids from the model's files.
    """
    own = tokenizer.chat_template
    bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else None
    eos = tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else None
    source = getattr(tokenizer, "chat_template_source", None) or f"the chat template of the {tokenizer.kind} tokenizer"
    return ChatFormat(template=own if own is not None else DEFAULT_TEMPLATE,
                      source=source if own is not None else DEFAULT_SOURCE,
                      stop_ids=tuple(tokenizer.stop_ids), bos_token=bos, eos_token=eos,
                      is_default=own is None, tokenizer=tokenizer)
