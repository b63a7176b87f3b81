"""files.py: a write is whole or absent, whatever fails, and the file gets open()'s usual mode."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmscratch import files
from llmscratch.errors import LLMScratchError
from llmscratch.files import DiskFullError, default_file_mode, write_atomic, write_text_atomic


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the last good checkpoint")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the ne")
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error") as err:
        write_atomic(target, half_then_fail)
    assert not isinstance(err.value, DiskFullError)  # only a full disk is said to be one
    assert target.read_bytes() == b"the last good checkpoint"
    assert leftovers(tmp_path) == []


def _free(n: int):
    """A stand-in for shutil.disk_usage: a disk with ``n`` bytes free."""
    return lambda path: SimpleNamespace(total=10**12, used=10**12 - n, free=n)


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),  # the OS, numpy's tofile, open().write
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save
])
def test_a_full_disk_names_the_folder_and_the_space_needed_and_keeps_the_previous_file(tmp_path, monkeypatch, raised):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the last good checkpoint")
    monkeypatch.setattr(files.shutil, "disk_usage", _free(1_200_000))

    def fill_the_disk(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the ne")
        raise raised

    with pytest.raises(DiskFullError) as err:
        write_atomic(target, fill_the_disk, size=5_000_000)
    message = str(err.value)
    assert message == (f"{tmp_path}: the disk is full (no space left on device): model.bin needs about 5.0 MB there "
                       "and 1.2 MB are free: free at least 3.8 MB (delete old runs or other files); the files already "
                       "there are unchanged; run the command again once there is room")
    assert isinstance(err.value, LLMScratchError) and isinstance(err.value, OSError)  # the CLI says it in one line
    assert (err.value.folder, err.value.needed, err.value.free) == (tmp_path, 5_000_000, 1_200_000)
    assert target.read_bytes() == b"the last good checkpoint" and leftovers(tmp_path) == []


def test_a_failure_that_the_space_left_explains_is_not_taken_for_a_full_disk_when_there_is_room(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", _free(10**9))

    def fail(tmp: str) -> None:
        raise RuntimeError("unexpected pos 576 vs 534")

    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        write_atomic(tmp_path / "state.pt", fail, size=5_000_000)
    assert not isinstance(err.value, DiskFullError)


def test_ctrl_c_during_a_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def interrupted(tmp: str) -> None:
        Path(tmp).write_bytes(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, interrupted)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_successful_write_replaces_the_file_with_exactly_the_new_content(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    text = "line one\r\nline two\nπ ≈ 3.14159\n"
    write_text_atomic(target, text)
    assert target.read_bytes() == text.encode("utf-8")  # no newline translation, UTF-8
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_open_would_give_it_not_the_temporary_files_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "written.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
        with open(tmp_path / "opened.bin", "wb") as f:
            f.write(b"x")
        assert default_file_mode() == 0o666 & ~umask
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "written.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "opened.bin").stat().st_mode) == 0o666 & ~umask


def test_a_missing_folder_is_reported_with_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        write_text_atomic(tmp_path / "nowhere" / "file.txt", "x")
