"""What every tokenizer shares: the :class:`Tokenizer` interface and the `tokenizers`-library base.

Kept apart from ``tokenizer.py`` (our own kinds: char, bpe, gpt2; building and loading) and
``pretrained_tokenizer.py`` (the tokenizers of pretrained models, kind "hf") so both can build
on it, and ``load_tokenizer`` in ``tokenizer.py`` can know every kind without an import cycle.
Names defined here are also importable from ``tokenizer.py``, where they used to live.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import TokenizerError
from ..files import PathLike, write_text_atomic

if TYPE_CHECKING:
    import tokenizers


CONFIG_FILE = "tokenizer_config.json"
EOT = "<|endoftext|>"


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, …) map to
    chr(256), chr(257), … in byte order. GPT-2's encoder.json and merges spell tokens
    with these characters, and their first 256 ids follow this order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping  # insertion order = GPT-2's id order of the single bytes


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`."""
    return {ch: b for b, ch in bytes_to_unicode().items()}



def check_utf8(text: str, what: str = "the text") -> None:
    """Raise TokenizerError naming the first character of ``text`` that UTF-8 cannot encode.

    Python turns bytes that are not UTF-8 (in a command-line argument, ``$'the \\xff'``) into
    lone surrogate characters (U+DC80 to U+DCFF, "surrogateescape"), which no tokenizer can
    encode: the BPE library refuses them with a TypeError and tiktoken would silently replace them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        bad = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        before = text[max(0, err.start - 20):err.start]
        raise TokenizerError(
            f"{what} is not valid UTF-8: {bad} at position {err.start} (after {before!r}); "
            f"give the text as UTF-8 (check the encoding of your terminal or of the file it came from)"
        ) from None


def check_utf8_batch(texts: Sequence[str]) -> None:
    """:func:`check_utf8` on each text; the error names which text of the batch is at fault."""
    for n, text in enumerate(texts):
        check_utf8(text, "the text" if len(texts) == 1 else f"text {n} of {len(texts)}")



# --------------------------------------------------------------------------- interface


class Tokenizer(ABC):
    """Text ⇄ token ids. Subclasses set ``kind``, ``vocab_size`` and ``eot_id``.

    The class attributes below are what a tokenizer without a pretrained model's special
    tokens has (our char, bpe and gpt2 kinds): no BOS, no chat template, and the end-of-text
    token (where there is one) as the only id that ends a generated text. The "hf" kind sets them
    from the model's files, so callers can treat every kind alike.
    """

    kind: str
    vocab_size: int
    eot_id: Optional[int]
    bos_id: Optional[int] = None
    add_bos: bool = False  # whether a prompt starts with BOS (see prompt_ids)
    chat_template: Optional[str] = None  # a Jinja chat template (see data.chat_template)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a generated turn: here the end-of-text id, if the tokenizer has one."""
        return () if self.eot_id is None else (self.eot_id,)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, raw: no BOS or other special token is added (one in the text is kept)."""

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as a model's prompt: :meth:`encode`, after BOS where the tokenizer adds one.

        Our own kinds add nothing, so this is ``encode``; callers use it for every kind so that
        a pretrained model whose prompts start with BOS (Llama 3) gets it.
        """
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; the BPE and GPT-2 tokenizers override this with a parallel encoder."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; an id outside the vocabulary raises TokenizerError."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token ids outside the vocabulary of {self.vocab_size} ({self.kind} tokenizer): "
                f"{bad[:10]}; the ids must come from the same tokenizer"
            )
        return self._decode(ids)

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: the UTF-8 byte count of each token's text, 0 for special tokens.

        Summing it over evaluated target ids gives the bytes of text they stand for,
        the denominator of bits per byte (see ``data.bits_per_byte``).
        """

    @abstractmethod
    def _save_files(self, directory: Path) -> dict:
        """Write the tokenizer's own files; return extra fields for tokenizer_config.json."""

    def save(self, directory: PathLike) -> None:
        """Write the tokenizer's files and ``tokenizer_config.json`` into ``directory`` (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self._save_files(directory)
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, **extra}
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def fingerprint(self) -> str:
        """A SHA-256 of the tokenizer's saved files: equal fingerprints, equal tokenization."""
        h = hashlib.sha256()
        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            for path in sorted(Path(tmp).iterdir()):
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- the tokenizers library


def read_tokenizer_json(path: Path, what: str = "the tokenizer") -> tokenizers.Tokenizer:
    """The `tokenizers` library's tokenizer from a ``tokenizer.json``; a clear TokenizerError if it cannot be read."""
    from tokenizers import Tokenizer as Backend

    if not path.is_file():
        raise TokenizerError(f"{path} is {'a directory' if path.is_dir() else 'missing'}; give a tokenizer.json "
                             "(ours or a Hugging Face one) or the folder that holds it")
    try:
        return Backend.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for bad files
        raise TokenizerError(f"cannot read {what} {path}: {e}") from e


class TokenizersBacked(Tokenizer):
    """A tokenizer run by the `tokenizers` library (``self.backend``), saved as ``tokenizer.json``.

    The base of our "bpe" kind and of pretrained models' "hf" kind: encoding, decoding and the
    byte count of each token are the same for both; they differ in where the tokenizer comes from
    and in which special tokens they know.
    """

    FILE = "tokenizer.json"
    backend: tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # "TextInputSequence must be str": text that is not UTF-8, or not text at all
            if isinstance(text, str):
                check_utf8(text)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            if all(isinstance(t, str) for t in texts):
                check_utf8_batch(texts)
            raise

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        decode = unicode_to_bytes()
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            # A byte-level token spells one byte per character; anything else counts as UTF-8.
            if all(ch in decode for ch in token):
                lengths[i] = len(token)
            else:
                lengths[i] = len(token.encode("utf-8"))
        return lengths

    def _save_files(self, directory: Path) -> dict:
        write_text_atomic(directory / self.FILE, self.backend.to_str())
        return {}
