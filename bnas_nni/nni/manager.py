"""Running the NNI manager safely on a shared machine (what ``bnas-nni nni``, tests and launch scripts use).

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

import contextlib
import json
import os
import socket
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

__all__ = ['LOCALHOST_ONLY_JS', 'write_localhost_preload', 'nni_environment', 'loopback_namespace_prefix',
           'nnictl_create', 'nnictl_stop', 'rest_get', 'wait_for_experiment', 'free_port', 'redirected_nni_home',
           'rest_snapshot']


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


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (NNI also uses the next one up for nothing; we only need one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redirected_nni_home(run_dir: Path, manager: bool) -> Iterator[Dict[str, str]]:
    """Point ``HOME`` (and NNI's manifest folder) into ``run_dir`` and, for the NNI manager, preload
    the localhost-only binding; restore everything afterwards."""
    from nni.tools.nnictl import config_utils

    env = nni_environment(run_dir)
    keys = ['HOME', 'NODE_OPTIONS', 'GLOO_SOCKET_IFNAME'] if manager else ['HOME']
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_defaults = config_utils.Experiments.__init__.__defaults__
    try:
        for k in keys:
            os.environ[k] = env[k]
        # nnictl's manifest path is bound at import time from the HOME of that moment
        config_utils.Experiments.__init__.__defaults__ = (os.path.join(env['HOME'], 'nni-experiments'),)
        yield env
    finally:
        config_utils.Experiments.__init__.__defaults__ = saved_defaults
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rest_snapshot(port: int) -> Dict[str, Any]:
    snap: Dict[str, Any] = {}
    for key, path in (('status', 'check-status'), ('trial_jobs', 'trial-jobs'), ('metric_data', 'metric-data'),
                      ('experiment', 'experiment')):
        try:
            snap[key] = rest_get(port, path)
        except OSError as exc:
            snap[key] = {'error': f'{type(exc).__name__}: {exc}'}
    return snap
