"""Running the NNI manager safely on a shared machine (what ``bnas-nni nni``, tests and launch scripts use).

* :func:`write_localhost_preload` writes ``localhost-only.js``: loaded through ``NODE_OPTIONS`` it
  makes the NNI manager (which has no host option) listen on 127.0.0.1 only;
* :func:`nni_environment` returns an environment with ``HOME`` redirected (NNI writes
  ``~/nni-experiments`` whatever the config says), that preload, and gloo pinned to loopback;
* :func:`loopback_namespace_prefix` wraps a command in a private network namespace where only
  loopback exists, because torchrun's rendezvous store listens on every interface;
* :func:`nnictl_create`, :func:`nnictl_stop` and :func:`rest_get` drive an experiment by id and
  port over the manager's REST API;
* :func:`start_experiment` (behind ``bnas-nni nni create``) does all of that in one call, waits
  until the manager really runs a trial, and turns a manager that died into one line with the reason
  from its ``nnimanager.log`` (NNI's own ``nnictl create`` reports success and lets it die silently).

Nothing here imports NNI at module import time.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from ..errors import ExperimentError

__all__ = ['LOCALHOST_ONLY_JS', 'write_localhost_preload',
           'nni_environment', 'loopback_namespace_prefix', 'nnictl_create', 'nnictl_stop', 'rest_get',
           'wait_for_experiment', 'experiment_environment', 'manifest_entry', 'manager_log_path',
           'manager_failure_reason', 'trial_failure_reason', 'trial_directory', 'ExperimentStart',
           'start_experiment', 'stop_experiment', 'poll_experiment', 'free_port', 'pid_alive',
           'redirected_nni_home', 'rest_snapshot']


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
    * ``no_proxy`` covering localhost: the tuner and trials reach the manager past any HTTP proxy;
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
    # the tuner and the trials talk to the manager on localhost; a proxy must not see that traffic
    for key in ('no_proxy', 'NO_PROXY'):
        hosts = [h for h in env.get(key, '').split(',') if h]
        env[key] = ','.join(hosts + [h for h in ('localhost', '127.0.0.1', '::1') if h not in hosts])
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
    A refusal (bad config key, busy port) raises :class:`ExperimentError` with nnictl's own reason.
    """
    cmd = [*prefix, sys.executable, '-m', 'nni.tools.nnictl.nnictl', 'create', '--config', str(config),
           '--port', str(port)]
    out = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    text = _strip_ansi(out.stdout + out.stderr)
    match = re.search(r'experiment id is (\w+)', text, re.I) or re.search(r'nnictl stop (\w+)', text)
    if out.returncode != 0 or not match:
        raise ExperimentError(f'nnictl create --config {config} refused: {_nnictl_reason(text, port)}')
    return match.group(1)


_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _strip_ansi(text: str) -> str:
    return _ANSI.sub('', text)


