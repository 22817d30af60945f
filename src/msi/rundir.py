"""A run directory's files, in one place: their names, atomic writes, the lock, and tolerant readers.

One rule for a damaged file: a reader raises ``DamagedRunFile`` naming the file (and line) and what is wrong; a
caller that can go on (a sweep, a resume) treats the run as unfinished and says so. A missing results.json or
env.json is None (not finished yet, or written by an older msi), missing metrics.jsonl is no rows, a missing
config.yaml is an error. A last metrics line without its newline is what a crash mid-write leaves: every reader
skips it, and a resume drops it.

``metrics.jsonl`` rows name their loss terms: ``{"loss": 1.2, "rec": 0.7, ..., "epoch": 3, ..., "terms": ["loss",
"rec", ...]}``; ``env.json`` keeps the first run's record and one per resume: ``{"first": {...}, "resumes": [...]}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from msi.config import Config, load_config
from msi.errors import ConfigError, MSIError, read_utf8, shown
from msi.files import is_temporary, write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second process
    fcntl = None

CONFIG, METRICS, RESULTS, ENV, LOG = "config.yaml", "metrics.jsonl", "results.json", "env.json", "train.log"
BEST, LAST, TENSORBOARD, STOPPED, LOCK = "best.pt", "last.pt", "tensorboard", "stopped.json", ".lock"
RUN_FILES = (CONFIG, METRICS, BEST, LAST, RESULTS, ENV, LOG, TENSORBOARD, STOPPED)
RESULT_KEYS = ("best_epoch", "epochs_run", "valid", "test", "train_seconds", "selected_by", "run_dir")


class DamagedRunFile(MSIError):
    """A run directory's file is truncated, not JSON, holds NaN metrics or misses keys; the message names it."""


