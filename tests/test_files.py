"""files.py: a write is whole or absent, whatever fails, and the file gets open()'s usual mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmscratch.files import default_file_mode, write_atomic, write_text_atomic


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the last good checkpoint")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half of the ne")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"the last good checkpoint"
    assert leftovers(tmp_path) == []


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
