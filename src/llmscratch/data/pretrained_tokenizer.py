"""The tokenizers of pretrained models (Llama 3, Qwen2/Qwen3, SmolLM2): the "hf" kind.

A pretrained model comes with its tokenizer, and the model only works with exactly that one:
the same ids for the same text, the same special tokens (``<|im_start|>``, ``<|eot_id|>`` …),
BOS at the start of a prompt where the model was trained so, and the chat template that lays a
conversation out the way the model was fine-tuned on. :class:`PretrainedTokenizer` carries all
of it, read from either place a model is distributed in:

```
Hugging Face folder   tokenizer.json (the whole tokenizer: normalizer, pre-tokenizer, BPE, decoder)
                      + tokenizer_config.json (bos/eos tokens, chat template, add_bos_token)
                      + generation_config.json (eos_token_id: the ids that end a turn), optional
                      + chat_template.jinja / chat_template.json (newer transformers), optional
GGUF file             metadata only: vocabulary, merges, token types, special ids, chat template,
                      and the *name* of the pre-tokenizer ("tokenizer.ggml.pre"); the rules that
                      name stands for are in :data:`GGUF_PRE_TOKENIZERS`
```

A GGUF vocabulary is rebuilt as the `tokenizers` library's byte-level BPE. Only byte-level BPE
("gpt2", the kind Llama 3, Qwen2/3 and SmolLM2 use) is supported; a SentencePiece vocabulary
("llama": Llama 2, Mistral, Gemma) is refused by name, and so is a pre-tokenizer name that is
not in the table: a wrong guess would give the model other ids than it was trained on, silently.

``save`` writes ``tokenizer.json`` and a ``tokenizer_config.json`` that our ``load_tokenizer``
("kind": "hf") and transformers' ``AutoTokenizer.from_pretrained`` both read, so a model exported
as a Hugging Face folder carries a usable tokenizer.

The ids that end a generated turn (``stop_ids``): the EOS id, plus, from a Hugging Face folder,
``generation_config.json``'s ``eos_token_id`` (Llama 3.1 Instruct lists <|end_of_text|>,
<|eom_id|> and <|eot_id|> there); from a GGUF file, which has no generation config, the EOT/EOM
ids it names and every token whose text llama.cpp also treats as an end of generation
(:data:`END_OF_TURN_TOKENS`), e.g. both <|im_end|> and <|endoftext|> for SmolLM2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from ..errors import TokenizerError
from ..files import PathLike, write_text_atomic
from .tokenizer_base import CONFIG_FILE, TokenizersBacked, read_tokenizer_json

if TYPE_CHECKING:
    import tokenizers

SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
# transformers' class for "a tokenizer.json with these special tokens": AutoTokenizer builds it
# from our saved folder without knowing the model (transformers 4 and 5 both read this name).
HF_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# GGUF token types (llama.cpp's llama_token_type): normal text, control (<|im_start|>: special,
# never produced by BPE), user-defined (<think>: matched whole in the text, but plain text).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Token texts that end a generated turn wherever a GGUF vocabulary has them (as llama.cpp decides).
END_OF_TURN_TOKENS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
})


# --------------------------------------------------------------------------- GGUF pre-tokenizers


@dataclass(frozen=True)
class PreTokenizer:
    """How a byte-level BPE family cuts text into pieces before merging, as its own tokenizer.json does.

    ``split``: the regex whose matches are the pieces; None for GPT-2's, built into the
    library's ByteLevel step. ``digits``: every digit a piece of its own first (SmolLM).
    ``nfc``: Unicode NFC normalization first (Qwen2). ``ignore_merges``: a piece that is a whole
    token is taken as is before any merging (Llama 3, whose ranks came from tiktoken).
    ``add_bos``: whether prompts start with BOS when the file does not say (llama.cpp's default).
    """

    split: Optional[str] = None
    digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False
    add_bos: bool = False


# Llama 3's split: case-insensitive English contractions; letters with at most one leading
# non-letter; numbers of one to three digits; punctuation runs with their trailing newlines;
# newline runs; other whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (also Qwen2.5 and Qwen3): Llama 3's, but every digit alone.
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

_GPT2 = PreTokenizer()
_LLAMA3 = PreTokenizer(split=LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(split=QWEN2_SPLIT, nfc=True)

# tokenizer.ggml.pre (the names llama.cpp's converter writes) → the rules of the original tokenizer.json.
GGUF_PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": _GPT2,                           # GPT-2
    "smollm": PreTokenizer(digits=True),      # SmolLM, SmolLM2: Digits(individual) then GPT-2's split
    "llama-bpe": _LLAMA3,                     # Llama 3, 3.1, 3.2, 3.3
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,                          # Qwen2, Qwen2.5, Qwen3
    "deepseek-r1-qwen": _QWEN2,               # DeepSeek-R1 distilled into Qwen2.5
}


def _pre_tokenizer(pre: PreTokenizer) -> Any:
    """The `tokenizers` pre-tokenizer for ``pre``, ending in the byte-level step (bytes → GPT-2's alphabet)."""
    from tokenizers import Regex, pre_tokenizers

    if pre.split is not None:  # our split, then bytes only
        steps = [pre_tokenizers.Split(Regex(pre.split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:  # GPT-2's split is the ByteLevel step's own regex
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre.digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


# --------------------------------------------------------------------------- the tokenizer


class PretrainedTokenizer(TokenizersBacked):
    """A pretrained model's tokenizer: a `tokenizers` backend plus the model's special tokens and chat template.

    ``bos_id`` (None if the model has no BOS), ``eos_id`` (also ``eot_id``, the name our training
    and generation use), ``stop_ids`` (every id that ends a generated turn, EOS first),
    ``add_bos`` (prompts start with BOS: :meth:`prompt_ids` adds it; :meth:`encode` never does),
    ``chat_template`` (Jinja text or None) and ``chat_template_source`` (where it came from, for
    errors), ``pad_id``, ``model_max_length`` (the context length, when known) and ``source``.
    """

    kind = "hf"

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        stop_ids: Sequence[int] = (),
        pad_id: Optional[int] = None,
        add_bos: bool = False,
        chat_template: Optional[str] = None,
        chat_template_source: Optional[str] = None,
        model_max_length: Optional[int] = None,
        source: str = "a pretrained tokenizer",
    ):
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.source = source
        named = [("bos", bos_id), ("eos", eos_id), ("pad", pad_id), *(("stop", i) for i in stop_ids)]
        for what, i in named:
            if i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise TokenizerError(f"{source}: the {what} token id {i!r} is not an id of its vocabulary of "
                                     f"{self.vocab_size} tokens; the files must come from the same model")
        if add_bos and bos_id is None:
            raise TokenizerError(f"{source}: prompts should start with BOS (add_bos_token) but no BOS token is "
                                 "named; name it (bos_token) or set add_bos_token to false")
        self.backend = _agree_on_bos(backend, bos_id, add_bos)
        self.bos_id, self.eos_id, self.eot_id, self.pad_id = bos_id, eos_id, eos_id, pad_id
        self._stop_ids = tuple(dict.fromkeys(i for i in (eos_id, *stop_ids) if i is not None))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source or f"the chat template of {source}"
        self.model_max_length = model_max_length

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a generated turn, EOS first (see the module docstring)."""
        return self._stop_ids

    def token(self, i: Optional[int]) -> Optional[str]:
        """The text of token ``i`` as the vocabulary spells it (None for None)."""
        return None if i is None else self.backend.id_to_token(i)

    @property
    def bos_token(self) -> Optional[str]:
        return self.token(self.bos_id)

    @property
    def eos_token(self) -> Optional[str]:
        return self.token(self.eos_id)

    # ------------------------------------------------------------------ Hugging Face folders

    @classmethod
    def from_hf_dir(cls, directory: PathLike) -> "PretrainedTokenizer":
        """Read a Hugging Face model folder's tokenizer (see the module docstring for the files).

        BOS and EOS come from ``tokenizer_config.json`` (else ``special_tokens_map.json``; as
        strings or ``{"content": ...}``); ``add_bos`` from its ``add_bos_token``, else from
        whether ``tokenizer.json`` itself adds BOS (Llama 3's does); the chat template from
        ``chat_template.jinja``, else ``chat_template.json``, else the config (a string, or a
        list of ``{name, template}`` of which "default" is taken).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"tokenizer directory not found: {directory}")
        backend = read_tokenizer_json(directory / cls.FILE, "the tokenizer")
        config_path = directory / CONFIG_FILE
        config = _read_json_object(config_path)
        special = _read_json_object(directory / SPECIAL_TOKENS_MAP)
        generation = _read_json_object(directory / GENERATION_CONFIG)

        def special_id(name: str, required: bool = True) -> Optional[int]:
            where = config_path if name in config else directory / SPECIAL_TOKENS_MAP
            return _token_id(backend, config[name] if name in config else special.get(name), name, where, required)

        bos_id, eos_id, pad_id = special_id("bos_token"), special_id("eos_token"), special_id("pad_token", required=False)
        ends = _id_list(generation.get("eos_token_id"), "eos_token_id", directory / GENERATION_CONFIG)
        if eos_id is None and ends:
            eos_id = ends[0]
        ours = _id_list(config.get("stop_ids"), "stop_ids", config_path)  # written by our save()
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        template, template_source = _hf_chat_template(directory, config)
        length = config.get("model_max_length")
        known = isinstance(length, int) and 0 < length < 10**12  # transformers writes 1e30 for "unknown"
        return cls(backend, bos_id=bos_id, eos_id=eos_id, stop_ids=[*ends, *ours], pad_id=pad_id, add_bos=add_bos,
                   chat_template=template, chat_template_source=template_source,
                   model_max_length=length if known else None, source=str(directory))

    @classmethod
    def load(cls, directory: PathLike) -> "PretrainedTokenizer":
        """Read back a tokenizer saved by :meth:`save` (the same as :meth:`from_hf_dir`)."""
        return cls.from_hf_dir(directory)

    def _save_files(self, directory: Path) -> dict:
        write_text_atomic(directory / self.FILE, self.backend.to_str())
        config: dict[str, Any] = {
            "tokenizer_class": HF_TOKENIZER_CLASS,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "stop_ids": list(self.stop_ids),
        }
        if self.pad_id is not None:
            config["pad_token"] = self.token(self.pad_id)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    # ------------------------------------------------------------------ GGUF files

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str) -> "PretrainedTokenizer":
        """Build the tokenizer a GGUF file describes, from its metadata (see ``gguf_metadata.gguf_metadata``).

        ``meta`` maps GGUF key names to Python values; ``source`` names the file in errors.
        The vocabulary, merges and control tokens become a byte-level BPE; the pre-tokenizer
        comes from :data:`GGUF_PRE_TOKENIZERS` by ``tokenizer.ggml.pre``.
        """
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE, as in Llama 3, "
                "Qwen2/3 and SmolLM2) can be read. A SentencePiece vocabulary ('llama': Llama 2, Mistral, Gemma) "
                "or another kind is not supported: use the model's Hugging Face folder (tokenizer.json) instead")
        pre_name = meta.get("tokenizer.ggml.pre")
        pre = GGUF_PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
        if pre is None:
            said = "has no tokenizer.ggml.pre" if pre_name is None else f"has tokenizer.ggml.pre {pre_name!r}"
            raise TokenizerError(
                f"{source} {said}: the pre-tokenizer (how text is cut before BPE) is not one this project knows "
                f"({', '.join(sorted(GGUF_PRE_TOKENIZERS))}), and a guess would give other ids than the model was "
                "trained on; use the model's Hugging Face folder (tokenizer.json) instead")
        tokens = _string_list(meta, "tokenizer.ggml.tokens", source)
        merges = _string_list(meta, "tokenizer.ggml.merges", source)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                                 f"{len(tokens)} tokens; the file is damaged")
        backend = _byte_level_bpe(tokens, merges, types, pre, source)

        def special_id(key: str) -> Optional[int]:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and not (isinstance(value, int) and 0 <= value < len(tokens)):
                raise TokenizerError(f"{source}: tokenizer.ggml.{key} is {value!r}, not an id of its "
                                     f"{len(tokens)} tokens; the file is damaged")
            return value

        eos_id = special_id("eos_token_id")
        ends = [special_id("eot_token_id"), special_id("eom_token_id")]
        ends += [i for i, text in enumerate(tokens) if text in END_OF_TURN_TOKENS]
        add_bos = meta.get("tokenizer.ggml.add_bos_token", pre.add_bos)
        arch = meta.get("general.architecture")
        length = meta.get(f"{arch}.context_length")
        return cls(backend, bos_id=special_id("bos_token_id"), eos_id=eos_id,
                   stop_ids=sorted(i for i in set(ends) if i is not None), pad_id=special_id("padding_token_id"),
                   add_bos=bool(add_bos), chat_template=meta.get("tokenizer.chat_template"),
                   chat_template_source=f"the chat template of {source} (tokenizer.chat_template)",
                   model_max_length=length if isinstance(length, int) else None, source=source)


# --------------------------------------------------------------------------- helpers


def _byte_level_bpe(tokens: list[str], merges: list[str], types: Sequence[int], pre: PreTokenizer,
                    source: str) -> "tokenizers.Tokenizer":
    """A `tokenizers` byte-level BPE with GGUF's ids: token i of the list is id i; control tokens are special."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, normalizers

    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise TokenizerError(f"{source}: token {i} {token!r} repeats token {vocab[token]} of "
                                 "tokenizer.ggml.tokens; two ids cannot share one text, the vocabulary is damaged")
        vocab[token] = i
    pairs = []
    for n, line in enumerate(merges):
        parts = line.split(" ")
        # the library panics on a merge whose result is not a token, so every part is checked here
        if len(parts) != 2 or any(p not in vocab for p in (*parts, "".join(parts))):
            raise TokenizerError(f"{source}: merge {n} of tokenizer.ggml.merges, {line!r}, is not two tokens "
                                 "whose join is a token; the merges do not belong to the vocabulary")
        pairs.append((parts[0], parts[1]))
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges, fuse_unk=False))
    if pre.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # A control or user-defined token is matched whole in the text (so "<|im_start|>" in a
    # rendered chat is one id); its text is already in the vocabulary, so it keeps its id.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return backend


def _agree_on_bos(backend: "tokenizers.Tokenizer", bos_id: Optional[int], add_bos: bool) -> "tokenizers.Tokenizer":
    """``backend``, or a copy whose post-processor adds BOS exactly when ``add_bos``.

    Our :meth:`prompt_ids` adds BOS itself (encoding never runs the post-processor), but
    transformers, reading a saved ``tokenizer.json``, adds what its post-processor says: the two
    must agree for an exported folder to encode prompts as we do.
    """
    from tokenizers import Tokenizer as Backend, processors

    adds = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    if adds == add_bos:
        return backend
    backend = Backend.from_str(backend.to_str())
    if add_bos:
        bos = backend.id_to_token(bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return backend


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; {} if there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} should hold a JSON object, not {type(value).__name__}")
    return value


def _token_id(backend: "tokenizers.Tokenizer", value: Any, name: str, where: Path,
              required: bool = True) -> Optional[int]:
    """The id of a special token given as a string or as ``{"content": ...}`` (transformers' AddedToken).

    A token that is not in the vocabulary is an error where ``required``, else None (a padding
    token that transformers would add as a new token is of no use to us).
    """
    text = value.get("content") if isinstance(value, dict) else value
    if text is None:
        return None
    if not isinstance(text, str):
        raise TokenizerError(f"{where}: {name} should be a token's text or {{\"content\": text}}, not {value!r}")
    i = backend.token_to_id(text)
    if i is None and required:
        raise TokenizerError(f"{where}: {name} {text!r} is not a token of the tokenizer.json beside it; "
                             "the files must come from the same model")
    return i


def _id_list(value: Any, name: str, where: Path) -> list[int]:
    """An id or a list of ids (as generation_config.json's eos_token_id) as a list; [] for None."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{where}: {name} should be a token id or a list of ids, not {value!r}")
    return ids


def _hf_chat_template(directory: Path, config: dict) -> tuple[Optional[str], Optional[str]]:
    """(template, where it came from) of a Hugging Face folder; separate files win over the config, as in transformers."""
    jinja = directory / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), str(jinja)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read the chat template {jinja}: {e}") from e
    for path, value in ((directory / CHAT_TEMPLATE_JSON, _read_json_object(directory / CHAT_TEMPLATE_JSON)),
                        (directory / CONFIG_FILE, config)):
        template = value.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None:
            if not isinstance(template, str):
                raise TokenizerError(f"{path}: chat_template should be a Jinja template's text, or a list of "
                                     f"{{name, template}} with a \"default\", not {type(template).__name__}")
            return template, f"the chat template in {path}"
    return None, None


def _string_list(meta: Mapping[str, Any], key: str, source: str) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise TokenizerError(f"{source}: {key} should be a list of strings, but it is {got}; "
                             "the file has no usable byte-level BPE vocabulary")
    return value


# --------------------------------------------------------------------------- to GGUF


def _pre_name(backend: "tokenizers.Tokenizer") -> Optional[str]:
    """The ``tokenizer.ggml.pre`` name whose rules cut text as ``backend`` does (normalizer and
    pre-tokenizer compared as the library serializes them), or None where no known name does."""
    from tokenizers import normalizers

    ours = json.loads(backend.to_str())
    for name, pre in GGUF_PRE_TOKENIZERS.items():
        wanted = json.loads(_pre_tokenizer(pre).__getstate__())
        norm = json.loads(normalizers.NFC().__getstate__()) if pre.nfc else None
        if (wanted == ours.get("pre_tokenizer") and norm == ours.get("normalizer")
                and bool(ours["model"].get("ignore_merges")) == pre.ignore_merges):
            return name
    return None


def gguf_tokenizer_metadata(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.*`` keys a GGUF file needs for ``tokenizer`` (byte-level BPE only), so that
    llama.cpp, Ollama and transformers' GGUF loader rebuild it: the inverse of
    :meth:`PretrainedTokenizer.from_gguf_metadata`.

    Works for the "hf" and "bpe" kinds (a `tokenizers` byte-level BPE, whose pre-tokenizer must
    be one of :data:`GGUF_PRE_TOKENIZERS`) and for "gpt2" (GPT-2's own files). A character
    tokenizer has no BPE vocabulary for GGUF to hold, and is refused.
    """
    if tokenizer.kind == "gpt2":
        vocab = json.loads(tokenizer.vocab_text)
        merges = [line for line in tokenizer.merges_text.splitlines() if line and not line.startswith("#version")]
        pre, specials = "gpt-2", {tokenizer.eot_id}
    elif tokenizer.kind in ("hf", "bpe"):
        state = json.loads(tokenizer.backend.to_str())
        if state["model"].get("type") != "BPE":
            raise TokenizerError(f"a GGUF file holds a byte-level BPE vocabulary; this {tokenizer.kind} tokenizer's "
                                 f"model is {state['model'].get('type')!r}")
        vocab = dict(state["model"]["vocab"])
        for added in state.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        pre = _pre_name(tokenizer.backend)
        if pre is None:
            raise TokenizerError(f"this {tokenizer.kind} tokenizer cuts text in a way none of the GGUF pre-tokenizer "
                                 f"names this project knows ({', '.join(sorted(GGUF_PRE_TOKENIZERS))}) stands for, "
                                 "so llama.cpp would tokenize differently; export it as a Hugging Face folder instead")
        specials = {a["id"] for a in state.get("added_tokens", []) if a.get("special")}
    else:
        raise TokenizerError(f"a GGUF file holds a byte-level BPE vocabulary; a {tokenizer.kind} tokenizer has none "
                             "(train with --tokenizer bpe or gpt2 for a model that runs in llama.cpp)")
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL if i in specials else NORMAL for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": bool(tokenizer.add_bos),
    }
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eot_id),
                       ("padding_token_id", getattr(tokenizer, "pad_id", None))):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = value
    if tokenizer.chat_template is not None:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta
