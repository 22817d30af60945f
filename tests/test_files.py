"""msi/files.py: write beside, then rename; one policy for what may be replaced; names no file can have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from msi.errors import MSIError
from msi.files import check_name, check_replace, is_temporary, starts_with, temporary_path, write_text, writing


def only_file(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two" and only_file(tmp_path) == ["results.json"]


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_a_failed_write_names_the_file_keeps_the_old_one_and_removes_its_temporary(tmp_path, monkeypatch, fails):
    path = tmp_path / "results.json"
    path.write_text("old")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fails, disk_full)
    with pytest.raises(MSIError, match=f"^{path}: could not write \\(No space left on device\\)"):
        write_text(path, "new")
    assert path.read_text() == "old" and only_file(tmp_path) == ["results.json"]


def test_temporary_names_are_unique_beside_the_target_and_known_as_leftovers(tmp_path):
    a, b = temporary_path(tmp_path / "best.pt"), temporary_path(tmp_path / "best.pt")
    assert a != b and a.parent == tmp_path and a.name.startswith(f".best.pt.tmp-{os.getpid()}-")
    assert is_temporary(a.name) and is_temporary(".last.pt.tmp-1")
    assert not is_temporary("last.pt") and not is_temporary(".lock")


def test_only_a_file_the_tool_wrote_is_replaced_unless_the_flag_says_so(tmp_path):
    ours = starts_with(b"# mine\n")
    write_text(tmp_path / "a.md", "# mine\nold\n", ours, "tool")
    write_text(tmp_path / "a.md", "# mine\nnew\n", ours, "tool")  # its own earlier output
    assert (tmp_path / "a.md").read_text() == "# mine\nnew\n"
    (tmp_path / "notes.md").write_text("someone's notes")
    with pytest.raises(MSIError, match=f"^{tmp_path / 'notes.md'}: exists and was not written by tool: not written "
                                       "over; choose another file, or pass --force to replace it$"):
        write_text(tmp_path / "notes.md", "# mine\n", ours, "tool", "--force")
    assert (tmp_path / "notes.md").read_text() == "someone's notes"
    write_text(tmp_path / "notes.md", "# mine\n", ours, "tool", "--force", overwrite=True)
    assert (tmp_path / "notes.md").read_text() == "# mine\n"
    with pytest.raises(MSIError, match=f"^{tmp_path}: is a folder, not a file"):
        check_replace(tmp_path, ours, "tool", overwrite=True)  # never a folder, flag or not
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(MSIError, match="is not a regular file"):
        check_replace(tmp_path / "pipe", ours, "tool", overwrite=True)
    with pytest.raises(MSIError, match=f"{tmp_path / 'a.md'} is a file, not a folder"):
        check_replace(tmp_path / "a.md" / "x.md", ours, "tool")


def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(ValueError):
        with writing(tmp_path / "out.txt", lambda _: True, "tool") as tmp:
            tmp.write_text("half")
            raise ValueError("the writer failed")
    assert (tmp_path / "out.txt").read_text() == "old" and only_file(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "a\0b"])
def test_a_name_that_cannot_be_one_folder_name_is_refused(name):
    with pytest.raises(MSIError, match="must be a plain folder name"):
        check_name(name, "run name")
    assert check_name("run-1", "run name") == "run-1"


def test_a_path_holding_a_nul_byte_is_one_line(tmp_path):
    with pytest.raises(MSIError, match="a file name cannot hold a NUL byte"):
        write_text(f"{tmp_path}/a\0b.txt", "x")
