"""A GGUF file's metadata (its key/value header) as plain Python values.

GGUF (llama.cpp's model file) starts with typed key/value pairs: the architecture and its
sizes (``llama.block_count`` …), the tokenizer (``tokenizer.ggml.tokens`` …) and the chat
template, before the tensors. :func:`gguf_metadata` returns them as a dict of ``str``, ``int``,
``float``, ``bool`` and lists of those, keyed by the GGUF key names, for the tokenizer
(``pretrained_tokenizer.PretrainedTokenizer.from_gguf_metadata``) and the weight importer.
The file is read by the `gguf` package (llama.cpp's own Python reader).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..errors import CheckpointError
from ..files import PathLike

if TYPE_CHECKING:
    import gguf


def open_gguf(path: PathLike) -> "gguf.GGUFReader":
    """The `gguf` package's reader of ``path`` (memory-mapped); CheckpointError if it is not a readable GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, a truncated header, an unknown value type …
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                              "check that the download is complete and that it is a GGUF model file") from e


def gguf_metadata(source: Union[PathLike, "gguf.GGUFReader"]) -> dict[str, Any]:
    """Every key/value of a GGUF file's header as Python values, keyed by GGUF key name.

    ``source``: the file's path, or a reader from :func:`open_gguf` (a caller that also reads
    the tensors opens the file once). Strings are decoded as UTF-8, numbers become ``int``,
    ``float`` or ``bool``, arrays become lists. The reader's own entries (``GGUF.version``,
    ``GGUF.tensor_count``, ``GGUF.kv_count``) are left out: they are not metadata.
    """
    reader = source if hasattr(source, "fields") else open_gguf(source)
    where = getattr(reader, "path", source)
    return {key: _value(field, key, where) for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _value(field: Any, key: str, where: Any) -> Any:
    """One field's Python value, from the reader's parts: ``field.data`` indexes the parts that hold values."""
    import gguf

    types = list(field.types)
    array = types[0] == gguf.GGUFValueType.ARRAY
    item = types[-1] if array else types[0]
    if array and len(types) > 2:
        raise CheckpointError(f"{where}: the metadata key {key} holds an array of arrays, which is not read here")
    parts = [field.parts[i] for i in field.data]
    if item == gguf.GGUFValueType.STRING:
        try:
            values = [bytes(part).decode("utf-8") for part in parts]
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{where}: the metadata key {key} holds a string that is not UTF-8 ({e})") from e
    else:
        values = [v for part in parts for v in part.tolist()]  # each part: a small numpy array
    if item == gguf.GGUFValueType.BOOL:
        values = [bool(v) for v in values]
    return values if array else values[0]
