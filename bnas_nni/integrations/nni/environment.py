"""The environment every NNI process of bnas-nni runs in, for child processes and in this process.

Contract: NNI writes its experiment manifest to ``~/nni-experiments`` whatever the config says, and
its manager has no host option. :func:`nni_environment` returns an environment for ``nnictl`` and
its trials with ``HOME`` redirected into a scratch folder, the loopback preload of
:mod:`.loopback` in ``NODE_OPTIONS``, gloo pinned to ``lo`` and ``localhost`` exempt from proxies;
:func:`experiment_environment` adds ``python`` on ``PATH`` meaning this interpreter, for the
presets' trial commands. :func:`redirected_nni_home` applies the same redirection to this process
for an in-process ``NasExperiment``, including the one default of nnictl that was bound to the old
``HOME`` at import time, and restores everything on exit. Only that context manager imports NNI.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

from .loopback import write_localhost_preload

__all__ = ['nni_environment', 'experiment_environment', 'redirected_nni_home']


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


@contextlib.contextmanager
def redirected_nni_home(run_dir: Path, manager: bool) -> Iterator[Dict[str, str]]:
    """Point ``HOME`` (and NNI's manifest folder) into ``run_dir`` and, for the NNI manager, preload
    the localhost-only binding; restore everything afterwards."""
    # local import: importing nni takes seconds, and only an in-process experiment needs it
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
