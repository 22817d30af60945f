"""msi/console.py: progress bars only on a terminal; piped tool output holds no bars."""

from __future__ import annotations

import io
import subprocess
import sys

from msi.console import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_only_and_only_when_shown():
    for stream, show, drawn in ((Terminal(), True, True), (io.StringIO(), True, False), (Terminal(), False, False)):
        assert list(progress_bar(range(3), show=show, file=stream, desc="steps")) == [0, 1, 2]
        assert ("steps: 100%" in stream.getvalue()) is drawn


def test_piped_msi_data_synth_prints_its_line_and_no_bar(tmp_path):
    done = subprocess.run([sys.executable, "-m", "msi.cli", "data", "synth", "--preset", "tiny", "--out",
                           str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # tqdm drew "interactions: 100%|..." here before
    assert done.stdout.splitlines()[-1] == (f"wrote {tmp_path / 'tiny'}: data set 'tiny' (train on it with "
                                            f"data.root={tmp_path} data.name=tiny)")  # named after the folder
