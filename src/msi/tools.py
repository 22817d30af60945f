"""What every command-line tool shares (``msi.cli`` holds the tools): its parser, its stdout, its integer options,
and ``guard``, which turns every problem the user can fix into one ``error: ...`` line and an exit status (2; 130
for Ctrl-C or SIGTERM, which is handled as Ctrl-C is)."""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable

from msi import __version__
from msi.errors import Interrupted, MSIError, shown

Tool = Callable[[list[str] | None], int | None]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help names its default itself or the default is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def say(text: str, end: str = "\n") -> None:
    """Print to stdout; a failed write (a full disk, a closed pipe) is one line that names stdout."""
    try:
        sys.stdout.write(text + end)
        sys.stdout.flush()
    except OSError as e:
        raise MSIError(f"stdout: could not write the output ({e.strerror or e})") from None


def _short(line: str, limit: int = 1000) -> str:
    """An error line kept short whatever a value in it held (a message quotes values through msi.errors.shown;
    this is the floor beneath that): its start and its end, which says what to do."""
    return line if len(line) <= limit else f"{line[:limit - 300]} ... {line[-250:]}"


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM is handled as Ctrl-C: what was kept is said, the lock released


def guard(fn: Tool, argv: list[str] | None = None) -> int:
    """Run the tool ``fn`` on ``argv`` (None: the command line): its exit status, a problem as one line."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        return _run_tool(fn, argv)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run_tool(fn: Tool, argv: list[str] | None) -> int:
    try:
        for arg in sys.argv[1:] if argv is None else argv:
            if "\0" in arg:  # no file name, key or value can hold one (the OS would raise on the path)
                raise MSIError(f"argument {shown(arg)} holds a NUL byte")
        return fn(argv) or 0
    except Interrupted as e:
        print(f"error: {_short(str(e))}", file=sys.stderr)
        return 130
    except OSError as e:  # an unwritable output path, a full disk, a folder given as a file
        where = f"{shown(e.filename)}: " if e.filename else ""
        print(f"error: {where}{e.strerror or _short(str(e))}", file=sys.stderr)
        return 2
    except MSIError as e:
        print(f"error: {_short(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # torch: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError
        text = str(e).split("\n")[0]
        if not isinstance(e, MemoryError) and type(e).__name__ != "OutOfMemoryError" and "allocate memory" not in text:
            raise
        size = re.search(r"[Tt]ried to allocate ([\d.]+ \w+)", text)
        print(f"error: out of memory{f' (tried to allocate {size.group(1)})' if size else ''}: lower "
              "train.batch_size, eval.batch_users or model.embedding_dim", file=sys.stderr)
        return 2


def whole(flag: str, low: int = 0) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, 2**63 - 1], else one ``error:`` line naming ``flag``."""
    def parse(text: str) -> int:
        from msi.config import MAX_INT  # late: importing the config (and the models) slows every --help

        try:
            value = int(text)
        except ValueError:
            raise MSIError(f"{flag} {shown(text)}: expected a whole number") from None
        if not low <= value <= MAX_INT:
            raise MSIError(f"{flag} {shown(value)}: must be in [{low}, 2**63 - 1]")
        return value
    return parse
