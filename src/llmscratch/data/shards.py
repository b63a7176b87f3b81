"""A prepared folder's token shards read as one long array, memory-mapped, never loaded.

```
ShardedTokens(paths, counts, dtype)   len(), t[i], t[a:b], t.take(positions): reads only what is asked
load_prepared(folder)                 PreparedData: train / val ShardedTokens, index.json, tokenizer folder
is_prepared(folder)                   whether a folder holds an index.json written by `llmscratch prepare`
```

A window may start near the end of one shard and go on in the next: ``take`` maps each global
position to (shard, offset) with one ``searchsorted`` and reads each shard's part from its memory
map. The maps are opened lazily in the process that reads, so every rank of a torchrun job maps the
same files (the page cache holds them once) and copies only the windows it draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import CorpusError
from ..files import PathLike

INDEX_FILE = "index.json"
INDEX_FORMAT = "llmscratch-tokens"


class ShardedTokens:
    """Token ids stored in consecutive shard files, seen as one 1-D array of ``sum(counts)`` ids."""

    def __init__(self, paths: Sequence[PathLike], counts: Sequence[int], dtype: np.dtype | str):
        self.paths = [Path(p) for p in paths]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.dtype = np.dtype(dtype)
        self.ends = np.cumsum(self.counts)  # (n_shards,): global position just past each shard
        self.starts = self.ends - self.counts
        self._maps: list[Optional[np.ndarray]] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def size(self) -> int:
        return len(self)

    def _map(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(int(self.counts[i]),))
        return self._maps[i]  # type: ignore[return-value]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The ids at ``positions`` (any shape of global positions in [0, len)), same shape, this dtype."""
        positions = np.asarray(positions, dtype=np.int64)
        flat = positions.reshape(-1)  # (N,)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token positions must be in [0, {len(self)}), got {flat.min()}..{flat.max()}")
        shard = np.searchsorted(self.ends, flat, side="right")  # (N,): which shard holds each position
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            here = shard == s
            out[here] = self._map(int(s))[flat[here] - self.starts[s]]
        return out.reshape(positions.shape)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            return self.take(np.array([k]))[0]
        return self.take(np.asarray(key))

    def max(self) -> int:
        """The largest id (reads every shard once; for checks)."""
        return max((int(self._map(i).max()) for i in range(len(self.paths)) if self.counts[i]), default=0)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self):,} {self.dtype.name} tokens in {len(self.paths)} shards)"


@dataclass
class PreparedData:
    """A prepared folder: its two splits, its index and where its tokenizer is."""

    folder: Path
    index: dict[str, Any]
    train: ShardedTokens
    val: ShardedTokens

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.index["tokenizer"]["dir"]

    @property
    def fingerprint(self) -> str:
        """What the folder holds, in one hash: equal for equal inputs, tokenizer and settings."""
        return str(self.index["key"])


def is_prepared(folder: PathLike) -> bool:
    """Whether ``folder`` is a folder with an ``index.json`` written by ``llmscratch prepare``."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == INDEX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_prepared(folder: PathLike) -> PreparedData:
    """Open a prepared folder's shards (memory maps, opened when first read); CorpusError if it is
    unfinished or its shards are missing or of the wrong size."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read {path}: {e}; prepare the folder again with `llmscratch prepare`") from e
    if not index.get("complete"):
        raise CorpusError(f"{folder} is not finished preparing (its index says so); run the same `llmscratch prepare` "
                          "command again to finish it")
    dtype = np.dtype(index["dtype"])
    splits = []
    for name in ("train", "val"):
        shards = index[name]["shards"]
        for s in shards:
            f = folder / s["file"]
            want = int(s["tokens"]) * dtype.itemsize
            if not f.is_file() or f.stat().st_size != want:
                raise CorpusError(f"{f} is missing or not {want:,} bytes as {path} says; prepare the folder again")
        splits.append(ShardedTokens([folder / s["file"] for s in shards], [int(s["tokens"]) for s in shards], dtype))
    return PreparedData(folder, index, splits[0], splits[1])
