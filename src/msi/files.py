"""Writing beside, then renaming: the one way every msi tool writes an output file (the bottom floor: it imports
only ``msi.errors``).

One naming: a file (or a staging folder) is written as ``.<name>.tmp-<pid>-<hex>`` beside its target
(``temporary_path``; ``is_temporary`` knows the leftovers of an interrupted write) and renamed over the target when
complete, so the target always holds one whole output.

One policy (``check_replace``): a path that already holds something is replaced only when it is a regular file
this tool wrote before (the caller's ``ours`` test, which looks at the file) or the user passed the tool's explicit
overwrite flag; a folder, a device, a pipe, or a file of someone else's is never written over.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from msi.errors import MSIError, shown

Ours = Callable[[Path], bool]  # whether the file at a path is one this tool wrote


def owned(path: Path) -> bool:
    """``ours`` for a path inside a folder the tool owns and has checked (a locked run directory, a sweep folder):
    every file there under the names it writes is its own."""
    return True


def temporary_path(path: str | Path) -> Path:
    """Where ``path`` is written before the rename: ``.<name>.tmp-<pid>-<random hex>`` beside it, a name no other
    writer of ``path`` (another process, or another thread of this one) picks."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    """A name ``temporary_path`` gives: what an interrupted write leaves behind."""
    return name.startswith(".") and ".tmp-" in name


def check_file_name(path: str | Path, what: str = "file") -> Path:
    """``path`` as a Path, refused with one line when no file can have that name (a NUL byte, an empty name)."""
    text = os.fspath(path)
    if "\0" in text:
        raise MSIError(f"{shown(text)}: a {what} name cannot hold a NUL byte")
    if not text.strip():
        raise MSIError(f"an empty {what} name")
    return Path(text)


def check_name(name: str, what: str, error: type[MSIError] = MSIError) -> str:
    """``name`` when it can be one file or folder name inside another folder; else one ``error`` line: empty,
    ``.``, ``..``, a separator or a NUL byte (a name that would reach outside its folder, or cannot exist)."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise error(f"{what} {shown(name)} must be a plain folder name (not empty, '.' or '..', no '/', "
                    "'\\' or NUL byte)")
    return name


def check_replace(path: str | Path, ours: Ours, tool: str, flag: str | None = None, overwrite: bool = False) -> None:
    """Refuse to write ``path`` unless it is new, or a regular file that ``ours`` recognises (or ``overwrite``, the
    user's ``flag``); its folder, when it exists, must be a folder. Called before any slow work."""
    path = check_file_name(path)
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise MSIError(f"{path}: {folder} is a file, not a folder")
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise MSIError(f"{path}: is a folder, not a file: name the file to write")
    if not path.is_file():  # a device, a pipe, a dangling link: the rename would replace it, not write to it
        raise MSIError(f"{path}: is not a regular file; name a file to write")
    if overwrite or ours(path):
        return
    hint = f", or pass {flag} to replace it" if flag else ""
    raise MSIError(f"{path}: exists and was not written by {tool}: not written over; choose another file{hint}")


@contextmanager
def writing(path: str | Path, ours: Ours, tool: str, flag: str | None = None, overwrite: bool = False,
            error: type[MSIError] = MSIError, what: str = "") -> Iterator[Path]:
    """Check ``path`` (``check_replace``), yield the temporary path beside it to write, then fsync it and rename it
    over ``path``. On any OSError (a full disk) the temporary file goes and ``error`` names ``path``; whatever
    raises in the block, the file there before is kept."""
    path = Path(path)
    check_replace(path, ours, tool, flag, overwrite)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        the = f" the {what}" if what else ""
        raise error(f"{path}: could not write{the} ({e.strerror or e}); the earlier file, if any, is kept") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, ours: Ours = owned, tool: str = "msi", flag: str | None = None,
               overwrite: bool = False) -> None:
    """``text`` into ``path`` through ``writing`` (UTF-8)."""
    with writing(path, ours, tool, flag, overwrite) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)


def starts_with(prefix: bytes) -> Ours:
    """``ours`` for outputs recognised by their first bytes (a header line the tool always writes)."""
    def ours(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                return f.read(len(prefix) + 2).replace(b"\r", b"").startswith(prefix)
        except OSError:
            return False
    return ours

