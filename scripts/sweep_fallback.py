"""msi-sweep's trials on one machine without Ray: for a machine where Ray cannot be installed.

Takes msi-sweep's arguments (``--config``, ``--grid``, ``--seeds``, ``--set``, ``--out``, ``--max-concurrent``,
``--deadline``; ``--gpus-per-trial`` only decides cpu or cuda) and runs each unfinished trial as a plain ``msi-train``
process into the run directory msi-sweep would use (a trial with ``last.pt`` resumes), so the folder stays an
ordinary msi-sweep folder: ``msi-sweep --report`` and the same ``msi-sweep`` command later both work on it. The
driver's skeleton (checks, lock, sweep.yaml, the tables) is msi-sweep's own (``msi.sweep.drive``), and so are
planning and selection (``msi.select``); nothing here chooses anything. Each trial's log,
``<out>/logs/<run name>.log``, gets the lines its run's train.log gained (one per epoch), then what msi-train printed.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from msi.errors import Interrupted, MSIError
from msi.rundir import read_log
from msi.sweep import check_limits, drive
from msi.sweepdir import copy_log, prepare_trial_dir, trial_state


def main(argv: list[str] | None = None) -> int:
    """The fallback sweep; a problem the user can fix is one ``error:`` line (status 2, Ctrl-C 130), as msi-sweep's."""
    try:
        return sweep(argv)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except (MSIError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", type=Path, required=True)
    p.add_argument("--grid", nargs="*", default=[], action="extend")
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 42, 2026])
    p.add_argument("--set", nargs="*", default=[], action="extend")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--deadline", type=float, default=None, help="seconds; then running trials are stopped")
    args = p.parse_args(argv)
    out = args.out.resolve()
    check_limits(1, args.gpus_per_trial, args.max_concurrent, args.deadline)
    device = "cuda" if args.gpus_per_trial > 0 else "cpu"
    stop_at = time.time() + args.deadline if args.deadline else float("inf")
    interrupted, starting = threading.Event(), threading.Lock()
    running: set[subprocess.Popen] = set()

    def run(t) -> None:
        if time.time() >= stop_at:
            return
        cmd = [sys.executable, "-m", "msi.cli", "train", "--quiet", "--device", device]
        if prepare_trial_dir(t.run_dir):
            cmd += ["--resume", str(t.run_dir)]
        else:
            cmd += ["--config", str(t.config), *args.set, *t.point, f"train.seed={t.seed}", "--out", str(t.run_dir)]
        offset = read_log(t.run_dir)[1]  # train.log's lines from here on are this process's
        with starting:  # Ctrl-C either finds this trial's process running or stops it from starting
            if interrupted.is_set():
                return
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            running.add(proc)
        try:
            output, _ = proc.communicate(timeout=max(1.0, stop_at - time.time()) if stop_at < float("inf") else None)
        except subprocess.TimeoutExpired:
            proc.terminate()
            output, _ = proc.communicate()
        with starting:
            running.discard(proc)
        log_path = out / "logs" / f"{t.name}.log"
        copy_log(t.run_dir, log_path, offset)  # the epoch lines, then what msi-train printed (its result or error)
        with open(log_path, "ab") as log:
            log.write(output)
        print(f"{t.name}: {trial_state(t.run_dir)}", flush=True)

    def run_all(todo, cfgs, out: Path) -> None:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.max_concurrent) as pool:
            try:
                list(pool.map(run, todo))
            except KeyboardInterrupt:
                with starting:  # no new trial starts; the running ones save their last.pt and end
                    interrupted.set()
                    for proc in running:
                        proc.send_signal(signal.SIGINT)
                command = shlex.join(["python3", __file__, *map(str, sys.argv[1:] if argv is None else argv)])
                raise Interrupted(f"interrupted; finished trials are kept and the others resume from their last.pt: "
                                  f"continue with {command}") from None

    drive(args.config, args.grid, args.seeds, out, args.set, run_all, lambda line: print(line, flush=True))
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
