"""Tokenizers: text ⇄ token ids, four kinds behind one interface.

```
"char"  one id per character of the training text (sorted); tiny vocabulary, long sequences
"bpe"   byte-level BPE trained on your corpus with the `tokenizers` library  → tokenizer.json
"gpt2"  GPT-2's own 50,257-token BPE run by `tiktoken`, read from local files
         (OpenAI's vocab.bpe + encoder.json, or Hugging Face's merges.txt + vocab.json)
"hf"    a pretrained model's tokenizer (Llama 3, Qwen2/3, SmolLM2), from its Hugging Face
         folder or GGUF file, with its special tokens and chat template  → pretrained_tokenizer.py
```

Every tokenizer has ``kind``, ``vocab_size``, ``eot_id``, ``encode``, ``prompt_ids``, ``decode``,
``token_byte_lengths`` (for bits per byte) and ``save`` (the interface: ``tokenizer_base.py``);
:func:`load_tokenizer` reads any of them back from a directory by its ``tokenizer_config.json``,
and also reads a plain Hugging Face GPT-2 directory. Nothing here downloads: GPT-2's files must
be on disk, and a clear error says where to put them.

The text ``<|endoftext|>`` is encoded as the end-of-text token by the tokenizers that have
one (as the book does with ``allowed_special={"<|endoftext|>"}``), so documents can be
separated with it in a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import TokenizerError
from ..files import PathLike, write_text_atomic
from .pretrained_tokenizer import PretrainedTokenizer
# The interface and the helpers every kind shares live in tokenizer_base (still importable from here).
from .tokenizer_base import (
    CONFIG_FILE,
    EOT,
    Tokenizer,
    TokenizersBacked,
    bytes_to_unicode,
    check_utf8,
    check_utf8_batch,
    read_tokenizer_json,
    unicode_to_bytes,
)

if TYPE_CHECKING:
    import tokenizers

KINDS = ("char", "bpe", "gpt2", "hf")
BUILDABLE_KINDS = ("char", "bpe", "gpt2")  # "hf" comes with a pretrained model, it is not built
DEFAULT_BPE_VOCAB_SIZE = 2048

# GPT-2's pre-tokenization regex, the form tiktoken uses for "gpt2"/"r50k_base" (equivalent
# to the original r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Where GPT-2's files come from, for the error message and for tiktoken's cache keys.
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
GPT2_HF_PAGE = "https://huggingface.co/openai-community/gpt2/tree/main"
GPT2_ENV = "LLMSCRATCH_GPT2_DIR"
# (merges file, vocabulary file): OpenAI's names first, then Hugging Face's (same content).
GPT2_FILE_PAIRS = (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json"))


# --------------------------------------------------------------------------- helpers


def split_for_encoding(text: str) -> list[str]:
    """Cut text into pieces that tokenize exactly as the whole text does, for batch encoding.

    A cut goes after a newline that follows a non-space character and precedes one, e.g.
    between two verses. GPT-2's pre-tokenizer never joins across such a point (the newline is
    always a piece of its own there), so encoding the pieces one by one and concatenating the
    ids gives the same ids as encoding the whole text, and the pieces can be encoded in parallel.
    """
    return re.split(r"(?<=\S\n)(?=\S)", text) if text else []


def _describe_chars(chars: Iterable[str], limit: int = 10) -> str:
    chars = sorted(set(chars))
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


# --------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per character: the sorted set of the training text's characters."""

    kind = "char"
    FILE = "chars.json"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise TokenizerError("the character tokenizer needs at least one character; the training text is empty")
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("the character vocabulary must be distinct single characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_id = None

    @classmethod
    def from_text(cls, text: Union[str, Iterable[str]]) -> "CharTokenizer":
        """The tokenizer whose vocabulary is every character of ``text`` (sorted)."""
        seen: set[str] = set()
        for part in [text] if isinstance(text, str) else text:
            seen.update(part)
        return cls(sorted(seen))

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            check_utf8(text)  # bytes that are not UTF-8 get the same error from every tokenizer
            missing = {c for c in text if c not in stoi}
            raise TokenizerError(
                f"characters not in the vocabulary: {_describe_chars(missing)} "
                f"(the character tokenizer only knows the {self.vocab_size} characters of its training text)"
            ) from None

    def _decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8", "surrogatepass")) for c in self.chars], dtype=np.int64)

    def _save_files(self, directory: Path) -> dict:
        write_text_atomic(directory / self.FILE, json.dumps(self.chars, ensure_ascii=False) + "\n")
        return {}

    @classmethod
    def load(cls, directory: PathLike) -> "CharTokenizer":
        """Read back a character tokenizer saved by :meth:`save` (its ``chars.json``)."""
        path = Path(directory) / cls.FILE
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read the character vocabulary {path}: {e}") from e
        return cls(chars)


# --------------------------------------------------------------------------- bpe


class BPETokenizer(TokenizersBacked):
    """Byte-level BPE run by the `tokenizers` library; any text round-trips exactly.

    Byte level: text is UTF-8 bytes first, so there is no unknown character and accents,
    CJK and emoji decode back unchanged. Trained on your corpus with :meth:`train`, or read
    from a ``tokenizer.json`` (ours or a Hugging Face one such as GPT-2's).
    """

    kind = "bpe"

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eot_id = backend.token_to_id(EOT)

    @classmethod
    def train(cls, text: Union[str, Iterable[str]], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> "BPETokenizer":
        """Learn ``vocab_size`` tokens (256 bytes + ``<|endoftext|>`` + merges) from ``text``."""
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

        minimum = 256 + 1
        if vocab_size < minimum:
            raise TokenizerError(
                f"BPE vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
                f"(256 bytes + {EOT}); use a larger vocab size"
            )
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        pieces = split_for_encoding(text) if isinstance(text, str) else text
        backend.train_from_iterator(pieces, trainer=trainer)
        if backend.get_vocab_size() <= 1:
            raise TokenizerError("cannot train a BPE tokenizer on an empty text")
        return cls(backend)

    @classmethod
    def load(cls, directory_or_file: PathLike) -> "BPETokenizer":
        """Read a ``tokenizer.json`` (ours or a Hugging Face one), given the file or its folder."""
        path = Path(directory_or_file)
        return cls(read_tokenizer_json(path / cls.FILE if path.is_dir() else path, "the BPE tokenizer"))


# --------------------------------------------------------------------------- gpt2


def _ranks_from_gpt2_files(merges_text: str, vocab: dict[str, int], where: str) -> dict[bytes, int]:
    """GPT-2's merge ranks from its two files, as ``tiktoken.load.data_gym_to_mergeable_bpe_ranks``.

    Same result as tiktoken's function; done here because that function reads through
    tiktoken's download cache, which keeps a copy of a local file under its path's name (a
    later edit of the file would be shadowed) and drops the last merge when the file lacks
    a final newline. Ranks: the 256 bytes in GPT-2's order, then one per merge line.
    """
    decode = unicode_to_bytes()

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(decode[ch] for ch in token)
        except KeyError:
            raise TokenizerError(f"{where}: {token!r} is not spelled in GPT-2's byte alphabet") from None

    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    for line_no, line in enumerate(merges_text.split("\n"), start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{where}: merges line {line_no} should be two tokens, got {line!r}")
        ranks.setdefault(to_bytes(parts[0]) + to_bytes(parts[1]), len(ranks))

    expected = {to_bytes(k): v for k, v in vocab.items() if k not in (EOT, "<|startoftext|>")}
    if expected != ranks:
        raise TokenizerError(
            f"{where}: the vocabulary's ids do not follow the merges' order ({len(expected)} tokens "
            f"vs {len(ranks)} from the merges); the two files must come from the same GPT-2-style tokenizer"
        )
    return ranks


def tiktoken_cache_dir() -> Path:
    """The folder tiktoken caches downloads in: $TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or <tmp>/data-gym-cache."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def find_gpt2_files(directory: Optional[PathLike] = None, run_dir: Optional[PathLike] = None) -> tuple[Path, Path]:
    """(merges file, vocabulary file) of GPT-2's tokenizer, from the first place that has both.

    Looks in: ``directory``, ``run_dir``, ``$LLMSCRATCH_GPT2_DIR``, then tiktoken's cache
    (files named by the SHA-1 of their download address, as ``tiktoken.get_encoding("gpt2")``
    leaves them). Raises TokenizerError saying where to put the files if none has them.
    """
    looked: list[str] = []
    candidates = [d for d in (directory, run_dir, os.environ.get(GPT2_ENV) or None) if d]
    for d in candidates:
        d = Path(d)
        for merges, vocab in GPT2_FILE_PAIRS:
            if (d / merges).is_file() and (d / vocab).is_file():
                return d / merges, d / vocab
        looked.append(str(d))
    cache = tiktoken_cache_dir()
    cached = [cache / hashlib.sha1(GPT2_URLS[name].encode()).hexdigest() for name in ("vocab.bpe", "encoder.json")]
    if all(p.is_file() for p in cached):
        return cached[0], cached[1]
    looked.append(f"{cache} (tiktoken's cache)")
    raise TokenizerError(
        "GPT-2's tokenizer files were not found (this tool never downloads at run time). Looked in: "
        + "; ".join(looked)
        + f". Put vocab.bpe and encoder.json (OpenAI's names) or merges.txt and vocab.json "
        f"(Hugging Face's names) in one folder and set {GPT2_ENV}=/that/folder"
        + (f" (or put them in {run_dir})" if run_dir else "")
        + f". Get them from {GPT2_URLS['vocab.bpe']} and {GPT2_URLS['encoder.json']}, or from "
        f"{GPT2_HF_PAGE}; or run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once while "
        f"online to fill tiktoken's cache ({cache})."
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE, encoded by `tiktoken` from local files.

    Built from the two files GPT-2 ships (merges and vocabulary; see :func:`find_gpt2_files`)
    with the standard GPT-2 regex; ``<|endoftext|>`` is the vocabulary's own id for it (50256
    for the real files), else the next id after the merges. ``save`` copies both files.
    """

    kind = "gpt2"
    FILES = ("vocab.bpe", "encoder.json")

    def __init__(self, merges_text: str, vocab_text: str, where: str = "GPT-2 files"):
        import tiktoken

        try:
            vocab = json.loads(vocab_text)
        except ValueError as e:
            raise TokenizerError(f"{where}: the vocabulary is not valid JSON: {e}") from e
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
            raise TokenizerError(f"{where}: the vocabulary must be a JSON object of tokens and their integer ids, "
                                 "as GPT-2's encoder.json")
        ranks = _ranks_from_gpt2_files(merges_text, vocab, where)
        self.eot_id = vocab.get(EOT, len(ranks))
        if self.eot_id != len(ranks):  # an id in the merges' range, or past a gap that no id could decode
            raise TokenizerError(f"{where}: {EOT} has the id {self.eot_id}; it must come right after the "
                                 f"{len(ranks)} tokens of the merges (id {len(ranks)}, as in GPT-2)")
        self.merges_text, self.vocab_text = merges_text, vocab_text
        self.encoding = tiktoken.Encoding(
            name=f"llmscratch-gpt2-{len(ranks)}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self.eot_id},
        )
        self.vocab_size = self.encoding.n_vocab

    @classmethod
    def from_files(cls, merges_file: PathLike, vocab_file: PathLike) -> "GPT2Tokenizer":
        """Build from GPT-2's merges (``vocab.bpe``) and vocabulary (``encoder.json``) files."""
        merges_file, vocab_file = Path(merges_file), Path(vocab_file)
        try:
            merges_text = merges_file.read_text(encoding="utf-8")
            vocab_text = vocab_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read GPT-2's tokenizer files {merges_file}, {vocab_file}: {e}") from e
        return cls(merges_text, vocab_text, where=f"{merges_file} + {vocab_file.name}")

    @classmethod
    def find(cls, directory: Optional[PathLike] = None, run_dir: Optional[PathLike] = None) -> "GPT2Tokenizer":
        """Load from the first folder that has the files (see :func:`find_gpt2_files`)."""
        return cls.from_files(*find_gpt2_files(directory, run_dir))

    def encode(self, text: str) -> list[int]:
        check_utf8(text)  # tiktoken would replace what is not UTF-8 with U+FFFD, silently
        return self.encoding.encode(text, allowed_special={EOT}, disallowed_special=())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        check_utf8_batch(texts)
        return self.encoding.encode_batch(texts, allowed_special={EOT}, disallowed_special=())

    def _decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i != self.eot_id:
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
        return lengths

    def _save_files(self, directory: Path) -> dict:
        write_text_atomic(directory / "vocab.bpe", self.merges_text)
        write_text_atomic(directory / "encoder.json", self.vocab_text)
        return {}


# --------------------------------------------------------------------------- build / load


def build_tokenizer(
    kind: str,
    text: Union[str, Iterable[str], None] = None,
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
    gpt2_dir: Optional[PathLike] = None,
    run_dir: Optional[PathLike] = None,
) -> Tokenizer:
    """A new tokenizer: "char" and "bpe" learn from ``text``; "gpt2" reads GPT-2's files.

    ``vocab_size`` is for "bpe" only. ``gpt2_dir`` and ``run_dir`` are the first places
    searched for GPT-2's files (then $LLMSCRATCH_GPT2_DIR and tiktoken's cache).
    """
    if kind == "gpt2":
        return GPT2Tokenizer.find(gpt2_dir, run_dir)
    if kind == "hf":
        raise TokenizerError("the hf tokenizer is a pretrained model's own: read it from the model's Hugging Face "
                             "folder or GGUF file (PretrainedTokenizer.from_hf_dir / from_gguf_metadata), not built; "
                             f"to build one choose {', '.join(BUILDABLE_KINDS)}")
    if kind not in BUILDABLE_KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(BUILDABLE_KINDS)}")
    if text is None:
        raise TokenizerError(f"the {kind} tokenizer is trained on text: pass the corpus text")
    if kind == "char":
        return CharTokenizer.from_text(text)
    return BPETokenizer.train(text, vocab_size=vocab_size)


# The files each kind's save() writes beside tokenizer_config.json.
KIND_FILES = {"char": (CharTokenizer.FILE,), "bpe": (BPETokenizer.FILE,), "gpt2": GPT2Tokenizer.FILES,
              "hf": (PretrainedTokenizer.FILE,)}


def _check_kind_files(directory: Path, kind: object) -> None:
    """Raise a TokenizerError naming the files of ``kind`` missing from ``directory`` and what to do."""
    files = KIND_FILES.get(kind) if isinstance(kind, str) else None
    missing = [directory / name for name in files or () if not (directory / name).is_file()]
    if missing:
        names = " and ".join(map(str, missing))
        raise TokenizerError(
            f"{names} {'is' if len(missing) == 1 else 'are'} missing: {directory / CONFIG_FILE} "
            f"says the tokenizer is {kind!r}, whose vocabulary is kept in {' + '.join(files)}; copy the tokenizer's "
            f"files ({', '.join(files)}, {CONFIG_FILE}) into {directory} from the run it came from, or train or "
            "import the run again")


def load_tokenizer(directory: PathLike) -> Tokenizer:
    """Read a tokenizer back from a directory.

    A directory written by :meth:`Tokenizer.save` (it has ``tokenizer_config.json``), or a
    Hugging Face GPT-2 directory: ``vocab.json`` + ``merges.txt`` give a "gpt2" tokenizer,
    ``tokenizer.json`` alone a "bpe" one. A pretrained model's Hugging Face folder (Llama,
    Qwen, SmolLM2) is read with its special tokens and chat template by
    ``PretrainedTokenizer.from_hf_dir``; here it would be a plain "bpe" tokenizer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {directory}")
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise TokenizerError(f"{config_path} is not valid JSON: {e}") from e
        # A Hugging Face tokenizer_config.json has no "kind" of ours: then go by its files below.
        kind = config.get("kind") if isinstance(config, dict) else None
        _check_kind_files(directory, kind)
        if kind == "char":
            return CharTokenizer.load(directory)
        if kind == "bpe":
            return BPETokenizer.load(directory)
        if kind == "gpt2":
            return GPT2Tokenizer.from_files(directory / "vocab.bpe", directory / "encoder.json")
        if kind == "hf":
            return PretrainedTokenizer.from_hf_dir(directory)
        if kind is not None:
            raise TokenizerError(f"{config_path}: unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    for merges, vocab in GPT2_FILE_PAIRS:
        if (directory / merges).is_file() and (directory / vocab).is_file():
            return GPT2Tokenizer.from_files(directory / merges, directory / vocab)
    if (directory / BPETokenizer.FILE).is_file():
        return BPETokenizer.load(directory)
    raise TokenizerError(
        f"no tokenizer in {directory}: expected {CONFIG_FILE} (a run directory), or Hugging Face "
        f"GPT-2 files (vocab.json + merges.txt, or tokenizer.json)"
    )
