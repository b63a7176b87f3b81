"""Files written whole or not at all.

Every file this project writes — weights, optimizer state, tokenizers, token caches, configs,
metrics, reports, plots — goes through :func:`write_atomic`: the content is written to a
temporary file in the same folder, flushed to disk, then renamed over the target. A rename
within one file system is atomic, so a crash, a full disk or Ctrl-C at any moment leaves
either the previous file or the new one, never half of one: the last good checkpoint
survives whatever happens to the next.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_atomic(path: PathLike, write: Callable[[str], None]) -> None:
    """Create ``path`` through ``write(temporary_name)``, then fsync and rename it into place.

    ``write`` gets a file name, so any library's own writer can be used (``torch.save``,
    safetensors' ``save_file``, ``numpy.ndarray.tofile``, matplotlib's ``savefig``). If
    anything fails, the temporary file is removed and ``path`` keeps its previous content.
    The new file gets the mode ``open()`` would give it (0644 under umask 022), not the 0600
    of the private temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a UTF-8 text file so that a crash leaves either the old file or the new one, never half."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text as given, "\n" on every system
            f.write(text)

    write_atomic(path, write)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def sync_directory(directory: PathLike) -> None:
    """Persist renames in ``directory`` (POSIX fsync of the folder); a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
