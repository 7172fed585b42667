"""Starting an NNI experiment so that it really runs, and stopping it so that nothing is left.

Contract (what ``bnas-nni nni create|stop`` rely on): :func:`start_experiment` starts a YAML with
``nnictl`` in :func:`~bnas_nni.integrations.nni.environment.experiment_environment` (``HOME`` in a scratch
folder, manager on 127.0.0.1, ``python`` meaning this interpreter) and returns an
:class:`ExperimentStart` only once a trial has really started, the experiment finished, or the
timeout passed with the manager still up. A manager that dies meanwhile raises
:class:`~bnas_nni.errors.ExperimentError` with the one-line reason from its log (NNI's own
``nnictl create`` reports success and lets it die silently). :func:`stop_experiment` stops by id,
then by the manager's PID from the manifest. Nothing here imports NNI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ...errors import ExperimentError
from .environment import experiment_environment
from .forensics import manager_failure_reason
from .nnictl import manager_log_path, manifest_entry, nnictl_create, nnictl_stop
from .processes import pid_alive, terminate
from .rest import rest_get

__all__ = ['ExperimentStart', 'start_experiment', 'stop_experiment']


@dataclass
class ExperimentStart:
    """What :func:`start_experiment` saw: the manager is up and (unless ``started`` is empty) running trials."""

    experiment_id: str
    port: int
    env: Dict[str, str]
    status: str
    trials: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    @property
    def started(self) -> List[Dict[str, Any]]:
        return [t for t in self.trials if t.get('status') not in (None, 'WAITING', 'UNKNOWN')]

    @property
    def failed(self) -> List[Dict[str, Any]]:
        return [t for t in self.trials if t.get('status') in ('FAILED', 'SYS_CANCELED')]

    @property
    def manager_log(self) -> Path:
        return manager_log_path(self.env, self.experiment_id)


_STOPPED = ('STOPPING', 'STOPPED', 'ERROR')


def start_experiment(config: str | os.PathLike, port: int, scratch: str | os.PathLike, *,
                     timeout: float = 120, settle: float = 20, poll: float = 1.0, threads: Optional[int] = None,
                     base_env: Optional[Mapping[str, str]] = None) -> ExperimentStart:
    """Start ``config`` with ``nnictl`` the safe way and return once a trial has really started.

    Returns when the first trial has run for ``settle`` seconds, reported a metric or ended (a trial
    that fails at once, e.g. on a missing dataset, shows up in ``failed``), when the experiment
    finished, or when ``timeout`` passed with no trial started and the manager still up (``started``
    is then empty). A manager that dies meanwhile raises :class:`ExperimentError` with the reason
    from its log.
    """
    config = Path(config)
    if not config.is_file():
        raise ExperimentError(f'experiment config not found: {config}; the presets are experiments/nnictl_*.yml')
    env = experiment_environment(scratch, base_env, threads)
    experiment_id = nnictl_create(config, port, env)
    deadline = time.monotonic() + timeout
    first_started: Optional[float] = None
    status, trials = 'UNKNOWN', []
    while True:
        pid = manifest_entry(env, experiment_id).get('pid')
        alive = pid_alive(pid)
        check: Dict[str, Any] = {}
        try:
            check = rest_get(port, 'check-status', timeout=5)
            status = check.get('status', status)
            trials = rest_get(port, 'trial-jobs', timeout=5)
            up = True
        except (OSError, ValueError):
            up = False
        if (not up and not alive) or status in _STOPPED:
            if alive:
                try:
                    os.kill(int(pid), signal.SIGTERM)   # a manager left half up; the log says why
                except OSError:
                    pass
            time.sleep(1)                          # let the manager finish writing its log
            reason = manager_failure_reason(manager_log_path(env, experiment_id))
            errors = '; '.join(str(e) for e in check.get('errors') or [] if str(e)[:60] not in reason)
            raise ExperimentError(f'the NNI manager of experiment {experiment_id} stopped right after starting: '
                                  f'{errors + "; " if errors else ""}{reason}')
        start = ExperimentStart(experiment_id, port, env, status, list(trials))
        now = time.monotonic()
        if up and start.started and first_started is None:
            first_started = now
        settled = first_started is not None and (
            now - first_started >= settle
            or any(t.get('status') != 'RUNNING' for t in start.started)
            or _reported_metric(port, start.started))
        if up and (settled or status == 'DONE'):
            return start
        if first_started is None and now > deadline:
            return start
        time.sleep(poll)


def _reported_metric(port: int, trials: Sequence[Mapping[str, Any]]) -> bool:
    try:
        return any(rest_get(port, f'metric-data/{t["trialJobId"]}', timeout=5) for t in trials)
    except (OSError, ValueError):
        return False


def stop_experiment(experiment_id: str, env: Mapping[str, str], timeout: float = 60, grace: float = 10) -> bool:
    """``nnictl stop ID``; if the manager (PID from the manifest) still runs ``grace`` seconds later,
    SIGTERM and then SIGKILL it. True when the manager is gone."""
    pid = manifest_entry(env, experiment_id).get('pid')
    try:
        nnictl_stop(experiment_id, env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return terminate(pid, grace=grace, poll=0.2)
