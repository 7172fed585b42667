"""Child processes the tests start, in one place: the torchrun command line, the environment a child of
the test run needs, and a :class:`Job` that follows the whole process tree it spawns and leaves nothing
running.

Contract: :func:`kill_tree` SIGKILLs a process, its process group and every descendant it can still
find (torchrun starts its workers in sessions of their own, so a group kill alone would miss them) and
waits until they are gone; :func:`stop_group` asks a process group to end (SIGTERM, then SIGKILL after
``grace``) through :func:`bnas_nni.integrations.nni.processes.terminate`, the library's own stopper.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from bnas_nni.integrations.nni.loopback import loopback_namespace_prefix
from bnas_nni.integrations.nni.processes import pid_alive, terminate

REPO = Path(__file__).resolve().parent.parent

__all__ = ['REPO', 'torchrun_command', 'torchrun', 'child_env', 'descendants', 'kill_tree', 'stop_group', 'Job']

# settings a parent (an NNI trial, a torchrun worker) may have exported that would change what a child does
_INHERITED = ('NNI_PLATFORM', 'NNI_OUTPUT_DIR', 'NNI_TRIAL_JOB_ID', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')


def torchrun_command() -> List[str]:
    """``torchrun`` next to this Python, else the module it runs."""
    exe = Path(sys.executable).with_name('torchrun')
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'torch.distributed.run']


def torchrun(nproc: int, *args: str) -> List[str]:
    """One node, ``nproc`` workers, a c10d rendezvous on a free loopback port."""
    return [*torchrun_command(), '--nnodes=1', f'--nproc_per_node={nproc}', '--rdzv-backend=c10d',
            '--rdzv-endpoint=127.0.0.1:0', *args]


def child_env(**extra: str) -> Dict[str, str]:
    """This environment for a child: the repository importable, gloo on loopback, one OpenMP thread,
    unbuffered output, and no trial or rank settings inherited; ``extra`` last."""
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    for key in _INHERITED:
        env.pop(key, None)
    env.update(extra)
    return env


def descendants(pid: int) -> List[int]:
    """``pid``'s living descendants, read from /proc (children of every thread)."""
    out: List[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f'/proc/{p}/task').glob('*'):
            try:
                kids = [int(c) for c in (task / 'children').read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def kill_tree(pid: int, *, also: Iterable[int] = (), wait: float = 15.0) -> List[int]:
    """SIGKILL ``pid``'s group, ``pid``, its descendants and ``also``; wait up to ``wait`` seconds for them
    to go (a busy machine takes a moment) and return those still alive."""
    pids = {pid, *descendants(pid), *also}
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass                                   # not a group leader, or gone
    for p in sorted(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End the process group ``proc`` leads (started with ``start_new_session=True``) and reap ``proc``."""
    terminate(proc.pid, grace=grace, group=True)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait(grace)


class Job:
    """A command (usually torchrun) in a session of its own, output to ``log``, whose whole process tree
    is tracked while it runs and killed at the end."""

    def __init__(self, cmd: Sequence[str], env: Dict[str, str], log: Path, *, cwd: Optional[Path] = None,
                 namespace: bool = True) -> None:
        self.log = log
        self.file = open(log, 'w')
        prefix = loopback_namespace_prefix() if namespace else []
        self.proc = subprocess.Popen([*prefix, *cmd], cwd=cwd or REPO, env=env, stdout=self.file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set = {self.proc.pid}

    def poll_tree(self) -> None:
        self.seen.update(descendants(self.proc.pid))

    def wait(self, timeout: float) -> int:
        """The exit status; past ``timeout`` the tree is killed and the test fails with the output's tail."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll_tree()
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f'{self.proc.args} did not finish in {timeout:.0f}s:\n{self.output()[-3000:]}')
        return self.proc.returncode

    def kill(self) -> None:
        self.poll_tree()
        kill_tree(self.proc.pid, also=self.seen)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def leftovers(self) -> List[int]:
        return [p for p in self.seen if pid_alive(p)]

    def output(self) -> str:
        self.file.flush()
        return self.log.read_text()

    def close(self) -> None:
        self.kill()
        self.file.close()
