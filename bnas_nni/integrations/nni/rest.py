"""The NNI manager's REST API on 127.0.0.1: a client, polling until an experiment ends, and a free port.

Contract: every request goes to ``http://127.0.0.1:PORT/api/v1/nni/<path>`` and never through a
proxy from the environment (the manager is on loopback). :func:`rest_get` raises ``OSError`` when
the manager does not answer and ``ValueError`` on a reply that is not JSON; the polling functions
turn those into a status instead. :func:`free_port` picks the port to start a manager on. Nothing
here imports NNI.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any, Callable, Dict

__all__ = ['free_port', 'rest_get', 'rest_snapshot', 'wait_for_experiment', 'poll_experiment']

# experiment statuses after which no trial runs any more (NO_MORE_TRIAL: trials may still be running)
_FINAL_STATUSES = ('DONE', 'STOPPED', 'ERROR')

# the manager is on loopback: an http_proxy from the environment must not see (or swallow) these requests
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def rest_get(port: int, path: str, timeout: float = 10) -> Any:
    """``GET http://127.0.0.1:PORT/api/v1/nni/<path>`` decoded from JSON (never through a proxy)."""
    url = f'http://127.0.0.1:{port}/api/v1/nni/{path.lstrip("/")}'
    with _LOOPBACK.open(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode())


def rest_snapshot(port: int) -> Dict[str, Any]:
    """``status``, ``trial_jobs``, ``metric_data`` and ``experiment`` as the manager reports them now
    (kept in a search's result before the experiment stops); an endpoint that fails holds ``{'error': ...}``."""
    snap: Dict[str, Any] = {}
    for key, path in (('status', 'check-status'), ('trial_jobs', 'trial-jobs'), ('metric_data', 'metric-data'),
                      ('experiment', 'experiment')):
        try:
            snap[key] = rest_get(port, path)
        except OSError as exc:
            snap[key] = {'error': f'{type(exc).__name__}: {exc}'}
    return snap


def wait_for_experiment(port: int, timeout: float, poll: float = 2.0) -> str:
    """Poll ``check-status`` until the experiment is DONE, STOPPED or ERROR, or ``timeout`` passes;
    returns the last status seen (a manager that does not answer is asked again)."""
    deadline = time.monotonic() + timeout
    status = 'UNKNOWN'
    while time.monotonic() < deadline:
        try:
            status = rest_get(port, 'check-status').get('status', status)
        except OSError:
            pass
        if status in _FINAL_STATUSES:
            return status
        time.sleep(poll)
    return status


def poll_experiment(port: int, on_change: Callable[[Dict[str, Any]], None], *, timeout: float,
                    poll: float = 2.0) -> str:
    """Like :func:`wait_for_experiment`, calling ``on_change(trial)`` whenever a trial's status changes;
    a manager that stops answering counts as STOPPED."""
    deadline = time.monotonic() + timeout
    seen: Dict[str, str] = {}
    status = 'UNKNOWN'
    while time.monotonic() < deadline:
        try:
            status = rest_get(port, 'check-status').get('status', status)
            for t in rest_get(port, 'trial-jobs'):
                if seen.get(t['trialJobId']) != t.get('status'):
                    seen[t['trialJobId']] = t.get('status')
                    on_change(t)
        except (OSError, ValueError):
            return 'STOPPED'
        if status in _FINAL_STATUSES:
            return status
        time.sleep(poll)
    return status
