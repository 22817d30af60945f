"""A sweep folder: its plan (configs x grid points x seeds, one run directory per trial), the state of each trial's
run directory, and ``sweep.yaml``, the record of what the sweep is.

A trial's run directory is ``<out>/<config>_<key-value...>_s<seed>/``, an ordinary run directory written by the
trainer. ``check_sweep`` plans a sweep and checks all of it (configs, data sets, the folder) before
``record_sweep`` writes ``sweep.yaml``, so a corrected command is never refused as another sweep. Selection and the
tables are ``msi.select``'s.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from msi.config import Config, load_config
from msi.errors import MSIError, read_utf8, shown
from msi.files import write_text
from msi.rundir import LAST, LOCK, STOPPED, DamagedRunFile, lock_holder, read_log, read_results

SWEEP_FILE = "sweep.yaml"
NAME_MAX = 255  # bytes in a file name on Linux and macOS file systems


@dataclass(frozen=True)
class Trial:
    """One (config, grid point, seed) of a sweep and the run directory that holds it."""

    config: Path  # the YAML file
    point: tuple[str, ...]  # grid overrides, e.g. ("loss.alpha=0.1", "model.dropout=0.3")
    seed: int
    run_dir: Path
    row: str  # the table row it is selected in: its config's name, or name@data set (``split_rows``)

    @property
    def name(self) -> str:
        return self.run_dir.name


def split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets and braces: ``[10,20],[5,10]`` -> ``["[10,20]", "[5,10]"]``."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def grid_points(grid: list[str]) -> list[tuple[str, ...]]:
    """``["a.b=1,2", "c.d=[1,2],[3]"]`` -> every combination, as tuples of ``key=value`` overrides. A value given
    twice, or a key on two axes, would train one configuration twice: refused."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        key, parts = key.strip(), split_values(values)
        if not sep or "." not in key or not all(parts):
            raise MSIError(f"--grid {shown(item)}: expected section.key=v1,v2 (e.g. loss.alpha=0.1,0.01)")
        twice = next((v for i, v in enumerate(parts) if v in parts[:i]), None)
        if twice is not None:
            raise MSIError(f"--grid {shown(item)}: {key}={twice} is given twice; give each value once")
        if key in axes:
            raise MSIError(f"--grid {shown(item)}: {key} is already an axis; give all its values in one --grid item")
        axes[key] = [f"{key}={v}" for v in parts]
    return list(itertools.product(*axes.values()))


def run_name(config: Path, point: tuple[str, ...], seed: int) -> str:
    """``quickstart_loss.alpha-0.1_s999``; list values lose their brackets and join with '+'."""
    parts = [config.stem]
    for override in point:
        key, _, value = override.partition("=")
        parts.append(f"{key}-" + re.sub(r"[^\w.+-]", "", value.replace(",", "+")))
    return "_".join(parts) + f"_s{seed}"


def plan_trials(configs: list[Path], grid: list[str], seeds: list[int], out: Path) -> list[Trial]:
    """Every (config, grid point, seed) in a fixed order: config, then grid point, then seed."""
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise MSIError(f"--config: two config files share a name ({', '.join(stems)}); run names need distinct ones")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise MSIError(f"--seeds {seeds}: expected distinct seeds")
    points = grid_points(grid)
    trials = [Trial(Path(c), p, s, Path(out) / run_name(Path(c), p, s), Path(c).stem)
              for c in configs for p in points for s in seeds]
    seen: dict[str, Trial] = {}
    for t in trials:
        if len(t.name.encode()) > NAME_MAX:
            raise MSIError(f"--grid: the run directory {t.name[:60]}... of {' '.join(t.point)} is "
                           f"{len(t.name.encode())} bytes long, more than a file name may be ({NAME_MAX})")
        if (other := seen.setdefault(t.name, t)) is not t:
            raise MSIError(f"--grid: the points {' '.join(other.point)} and {' '.join(t.point)} both make the run "
                           f"directory {t.name}; write the values so that they differ in letters or digits")
    return trials


def trial_config(trial: Trial, overrides: list[str]) -> Config:
    """The config of a trial: its YAML, then ``--set`` overrides, the grid point and the seed."""
    return load_config(trial.config, [*overrides, *trial.point, f"train.seed={trial.seed}"])


def trial_state(run_dir: Path) -> str:
    """``done`` (a readable results.json), ``stopped`` (ASHA stopped it), ``resumable`` (last.pt) or ``new``; a
    damaged results.json counts as unfinished (``damaged_results`` names it)."""
    if (run_dir / STOPPED).is_file():
        return "stopped"
    try:
        if read_results(run_dir) is not None:
            return "done"
    except DamagedRunFile:
        pass
    return "resumable" if (run_dir / LAST).is_file() else "new"


