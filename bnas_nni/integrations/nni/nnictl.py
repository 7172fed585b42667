"""``nnictl`` as a library: create and stop an experiment, and read the manifest nnictl keeps.

Contract: every call runs nnictl with this interpreter (``python -m nni.tools.nnictl.nnictl``) in the
environment it is given (build it with :func:`bnas_nni.integrations.nni.environment.nni_environment`, so the
manifest lives under the redirected ``HOME``). :func:`nnictl_create` returns the experiment id or
raises :class:`~bnas_nni.errors.ExperimentError` with nnictl's own reason; it does not wait for the
manager (:func:`bnas_nni.integrations.nni.lifecycle.start_experiment` does). :func:`manifest_entry`,
:func:`manager_log_path` and :func:`trial_directory` find an experiment's PID, port and files from
``$HOME/nni-experiments/.experiment``. Nothing here imports NNI.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping

from ...errors import ExperimentError
from .forensics import nnictl_refusal_reason

__all__ = ['nnictl_command', 'nnictl_create', 'nnictl_stop', 'manifest_entry', 'manager_log_path',
           'trial_directory']

_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def nnictl_command(*args: str) -> List[str]:
    """``python -m nni.tools.nnictl.nnictl ARGS`` with this interpreter (``nnictl`` on PATH may be another one)."""
    return [sys.executable, '-m', 'nni.tools.nnictl.nnictl', *args]


def nnictl_create(config: str | os.PathLike, port: int, env: Mapping[str, str], *, timeout: float = 120) -> str:
    """``nnictl create --config CONFIG --port PORT``; returns the experiment id.

    A refusal (bad config key, busy port) raises :class:`ExperimentError` with nnictl's own reason.
    """
    out = subprocess.run(nnictl_command('create', '--config', str(config), '--port', str(port)), env=dict(env),
                         capture_output=True, text=True, timeout=timeout)
    text = _ANSI.sub('', out.stdout + out.stderr)
    match = re.search(r'experiment id is (\w+)', text, re.I) or re.search(r'nnictl stop (\w+)', text)
    if out.returncode != 0 or not match:
        raise ExperimentError(f'nnictl create --config {config} refused: {nnictl_refusal_reason(text, port)}')
    return match.group(1)


def nnictl_stop(experiment_id: str, env: Mapping[str, str], timeout: float = 60) -> bool:
    """``nnictl stop ID``; True when nnictl reports success."""
    out = subprocess.run(nnictl_command('stop', experiment_id), env=dict(env), capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode == 0


def manifest_entry(env: Mapping[str, str], experiment_id: str) -> Dict[str, Any]:
    """The experiment's row in ``$HOME/nni-experiments/.experiment`` (pid, port, logDir, status), or ``{}``."""
    path = Path(env['HOME']) / 'nni-experiments' / '.experiment'
    try:
        return dict(json.loads(path.read_text()).get(experiment_id) or {})
    except (OSError, ValueError):
        return {}


def _experiment_dir(env: Mapping[str, str], experiment_id: str) -> Path:
    """``<experimentWorkingDirectory>/<id>`` (``logDir`` in the manifest; ``~/nni-experiments`` by default)."""
    log_dir = manifest_entry(env, experiment_id).get('logDir') or str(Path(env['HOME']) / 'nni-experiments')
    return Path(log_dir) / experiment_id


def manager_log_path(env: Mapping[str, str], experiment_id: str) -> Path:
    """``<experimentWorkingDirectory>/<id>/log/nnimanager.log``."""
    return _experiment_dir(env, experiment_id) / 'log' / 'nnimanager.log'


def trial_directory(env: Mapping[str, str], experiment_id: str, trial_id: str) -> Path:
    """Where a local trial runs and logs (``trial.log``, ``trial.stdout``, ``trial.stderr``)."""
    return _experiment_dir(env, experiment_id) / 'environments' / 'local-env' / 'trials' / trial_id
