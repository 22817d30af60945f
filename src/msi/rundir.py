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
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from msi.config import Config, config_from_dict, load_config, parse_overrides
from msi.errors import ConfigError, MSIError, read_utf8

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second process
    fcntl = None

CONFIG, METRICS, RESULTS, ENV, LOG = "config.yaml", "metrics.jsonl", "results.json", "env.json", "train.log"
BEST, LAST, TENSORBOARD, STOPPED, LOCK = "best.pt", "last.pt", "tensorboard", "stopped.json", ".lock"
RUN_FILES = (CONFIG, METRICS, BEST, LAST, RESULTS, ENV, LOG, TENSORBOARD, STOPPED)
RESULT_KEYS = ("best_epoch", "epochs_run", "valid", "test", "train_seconds", "selected_by", "run_dir")
# what a resume may change: how long and how often, never the model or the data
RESUME_KEYS = ("train.epochs", "train.patience", "train.eval_every", "train.checkpoint_every", "train.tensorboard")


class DamagedRunFile(MSIError):
    """A run directory's file is truncated, not JSON, holds NaN metrics or misses keys; the message names it."""


# ---------------------------------------------------------------- writing


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` beside ``path`` under a unique temporary name, fsync, rename over ``path``. On any OSError
    (a full disk) the temporary file is removed and the error names ``path``; the file there before is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MSIError(f"{path}: could not write ({e.strerror or e}); the earlier file, if any, is kept") from None


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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
            return f"{key} is {results[key]!r}, not a whole number"
    for split in ("valid", "test"):
        metrics = results[split]
        if not isinstance(metrics, dict):
            return f"{split} is not a mapping of metric to number"
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return f"{split} {name} is {value!r}, not a finite number"
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
            raise DamagedRunFile(f"{path}:{number}: damaged, not a JSON row ({line[:40]!r})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise DamagedRunFile(f"{path}:{number}: damaged, a row without its epoch ({line[:40]!r})")
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
        write_atomic(path, "".join(line + "\n" for line in kept))
    return total - len(kept)


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


# ---------------------------------------------------------------- resume


def resume_config(cfg: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """``cfg`` with the overrides a resume allows (``RESUME_KEYS``), validated; and the changes, as
    ``train.epochs=8 (was 4)``. Any other key is a ConfigError naming it."""
    raw = cfg.to_dict()
    for section, key, value in parse_overrides(overrides):
        name = f"{section}.{key}"
        if name not in RESUME_KEYS:
            raise ConfigError(f"--resume cannot change '{name}' (only {', '.join(RESUME_KEYS)}: how long and how "
                              "often, never the model or the data); start a new run for it")
        try:
            raw[section][key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"config key '{name}': cannot read {value!r}") from None
    new = config_from_dict(raw)
    changes = []
    for name in RESUME_KEYS:
        key = name.partition(".")[2]
        before, after = getattr(cfg.train, key), getattr(new.train, key)
        if before != after:
            changes.append(f"{name}={after} (was {before})")
    return new, changes


# ---------------------------------------------------------------- the directory


@contextmanager
def locked(run_dir: Path, tool: str = "msi-train") -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` while the run lives (its pid inside); the OS drops it when the
    process dies, and the file is removed when the block ends. A second live process is refused (the error says it
    is another ``tool``: msi-sweep locks its sweep folder the same way)."""
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
            raise MSIError(f"{run_dir}: in use by another live {tool} process (pid {pid}); wait for it to end "
                           "or choose another --out") from None
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


def is_leftover(name: str) -> bool:
    """A temporary file of an interrupted write (``.best.pt.tmp-PID``, ``.results.json.tmp-PID-XXXX``)."""
    return name.startswith(".") and ".tmp-" in name


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove the temporary files of interrupted writes; returns them."""
    gone = [p for p in run_dir.iterdir() if is_leftover(p.name)]
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
    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def clear_for_new_run(run_dir: Path, overwrite: bool) -> list[str]:
    """Refuse a run directory holding files, unless ``overwrite`` or they are an unstarted run's
    (``unstarted_run``): then remove its run files (and leftovers) and return their names. Files msi-train did not
    write are always refused."""
    present = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if present and not overwrite and unstarted_run(run_dir) is None:
        raise MSIError(f"{run_dir}: already holds {', '.join(present)}; pass --resume {run_dir} to continue that "
                       "run, or --overwrite to start over")
    foreign = [n for n in present if n not in RUN_FILES and not is_leftover(n)]
    if foreign:
        raise MSIError(f"{run_dir}: holds files msi-train did not write ({', '.join(foreign)}); --overwrite "
                       "removes only run files: choose another --out")
    remove_files(run_dir, present)
    return present
