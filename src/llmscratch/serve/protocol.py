"""The OpenAI API's request bodies, checked, and the shapes of its answers.

A request body is read as JSON and validated here, field by field: a wrong type or a value out
of range is an :class:`APIError` that names the field (``param``) as OpenAI's API does, so a
client sees ``{"error": {"message", "type", "param", "code"}}`` and the server goes on serving.
Types are strict (``"5"`` is not a number, ``1`` is not ``true``), as OpenAI's own server is.

What each endpoint reads:

* both: ``model``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``,
  ``stream``, ``stream_options.include_usage``; and three extensions vLLM also reads,
  ``top_k``, ``repetition_penalty`` and ``ignore_eos``.
* ``/v1/chat/completions``: ``messages`` (``content`` a string or a list of text parts) and
  ``max_completion_tokens`` (the newer name of ``max_tokens``).
* ``/v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids or a list
  of such lists), ``echo`` and ``logprobs`` (how many most likely tokens to list per position).

Fields that would change the answer in ways this server does not compute
(``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``suffix``, ``best_of`` above ``n``,
``tools``, chat ``logprobs``) are refused rather than silently ignored; fields that change
nothing here (``user``, ``metadata``…) are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 64  # choices per request (OpenAI allows 128; each is a row of the batch)
MAX_LOGPROBS = 20  # most likely tokens listed per position (OpenAI: 5; vLLM: 20)


class APIError(Exception):
    """An error answered as OpenAI's error object, with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 about the field ``param``."""
    return APIError(400, message, param=param, code=code or ("invalid_value" if param else None))


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints read (OpenAI's defaults: temperature 1, top_p 1, n 1)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1)  # vLLM's extension; -1 or 0: every token
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's extension (transformers' definition)
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens past the end-of-text token (benchmarks)
    seed: Optional[int] = Field(None, ge=-(2**63), lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple (``stop`` may be one string)."""
        stop = self.stop if self.stop is not None else ()
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if "" in stops:
            raise bad_request("stop: an empty stop string would end every completion before it starts; "
                              "leave it out", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """Refuse, naming the field, what this server does not compute (rather than ignore it)."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server (only 0); repetition_penalty "
                                  "(above 1 discourages repeats) is", name, "unsupported_parameter")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported_parameter")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI does for a model without images)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """A ``/v1/chat/completions`` body."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    tools: Optional[list[Any]] = None

    def check(self) -> None:
        self.refuse_unsupported()
        if self.logprobs:
            raise bad_request("logprobs is not supported on /v1/chat/completions by this server; "
                              "/v1/completions gives them", "logprobs", "unsupported_parameter")
        if self.tools:
            raise bad_request("tools (function calling) are not supported by this server", "tools",
                              "unsupported_parameter")
        if self.max_tokens == 0:
            raise bad_request("max_tokens: a chat completion needs at least 1 token, got 0", "max_tokens")

    @property
    def new_tokens(self) -> Optional[int]:
        """``max_completion_tokens``, else ``max_tokens``; ``None``: up to the end of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Prompt = Union[str, list[int]]


class CompletionRequest(_Sampling):
    """A ``/v1/completions`` body."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check(self) -> None:
        self.refuse_unsupported()
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by this server", "suffix", "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of other than n is not supported by this server (got best_of={self.best_of}, "
                              f"n={self.n})", "best_of", "unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: 0 asks for no new tokens, which only makes sense with echo "
                              "(the prompt's log-probabilities); give max_tokens >= 1 or set echo", "max_tokens")
        if self.stream and self.max_tokens == 0:
            raise bad_request("max_tokens: 0 cannot be streamed; leave stream out", "max_tokens")

    def prompts(self) -> list[Prompt]:
        """The prompts, each a string or a list of token ids (a list of strings is several prompts)."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise bad_request("prompt is an empty list; give a string, a list of strings or token ids", "prompt")
        return list(p)  # type: ignore[arg-type]


def _param(loc: tuple) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content``; a union's branch names (``"list[int]"``) left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _BRANCHES and "[" not in str(part):
            out += f".{part}" if out else str(part)
    return out


_BRANCHES = {"str", "int", "float", "bool", "TextPart"}
_TYPES = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
          "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


def parse(model: type[_Strict], raw: bytes) -> Any:
    """The request ``model`` from the body ``raw`` (JSON); an APIError naming the field at fault."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise bad_request(f"the body is not valid JSON: {first['ctx'].get('error', first['msg'])}",
                              code="invalid_json") from None
        if first["type"] == "model_type" or not first["loc"]:
            raise bad_request("the body must be a JSON object", code="invalid_json") from None
        param = _param(first["loc"])
        field = param.rsplit(".", 1)[-1].split("[")[0]
        if field in _TYPES and len(err.errors()) > 1:  # every branch of a union failed: say what it may be
            message = f"{param} must be {_TYPES[field]}"
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first['msg']} (got {json.dumps(first.get('input'))[:60]})"
        raise bad_request(message, param) from None


# --------------------------------------------------------------------------- answers


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Answer:
    """The fixed parts of one response (or of every chunk of one stream)."""

    model: str
    chat: bool
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[dict[str, Any]], usage: Usage) -> dict[str, Any]:
        """The whole response of a request that was not streamed."""
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage.body()}

    def chunk(self, choices: list[dict[str, Any]], usage: Optional[Usage] = None,
              with_usage_field: bool = False) -> dict[str, Any]:
        """One chunk of a stream; ``usage`` is ``null`` on every chunk but the last when it was asked for."""
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if with_usage_field:
            out["usage"] = usage.body() if usage is not None else None
        return out


def chat_choice(index: int, text: str, finish_reason: Optional[str]) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_delta(index: int, finish_reason: Optional[str] = None, text: Optional[str] = None,
               role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: Optional[str],
                logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(data: Union[dict[str, Any], str]) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
