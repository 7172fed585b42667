"""Running bnas-nni code as NNI trials, and running NNI itself safely on a shared machine.

Inside a trial (what the trainers use):

* :func:`under_nni` is true when NNI launched this process (``NNI_PLATFORM`` is set);
* :func:`trial_parameters` lets rank 0 alone call ``nni.get_next_parameter()`` (every torchrun rank
  inherits the NNI variables, but the manager hands out one parameter set per trial) and broadcasts
  the result to the other ranks;
* :class:`TrialReporter` reports one intermediate result per epoch,
  ``{'default': top1, 'top5': ..., 'loss': ...}``, and exactly one final result, from rank 0 only.

Around ``nnictl`` (what tests and launch scripts use):

* :func:`write_localhost_preload` writes ``localhost-only.js``: loaded through ``NODE_OPTIONS`` it
  makes the NNI manager (which has no host option) listen on 127.0.0.1 only;
* :func:`nni_environment` returns an environment with ``HOME`` redirected (NNI writes
  ``~/nni-experiments`` whatever the config says), that preload, and gloo pinned to loopback;
* :func:`loopback_namespace_prefix` wraps a command in a private network namespace where only
  loopback exists, because torchrun's rendezvous store listens on every interface;
* :func:`nnictl_create`, :func:`nnictl_stop` and :func:`rest_get` drive an experiment by id and
  port over the manager's REST API.

Nothing here imports NNI at module import time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ['under_nni', 'trial_parameters', 'TrialReporter', 'LOCALHOST_ONLY_JS', 'write_localhost_preload',
           'nni_environment', 'loopback_namespace_prefix', 'nnictl_create', 'nnictl_stop', 'rest_get',
           'wait_for_experiment']


def under_nni() -> bool:
    """True when this process is an NNI trial (NNI sets ``NNI_PLATFORM``; standalone runs lack it)."""
    return bool(os.environ.get('NNI_PLATFORM'))


def trial_parameters(ctx: Any = None) -> Dict[str, Any]:
    """This trial's hyperparameters: ``nni.get_next_parameter()`` on rank 0, broadcast to all ranks.

    ``ctx`` is a :class:`bnas_nni.training.distributed.DistContext` (or None for one process).
    Returns ``{}`` outside NNI. Call it once per trial, before any report.
    """
    is_main = ctx is None or ctx.is_main
    params: Dict[str, Any] = {}
    if is_main and under_nni():
        import nni

        params = dict(nni.get_next_parameter() or {})
    if ctx is not None and getattr(ctx, 'distributed', False):
        from .training.distributed import broadcast_object

        params = broadcast_object(params, ctx)
    return params


class TrialReporter:
    """Per-epoch and final metrics to NNI from rank 0; does nothing outside NNI or on other ranks."""

    def __init__(self, enabled: Optional[bool] = None, is_main: bool = True) -> None:
        self.enabled = (under_nni() if enabled is None else enabled) and is_main
        self.final_sent = False

    @staticmethod
    def _metric(top1: float, **extra: float) -> Dict[str, float]:
        return {'default': float(top1), **{k: float(v) for k, v in extra.items() if v is not None}}

    def intermediate(self, top1: float, **extra: float) -> None:
        """``nni.report_intermediate_result({'default': top1, **extra})``, e.g. ``top5=…, loss=…``."""
        if self.enabled:
            import nni

            nni.report_intermediate_result(self._metric(top1, **extra))

    def final(self, top1: float, **extra: float) -> None:
        """The trial's one final result; later calls are ignored."""
        if self.enabled and not self.final_sent:
            import nni

            nni.report_final_result(self._metric(top1, **extra))
            self.final_sent = True


# --------------------------------------------------------------------------- NNI manager hygiene

LOCALHOST_ONLY_JS = """\
// Loaded with NODE_OPTIONS="--require <this file>": every TCP server the NNI manager opens
// listens on 127.0.0.1 (NNI 3.0 has no host option). Unix sockets are left alone.
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first && typeof first === 'object' && !Array.isArray(first)) {
    if (first.path === undefined) args[0] = Object.assign({}, first, { host: '127.0.0.1' });
  } else if (typeof first === 'number' || /^\\d+$/.test(String(first))) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1';
    else args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
"""