def _one_line(text: str, limit: int = 240) -> str:
    text = ' '.join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _nnictl_reason(text: str, port: int) -> str:
    """The useful line of a failed ``nnictl create`` (its traceback's last line), with a fix where known."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and 'pkg_resources' not in ln]
    last = next((ln for ln in reversed(lines) if re.match(r'^[A-Za-z_.]*(Error|Exception)\b', ln)), None)
    last = last or next((ln for ln in reversed(lines) if 'ERROR' in ln), None) or (lines[-1] if lines else 'no output')
    last = re.sub(r'^[A-Za-z_.]*(Error|Exception):\s*', '', last)
    if re.search(r'Port \d+ is not idle', last):
        return f'port {port} is in use (another experiment or program); pass a free one with --port'
    if 'does not have field' in last:
        return f'{last.strip()}: an unknown key in the experiment YAML (NNI 3.0 config keys are camelCase)'
    return _one_line(last)


def nnictl_stop(experiment_id: str, env: Mapping[str, str], timeout: float = 60) -> bool:
    """``nnictl stop ID``; True when nnictl reports success."""
    out = subprocess.run([sys.executable, '-m', 'nni.tools.nnictl.nnictl', 'stop', experiment_id], env=dict(env),
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode == 0


# the manager is on loopback: an http_proxy from the environment must not see (or swallow) these requests
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def rest_get(port: int, path: str, timeout: float = 10) -> Any:
    """``GET http://127.0.0.1:PORT/api/v1/nni/<path>`` decoded from JSON (never through a proxy)."""
    url = f'http://127.0.0.1:{port}/api/v1/nni/{path.lstrip("/")}'
    with _LOOPBACK.open(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
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


# --------------------------------------------------------------------------- one-call experiment start


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _python_shim(scratch: Path) -> Path:
    """``<scratch>/bin/python``: runs this interpreter. The presets' trial commands say ``python``,
    which Debian lacks and which may be another environment without bnas-nni; a script (not a
    symlink) keeps a virtual environment's interpreter recognising its environment."""
    bindir = scratch / 'bin'
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / 'python'
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    return bindir


def experiment_environment(scratch: str | os.PathLike, base: Optional[Mapping[str, str]] = None,
                           threads: Optional[int] = None) -> Dict[str, str]:
    """:func:`nni_environment` plus ``python`` on ``PATH`` meaning this interpreter (for trial commands)."""
    env = nni_environment(scratch, base, threads)
    bindir = _python_shim(Path(scratch).resolve())
    env['PATH'] = f'{bindir}{os.pathsep}{env.get("PATH", "")}'
    return env


def manifest_entry(env: Mapping[str, str], experiment_id: str) -> Dict[str, Any]:
    """The experiment's row in ``$HOME/nni-experiments/.experiment`` (pid, port, logDir, status), or ``{}``."""
    path = Path(env['HOME']) / 'nni-experiments' / '.experiment'
    try:
        return dict(json.loads(path.read_text()).get(experiment_id) or {})
    except (OSError, ValueError):
        return {}


def manager_log_path(env: Mapping[str, str], experiment_id: str) -> Path:
    """``<experimentWorkingDirectory>/<id>/log/nnimanager.log`` (``logDir`` comes from the manifest)."""
    log_dir = manifest_entry(env, experiment_id).get('logDir') or str(Path(env['HOME']) / 'nni-experiments')
    return Path(log_dir) / experiment_id / 'log' / 'nnimanager.log'


def trial_directory(env: Mapping[str, str], experiment_id: str, trial_id: str) -> Path:
    """Where a local trial runs and logs (``trial.log``, ``trial.stdout``, ``trial.stderr``)."""
    log_dir = manifest_entry(env, experiment_id).get('logDir') or str(Path(env['HOME']) / 'nni-experiments')
    return Path(log_dir) / experiment_id / 'environments' / 'local-env' / 'trials' / trial_id


_LOG_LINE = re.compile(r'^\[[^\]]+\]\s+(?P<level>[A-Z]+)\s+\((?P<who>[^)]*)\)\s+(?P<msg>.*)$')

#: causes NNI states in its log, and what the user should do about each
_MANAGER_HINTS = (
    (re.compile(r'GPU info|NVML|nvidia-smi', re.I),
     'this machine has no usable NVIDIA GPU: set trialGpuNumber: 0 (the CPU presets in experiments/ do), '
     'or use a *_gpu.yml preset on a GPU machine'),
    (re.compile(r'EADDRINUSE', re.I), 'a port the manager needs is in use; pass another --port'),
    (re.compile(r'Tuner did not connect', re.I),
     'the tuner process could not reach the manager on localhost (a proxy setting without no_proxy=localhost, '
     'or a tuner that failed to import)'),
    (re.compile(r'ENOENT|no such file', re.I), 'a path in the experiment YAML does not exist; paths there are '
                                               'relative to the YAML file'),
)


def manager_failure_reason(log_path: str | os.PathLike) -> str:
    """One line saying why the NNI manager stopped, read from its ``nnimanager.log``.

    The first error (later ones are mostly the shutdown tripping over the first), its inner failure
    list, the last line of the dispatcher's log when the tuner is to blame, and a fix where the
    cause is a known one.
    """
    path = Path(log_path)
    try:
        lines = path.read_text(errors='replace').splitlines()
    except OSError:
        return f'no manager log at {path}'
    shutdown, errors = '', []
    for line in lines:
        m = _LOG_LINE.match(line)
        if not m:
            continue
        msg = m.group('msg').strip()
        if m.group('who') == 'ShutdownManager' and msg.startswith('Initiate shutdown'):
            reason = msg.split(':', 1)[-1].strip()
            if reason not in ('SIGTERM', 'SIGINT', 'REST request'):       # stopped from outside, not a cause
                shutdown = shutdown or reason
        elif m.group('level') in ('ERROR', 'CRITICAL', 'FATAL') and not msg.startswith('Error during shutting down'):
            errors.append(msg)
    if not errors and not shutdown:
        return f'the manager stopped without logging an error (see {path})'
    parts = [shutdown] if shutdown else []
    if errors:
        detail = re.sub(r'^(Error:\s*)+', '', errors[0])
        inner = re.search(r"failures:\s*\[\s*'([^']+)'", detail)
        detail = re.sub(r',?\s*collector output:.*$', '', detail)
        if inner:
            detail += f' ({inner.group(1)})'
        if detail.lower() != shutdown.lower():
            parts.append(detail)
    text = '; '.join(parts)
    if re.search(r'tuner|dispatcher', text, re.I):
        dispatcher = _last_line(path.parent / 'dispatcher.log')
        if dispatcher:
            text += f'; dispatcher.log ends with: {dispatcher}'
    hint = next((h for rx, h in _MANAGER_HINTS if rx.search(text + ' ' + ' '.join(errors))), '')
    return _one_line(text, 300) + (f'; {hint}' if hint else '') + f' (log: {path})'


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors='replace').splitlines() if ln.strip()]
    except OSError:
        return ''
    return _one_line(lines[-1], 160) if lines else ''