def check_free(run_dir: Path) -> None:
    """Refuse a run directory that a live process holds (its ``.lock``), or a file where it belongs: a sweep never
    clears or trains in either."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MSIError(f"{run_dir}: a file where this trial's run directory belongs; move it away")
    pid = lock_holder(run_dir)
    if pid is not None:
        raise MSIError(f"{run_dir}: in use by a live process (pid {pid}); wait for it to end, then run the sweep "
                       "command again")


def prepare_trial_dir(run_dir: Path) -> bool:
    """Make ``run_dir`` ready for its trial; True when the trial resumes from ``last.pt``. A partial start (neither
    results.json nor last.pt) is removed, so the trainer starts it again in an empty directory; a directory in use
    is refused (``check_free``), never cleared."""
    check_free(run_dir)
    if trial_state(run_dir) == "resumable":
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return False


def copy_log(run_dir: Path, log_path: Path, offset: int) -> int:
    """Append the lines ``run_dir``'s train.log gained since byte ``offset`` to the trial log ``log_path``
    (``<out>/logs/<run name>.log``, msi-sweep's and sweep_fallback.py's); returns the new offset."""
    text, offset = read_log(run_dir, offset)
    if text:
        with open(log_path, "a") as f:
            f.write(text)
    return offset


def check_sweep(configs: list[Path], grid: list[str], seeds: list[int], out: Path,
                overrides: list[str]) -> tuple[list[Trial], dict[str, Config]]:
    """Plan a sweep and check all of it before anything is written, so that a corrected command is never refused
    as another sweep: ``out`` is new, empty or this sweep's (``check_sweep_folder``); ``--set`` repeats no key of
    the grid or of ``--seeds``; every trial's config loads, no two trials of a config are the same config, and every
    data set loads (generated data is made here, once, not by racing trials). Returns the trials and their configs
    by run name."""
    trials = plan_trials(configs, grid, seeds, Path(out))
    check_sweep_folder(Path(out), sweep_record(configs, grid, seeds, overrides))
    owner = {"train.seed": "--seeds", **{item.partition("=")[0].strip(): "--grid" for item in grid}}
    if "train.seed" in [item.partition("=")[0].strip() for item in grid]:
        raise MSIError("--grid train.seed=...: the seeds are --seeds (each point runs every seed)")
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key in owner:
            raise MSIError(f"--set {override}: {key} is given by {owner[key]}, whose values replace this one; give "
                           "it in one place")
    cfgs = {t.name: trial_config(t, overrides) for t in trials}
    seen: dict[str, Trial] = {}
    for t in trials:
        same = seen.setdefault(f"{t.config}\n{json.dumps(cfgs[t.name].to_dict(), sort_keys=True, default=str)}", t)
        if same is not t:
            raise MSIError(f"--grid: {' '.join(same.point)} and {' '.join(t.point)} give {t.config.name} the same "
                           "config; give each value once")
    from msi.runtime import dataset_for

    for cfg in {(c.data.root, c.data.name, c.model.name): c for c in cfgs.values()}.values():
        dataset_for(cfg, progress=False)
    return trials, cfgs


def sweep_record(configs: list[Path], grid: list[str], seeds: list[int], overrides: list[str]) -> dict[str, Any]:
    """What ``<out>/sweep.yaml`` holds: the configs (absolute paths), the grid, the seeds and the ``--set``."""
    return {"configs": [str(Path(c).resolve()) for c in configs], "grid": list(grid), "seeds": list(seeds),
            "set": list(overrides)}


def check_sweep_folder(out: Path, record: dict[str, Any]) -> None:
    """Refuse ``out`` unless it is new, empty, or holds this very sweep (its sweep.yaml is ``record``)."""
    path = out / SWEEP_FILE
    if path.is_file():
        old = read_sweep(out)
        if old != record:
            diff = ", ".join(k for k in record if old.get(k) != record[k])
            raise MSIError(f"{path}: this folder holds another sweep (its {diff} differ); use a new --out, or "
                           "repeat the command that made it")
    elif out.exists():
        if not out.is_dir():
            raise MSIError(f"{out}: is a file; --out names the sweep's folder")
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if present:
            raise MSIError(f"{out}: holds {', '.join(present[:3])}{', ...' if len(present) > 3 else ''} but no "
                           f"{SWEEP_FILE}, so it is not a sweep folder; choose a new or empty --out")


def record_sweep(out: Path, configs: list[Path], grid: list[str], seeds: list[int], overrides: list[str]) -> None:
    """Write ``<out>/sweep.yaml`` unless it is there already; refused as ``check_sweep_folder`` says."""
    record, out = sweep_record(configs, grid, seeds, overrides), Path(out)
    check_sweep_folder(out, record)
    if not (out / SWEEP_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / SWEEP_FILE, yaml.safe_dump(record, sort_keys=False))


RECORD_ITEMS = {"configs": (str, "paths"), "grid": (str, "key=v1,v2 texts"), "seeds": (int, "whole numbers"),
                "set": (str, "key=value texts")}


def read_sweep(out: Path) -> dict[str, Any]:
    """``<out>/sweep.yaml`` (``sweep_record``); an error names the file and the key that is wrong."""
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise MSIError(f"{path}: not found; is {out} a folder written by msi-sweep?")
    try:
        record = yaml.safe_load(read_utf8(path, MSIError))
    except yaml.YAMLError as e:
        raise MSIError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(record, dict) or set(record) != set(RECORD_ITEMS):
        raise MSIError(f"{path}: expected the keys {', '.join(RECORD_ITEMS)}")
    bad = [k for k in RECORD_ITEMS if not isinstance(record[k], list)]
    if bad:
        raise MSIError(f"{path}: {', '.join(bad)} must be a list (as msi-sweep writes it)")
    for key, (kind, what) in RECORD_ITEMS.items():
        wrong = [v for v in record[key] if not isinstance(v, kind) or isinstance(v, bool)]
        if wrong:
            raise MSIError(f"{path}: {key} must be a list of {what}; {shown(wrong[0])} is not")
    return record
