"""Records of a run beside its metrics: ``environment`` (where and with what it ran: the record msi.rundir keeps in
env.json) and the optional TensorBoard events."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from msi.errors import MSIError
from msi.rundir import loss_terms


def git_commit(folder: Path) -> str | None:
    """The commit checked out at ``folder`` (with ``-dirty`` when it has changes), or None outside a checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


def environment(device: torch.device | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Python, torch, CUDA and cuDNN versions, the device name, the host, the command line, the git commit."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": name,
        "host": platform.node(),
        "command": list(sys.argv if argv is None else argv),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }


def check_tensorboard(enabled: bool) -> None:
    """With ``enabled`` (train.tensorboard), a one-line MSIError naming the extra when TensorBoard is missing."""
    if not enabled:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise MSIError("train.tensorboard: true needs TensorBoard: pip install -e '.[tensorboard]'") from None


class TensorBoardLog:
    """Per-epoch scalars for TensorBoard in ``<run_dir>/tensorboard/`` (``train.tensorboard: true``).

    Disabled, every method does nothing. Enabled without the package, the constructor fails with a one-line error
    naming the extra. The loss terms a row names go under ``loss/``, valid metrics under ``valid/``, the other
    numbers (seconds, diagnostics) under ``epoch/``; the x axis is the epoch.
    """

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        check_tensorboard(True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (``msi.rundir.append_metrics``): its loss terms, valid metrics, other numbers."""
        if self.writer is None:
            return
        epoch, terms = row["epoch"], loss_terms(row)
        for key, value in row.items():
            if key == "valid":
                for metric, v in value.items():
                    self.writer.add_scalar(f"valid/{metric}", v, epoch)
            elif key in terms:
                self.writer.add_scalar(f"loss/{key}", value, epoch)
            elif key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