def trial_failure_reason(trial_dir: str | os.PathLike) -> str:
    """The last line a failed trial wrote to stderr (our trainers print one ``error: ...`` line)."""
    trial_dir = Path(trial_dir)
    for name in ('trial.stderr', 'stderr', 'trial.log'):
        path = trial_dir / name
        if path.is_file():
            lines = [ln.strip() for ln in path.read_text(errors='replace').splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith('error:')]
            if errors or lines:
                return _one_line((errors or lines)[-1], 200) + f' (see {path})'
    return f'no trial output in {trial_dir}'


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

    HOME is ``<scratch>/home``, the manager binds 127.0.0.1 (:func:`nni_environment`), ``python`` in
    trial commands is this interpreter. Returns when the first trial has run for ``settle`` seconds,
    reported a metric or ended (a trial that fails at once, e.g. on a missing dataset, shows up in
    ``failed``), when the experiment finished, or when ``timeout`` passed with no trial started and the
    manager still up (``started`` is then empty). A manager that dies meanwhile raises
    :class:`ExperimentError` with the reason from its log.
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
        alive = pid_alive(manifest_entry(env, experiment_id).get('pid'))
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
                _kill_manager(env, experiment_id)
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


def _kill_manager(env: Mapping[str, str], experiment_id: str) -> None:
    pid = manifest_entry(env, experiment_id).get('pid')
    if pid_alive(pid):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except OSError:
            pass


def stop_experiment(experiment_id: str, env: Mapping[str, str], timeout: float = 60) -> bool:
    """``nnictl stop ID``, then SIGTERM/SIGKILL the manager's PID (from the manifest) if it still runs.
    True when the manager is gone."""
    pid = manifest_entry(env, experiment_id).get('pid')
    try:
        nnictl_stop(experiment_id, env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pid_alive(pid):
            return True
        try:
            os.kill(int(pid), sig)
        except OSError:
            pass
    return not pid_alive(pid)


def poll_experiment(port: int, on_change: Callable[[Dict[str, Any]], None], *, timeout: float,
                    poll: float = 2.0) -> str:
    """Like :func:`wait_for_experiment`, calling ``on_change(trial)`` whenever a trial's status changes."""
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
        if status in ('DONE', 'STOPPED', 'ERROR'):
            return status
        time.sleep(poll)
    return status


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