def write_localhost_preload(directory: str | os.PathLike) -> Path:
    """Write ``localhost-only.js`` into ``directory`` and return its path (for ``NODE_OPTIONS``)."""
    path = Path(directory) / 'localhost-only.js'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCALHOST_ONLY_JS)
    return path


def nni_environment(scratch: str | os.PathLike, base: Optional[Mapping[str, str]] = None,
                    threads: Optional[int] = None) -> Dict[str, str]:
    """An environment for ``nnictl`` and its trials.

    * ``HOME=<scratch>/home``: NNI keeps its experiment manifest in ``~/nni-experiments``;
    * ``NODE_OPTIONS=--require <scratch>/localhost-only.js``: the manager binds 127.0.0.1 only;
    * ``GLOO_SOCKET_IFNAME=lo``: DDP trials talk over loopback;
    * ``OMP_NUM_THREADS`` when ``threads`` is given (trials share the machine).
    """
    scratch = Path(scratch).resolve()
    env = dict(os.environ if base is None else base)
    home = scratch / 'home'
    home.mkdir(parents=True, exist_ok=True)
    preload = write_localhost_preload(scratch)
    env['HOME'] = str(home)
    prior = env.get('NODE_OPTIONS', '')
    env['NODE_OPTIONS'] = (prior + ' ' if prior else '') + f'--require {preload}'
    env['GLOO_SOCKET_IFNAME'] = 'lo'
    env['PYTHONUNBUFFERED'] = '1'
    if threads is not None:
        env['OMP_NUM_THREADS'] = str(threads)
    return env


def loopback_namespace_prefix() -> List[str]:
    """``['unshare', '-n', ...]`` that runs a command with only a loopback interface, or ``[]`` where
    unprivileged network namespaces are unavailable. Listeners inside cannot be reached from outside."""
    unshare, ip = shutil.which('unshare'), shutil.which('ip') or '/usr/sbin/ip'
    if not unshare or not Path(ip).exists():
        return []
    probe = [unshare, '-n', 'sh', '-c', f'{ip} link set lo up']
    if os.geteuid() != 0:
        probe.insert(1, '-r')
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return []
    return probe[:-1] + [f'{ip} link set lo up && exec "$0" "$@"']


def nnictl_create(config: str | os.PathLike, port: int, env: Mapping[str, str], *,
                  prefix: Sequence[str] = (), timeout: float = 120) -> str:
    """``nnictl create --config CONFIG --port PORT``; returns the experiment id.

    ``prefix`` (e.g. :func:`loopback_namespace_prefix`) is not usable here, because the manager
    must stay reachable from this process; pass it only if the caller runs inside the same namespace.
    """
    cmd = [*prefix, sys.executable, '-m', 'nni.tools.nnictl.nnictl', 'create', '--config', str(config),
           '--port', str(port)]
    out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    text = out.stdout + out.stderr
    match = re.search(r'experiment id is (\w+)', text, re.I) or re.search(r'nnictl stop (\w+)', text)
    if out.returncode != 0 or not match:
        tail = ' | '.join(text.strip().splitlines()[-5:])
        raise RuntimeError(f'nnictl create failed (rc={out.returncode}): {tail}')
    return match.group(1)


def nnictl_stop(experiment_id: str, env: Mapping[str, str], timeout: float = 60) -> bool:
    """``nnictl stop ID``; True when nnictl reports success."""
    out = subprocess.run([sys.executable, '-m', 'nni.tools.nnictl.nnictl', 'stop', experiment_id], env=dict(env),
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode == 0


def rest_get(port: int, path: str, timeout: float = 10) -> Any:
    """``GET http://127.0.0.1:PORT/api/v1/nni/<path>`` decoded from JSON."""
    url = f'http://127.0.0.1:{port}/api/v1/nni/{path.lstrip("/")}'
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode())


def wait_for_experiment(port: int, timeout: float, poll: float = 2.0) -> str:
    """Poll ``check-status`` until the experiment is DONE, STOPPED or ERROR, or ``timeout`` passes;
    returns the last status seen."""
    deadline = time.monotonic() + timeout
    status = 'UNKNOWN'
    while time.monotonic() < deadline:
        try:
            status = rest_get(port, 'check-status').get('status', status)
        except OSError:
            pass
        if status in ('DONE', 'STOPPED', 'ERROR'):       # NO_MORE_TRIAL: trials still running
            return status
        time.sleep(poll)
    return status
