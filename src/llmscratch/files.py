"""Files written whole or not at all.

Every file this project writes — weights, optimizer state, tokenizers, token caches, configs,
metrics, reports, plots — goes through :func:`write_atomic`: the content is written to a
temporary file in the same folder, flushed to disk, then renamed over the target. A rename
within one file system is atomic, so a crash, a full disk or Ctrl-C at any moment leaves
either the previous file or the new one, never half of one: the last good checkpoint
survives whatever happens to the next.

A full disk is said as such (:class:`DiskFullError`: the folder, the space the write needed
and the space free), whatever the library's writer made of it: safetensors and the OS name
it, but ``torch.save`` reports only a failed zip record, so a write that fails with less
space free than its expected size counts as one too.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import LLMScratchError

PathLike = Union[str, "os.PathLike[str]"]

# How each writer says "disk full": the OS (ENOSPC, EDQUOT over a quota), safetensors' Rust
# ("No space left on device (os error 28)"), "Disk quota exceeded (os error 122)".
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_WORDS = re.compile(r"no space left on device|disk quota exceeded|storagefull|os error (28|122)\b", re.I)


class DiskFullError(LLMScratchError, OSError):
    """No room on the disk for a write; the files already there are unchanged.

    ``folder``: where the write was going; ``needed``: the bytes it needed (an estimate, None
    when unknown); ``free``: the bytes free there after the failed write was removed (None when
    the system cannot say). An OSError too, so code that handles a failed write still does.
    """

    def __init__(self, message: str, folder: Path, needed: Optional[int], free: Optional[int]):
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.folder, self.needed, self.free = folder, needed, free

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..."
        return str(self.args[0])


def decode_utf8(data: bytes, where: str, error: type[LLMScratchError] = LLMScratchError) -> str:
    """``data`` (a file's bytes) as text, a byte-order mark dropped; bytes that are not UTF-8 raise
    ``error`` naming ``where`` (the file, or the option that gave it), the line and the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{where}, line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                    "save it as UTF-8") from None


def human_bytes(n: int) -> str:
    """``1.2 MB``, ``340 kB``, ``12 bytes``: a size as people read it (powers of 1000, as ``df -H``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} byte{'s' if n != 1 else ''}"


def free_bytes(folder: PathLike) -> Optional[int]:
    """The bytes free for this user in ``folder``'s file system (``shutil.disk_usage``), or None."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(err: BaseException, folder: PathLike, needed: Optional[int] = None) -> bool:
    """Whether ``err``, raised by a write into ``folder``, means the disk (or the user's quota) is full.

    Said by the error itself (its errno or its words, on it or on what caused it), or else
    inferred: the write failed and less than ``needed`` bytes are free (``torch.save`` says only
    ``unexpected pos`` when its zip writer runs out of room).
    """
    seen: BaseException | None = err
    for _ in range(8):  # the error and what caused it, a few deep
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if _FULL_WORDS.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    if needed is None or not isinstance(err, Exception):
        return False
    free = free_bytes(folder)
    return free is not None and free < needed


def disk_full_error(folder: PathLike, what: str, needed: Optional[int], after: str = "") -> DiskFullError:
    """The one-line error for a write that found the disk full: ``folder``, what needed how much, what is free.

    ``what``: what was being written (``"model.safetensors"``, ``"the checkpoint of step 40"``);
    ``after``: what to add after the numbers (what was kept, how to go on); by default, that
    the files there are unchanged and the command can be run again once space is freed.
    """
    folder = Path(folder)
    free = free_bytes(folder)
    if needed is not None and free is not None:
        numbers = f"{what} needs about {human_bytes(needed)} there and {human_bytes(free)} are free"
        if needed > free:
            numbers += f": free at least {human_bytes(needed - free)} (delete old runs or other files)"
        else:
            numbers += " now (something else may have filled it meanwhile): free some space"
    elif free is not None:
        numbers = (f"{what} did not fit and {human_bytes(free)} are free: free some space (delete old runs or "
                   "other files)")
    else:
        numbers = f"{what} did not fit: free some space (delete old runs or other files)"
    after = after or "the files already there are unchanged; run the command again once there is room"
    return DiskFullError(f"{folder}: the disk is full (no space left on device): {numbers}; {after}",
                         folder, needed, free)


def write_atomic(path: PathLike, write: Callable[[str], None], size: Optional[int] = None) -> None:
    """Create ``path`` through ``write(temporary_name)``, then fsync and rename it into place.

    ``write`` gets a file name, so any library's own writer can be used (``torch.save``,
    safetensors' ``save_file``, ``numpy.ndarray.tofile``, matplotlib's ``savefig``). If
    anything fails, the temporary file is removed and ``path`` keeps its previous content.
    The new file gets the mode ``open()`` would give it (0644 under umask 022), not the 0600
    of the private temporary file. ``size``: the bytes the file is expected to take (an
    estimate), so that a full disk is recognised and said with the space needed
    (:class:`DiskFullError`) whatever the writer raised.
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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)  # first: the space it took counts as free below
        if not isinstance(err, DiskFullError) and is_disk_full(err, path.parent, size):
            raise disk_full_error(path.parent, path.name, size) from err
        raise
    sync_directory(path.parent)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write a UTF-8 text file so that a crash leaves either the old file or the new one, never half."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:  # the text as given, "\n" on every system
            f.write(text)

    write_atomic(path, write, size=len(text.encode("utf-8")))


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
