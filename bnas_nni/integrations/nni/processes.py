"""Whether a process still runs, and stopping one by PID for sure.

Contract: :func:`pid_alive` is False for a PID that is gone or a zombie; :func:`terminate` sends
SIGTERM, waits up to ``grace`` seconds, then SIGKILL, and returns whether the process is gone. With
``group=True`` it signals the process group ``pid`` leads (a process started with
``start_new_session=True``: NNI managers, browsers, drivers) and falls back to the PID alone where
``pid`` leads no group. Used by the experiment life cycle and by the tests that must leave nothing
running.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

__all__ = ['pid_alive', 'terminate']


def pid_alive(pid: Optional[int]) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        return Path(f'/proc/{int(pid)}/stat').read_text().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return True


def _send(pid: int, sig: int, group: bool) -> None:
    if group:
        try:
            os.killpg(pid, sig)
            return
        except OSError:
            pass                                   # not a group leader (or gone): signal the PID itself
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def terminate(pid: Optional[int], *, grace: float = 10.0, group: bool = False, poll: float = 0.1) -> bool:
    """SIGTERM ``pid``, after ``grace`` seconds SIGKILL it, and wait up to ``grace`` again; True when it is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not pid_alive(pid):
            return True
        _send(int(pid), sig, group)
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(poll)
    return not pid_alive(pid)