# ---------------------------------------------------------------- writing


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_config(run_dir: Path, cfg: Config) -> None:
    write_text(run_dir / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    write_json(run_dir / RESULTS, results)


def append_metrics(run_dir: Path, row: dict[str, Any], terms: list[str]) -> None:
    """Append one epoch's row, naming its loss terms (``terms``, keys of ``row``) in the row itself."""
    missing = [t for t in terms if t not in row]
    if missing:
        raise ValueError(f"loss terms {missing} are not in the row")
    _append(run_dir / METRICS, json.dumps({**row, "terms": list(terms)}) + "\n")


def append_log(run_dir: Path, line: str) -> None:
    """Append one console line to ``train.log``, after the time it was written."""
    _append(run_dir / LOG, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise MSIError(f"{path}: could not append ({e.strerror or e})") from None


def record_env(run_dir: Path, record: dict[str, Any], resumed: bool) -> None:
    """env.json: a new run's ``record`` is ``first``; a resume's is appended to ``resumes`` (``first`` is None when
    the directory held no record)."""
    if resumed:
        old = read_env(run_dir) or {"first": None, "resumes": []}
        env = {"first": old["first"], "resumes": [*old["resumes"], record]}
    else:
        env = {"first": record, "resumes": []}
    write_json(run_dir / ENV, env)


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``, None when there is no such file; ``DamagedRunFile`` when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(read_utf8(path, DamagedRunFile))
    except ValueError as e:
        raise DamagedRunFile(f"{path}: damaged, not JSON ({e})") from None


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """results.json, or None when there is none (the run has not finished); ``DamagedRunFile`` when it is not a
    JSON object with every key of ``RESULT_KEYS``, finite valid and test metrics and a whole best_epoch."""
    path = Path(run_dir) / RESULTS
    results = _read_json(path)
    if results is None:
        return None
    problem = _results_problem(results)
    if problem:
        raise DamagedRunFile(f"{path}: damaged, {problem}")
    return results


def _results_problem(results: Any) -> str | None:
    if not isinstance(results, dict):
        return "not a JSON object"
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        return f"missing {', '.join(missing)}"
    for key in ("best_epoch", "epochs_run"):
        if not isinstance(results[key], int) or isinstance(results[key], bool):
            return f"{key} is {shown(results[key])}, not a whole number"
    for split in ("valid", "test"):
        metrics = results[split]
        if not isinstance(metrics, dict):
            return f"{split} is not a mapping of metric to number"
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return f"{split} {name} is {shown(value)}, not a finite number"
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl in order (none when it is missing); a last line without its newline is skipped."""
    return [row for _, row in _metric_lines(Path(run_dir) / METRICS)]


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        return []
    text = read_utf8(path, DamagedRunFile)
    out = []
    for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DamagedRunFile(f"{path}:{number}: damaged, not a JSON row ({shown(line[:40])})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise DamagedRunFile(f"{path}:{number}: damaged, a row without its epoch ({shown(line[:40])})")
        out.append((line, row))
    return out


def truncate_metrics(run_dir: Path, epoch: int) -> int:
    """Keep the rows up to ``epoch`` (what last.pt holds) and drop later rows and a partial last line, written
    after the checkpoint a run resumes from; returns how many lines were dropped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    lines = _metric_lines(path)
    kept = [line for line, row in lines if row["epoch"] <= epoch]
    total = len(path.read_bytes().splitlines())
    if len(kept) != total:
        write_text(path, "".join(line + "\n" for line in kept))
    return total - len(kept)


def improves(value: Any, best: float) -> bool:
    """The trainer's rule for a better valid metric: a number strictly above the best so far (NaN, null or a tie
    never is); the best epoch is the first to reach the best value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > best


def finite(value: Any) -> bool:
    """Whether a metrics row's value is a finite number (not NaN, inf, null or text)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_terms(row: dict[str, Any]) -> list[str]:
    """The loss terms of a metrics row, as the row names them (``terms``). Rows written before msi named them
    (no ``terms``) held the terms first, before ``epoch``."""
    if "terms" in row:
        return list(row["terms"])
    keys = list(row)
    return keys[: keys.index("epoch")] if "epoch" in keys else []


def read_config(run_dir: Path) -> Config:
    """config.yaml through msi.config's loader (validated); an error names the file."""
    path = Path(run_dir) / CONFIG
    try:
        return load_config(path)
    except ConfigError as e:
        raise ConfigError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def read_env(run_dir: Path) -> dict[str, Any] | None:
    """env.json as ``{"first": {...}, "resumes": [...]}``, or None when there is none (an older msi wrote one record,
    read as ``first``)."""
    path = Path(run_dir) / ENV
    env = _read_json(path)
    if env is None:
        return None
    if not isinstance(env, dict):
        raise DamagedRunFile(f"{path}: damaged, not a JSON object")
    if "first" not in env and "resumes" not in env:
        return {"first": env, "resumes": []}
    if not isinstance(env.get("resumes"), list):
        raise DamagedRunFile(f"{path}: damaged, resumes is not a list")
    return env


def read_log(run_dir: Path, start: int = 0) -> tuple[str, int]:
    """The complete lines of train.log from byte ``start``, and the byte offset after them (to read on from)."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return "", start
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    return data.decode("utf-8", errors="replace"), start + len(data)


# ---------------------------------------------------------------- the directory


@contextmanager
def locked(run_dir: Path, tool: str = "msi-train",
           advice: str = "wait for it to end or choose another --out") -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` while the run lives (its pid inside); the OS drops it when the
    process dies, and the file is removed when the block ends, with ``run_dir`` itself when this call made it and it is
    still empty (a refused run leaves no folder behind). A second live process is refused (the error says it
    is another ``tool``, and what to do: ``advice``; msi-sweep locks its sweep folder the same way)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    while True:
        f = open(path, "a+")
        if fcntl is None:
            break
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise MSIError(f"{run_dir}: in use by another live {tool} process (pid {pid}); {advice}") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # its holder removed the file as it ended, after this process opened it: lock the new one
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: no other process can have locked this file
        f.close()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()


def lock_holder(run_dir: Path) -> str | None:
    """The pid written in ``run_dir/.lock`` while a live process holds it (as ``locked`` does), else None."""
    if fcntl is None:
        return None
    try:
        f = open(Path(run_dir) / LOCK)
    except OSError:  # no lock file, or no directory there
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files of interrupted writes; returns them."""
    gone = [p for p in run_dir.iterdir() if is_temporary(p.name)]
    for p in gone:
        p.unlink()
    return gone


def unstarted_run(run_dir: Path) -> list[str] | None:
    """The files of a run that ended before its first epoch's row (only config.yaml, an empty metrics.jsonl,
    env.json, train.log, tensorboard/; none is fine too), by name; None when ``run_dir`` holds anything else."""
    names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    metrics = run_dir / METRICS
    if any(n not in (CONFIG, METRICS, ENV, LOG, TENSORBOARD) for n in names) or (
            metrics.is_file() and metrics.stat().st_size > 0):
        return None
    return names


def remove_files(run_dir: Path, names: list[str]) -> None:
    """Remove the run files ``names`` (``check_new_run_dir``'s or ``unstarted_run``'s) from ``run_dir``."""
    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_new_run_dir(run_dir: Path, overwrite: bool) -> list[str]:
    """The names of the files a new run in ``run_dir`` removes (``remove_files``) before it starts: none in an
    empty directory. Files there are refused unless ``overwrite`` or they are an unstarted run's
    (``unstarted_run``); files msi-train did not write are always refused."""
    present = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if present and not overwrite and unstarted_run(run_dir) is None:
        raise MSIError(f"{run_dir}: already holds {', '.join(present)}; pass --resume {run_dir} to continue that "
                       "run, or --overwrite to start over")
    foreign = [n for n in present if n not in RUN_FILES and not is_temporary(n)]
    if foreign:
        raise MSIError(f"{run_dir}: holds files msi-train did not write ({', '.join(foreign)}); --overwrite "
                       "removes only run files: choose another --out")
    return present
