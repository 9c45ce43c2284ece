"""Passing a signal on after the drain (issue 11 item 19)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(30)
def test_default_sigterm_action_still_unwinds_the_process(tmp_path: Path) -> None:
    marker = tmp_path / "marks"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.default_sigterm", str(marker)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    # Not killed by the signal (that skips every cleanup): it exits with the status a shell
    # reports for SIGTERM, after the lifespan unwound and atexit ran.
    assert code == 128 + signal.SIGTERM
    assert marker.read_text().split() == ["entered", "manager-exited", "atexit"]
