"""bnas-nni nni create|stop|list: NNI experiments started safely (manager on 127.0.0.1, own HOME), stopped, listed.

``create`` redirects ``HOME`` into a scratch folder (NNI keeps its experiment manifest in
``~/nni-experiments``), makes the manager listen on 127.0.0.1 only, runs ``nnictl create`` and
waits until a trial has really started; a manager that died prints the reason from its log and
exits 2. ``stop`` and ``list`` use the same scratch folder, so they find the experiments ``create``
started. The logic lives in :mod:`.lifecycle` (create, stop), :mod:`.nnictl`, :mod:`.rest` and
:mod:`.forensics`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any, Dict

from ...errors import ExperimentError
from .environment import nni_environment
from .forensics import trial_failure_reason
from .lifecycle import start_experiment, stop_experiment
from .nnictl import manifest_entry, nnictl_command, trial_directory
from .rest import free_port, poll_experiment

DEFAULT_SCRATCH = 'runs/nni-scratch'


def _metric_text(trial: Dict[str, Any]) -> str:
    finals = trial.get('finalMetricData') or []
    if not finals:
        return ''
    try:
        value = json.loads(finals[-1]['data'])
        value = json.loads(value) if isinstance(value, str) else value
    except (KeyError, ValueError, TypeError):
        return ''
    if isinstance(value, dict):
        value = value.get('default', value)
    return f' final {value:.4g}' if isinstance(value, (int, float)) else f' final {value}'


def _cmd_create(args: argparse.Namespace) -> int:
    port = args.port or free_port()
    start = start_experiment(args.config, port, args.scratch, timeout=args.timeout, settle=args.settle)
    scratch = '' if args.scratch == DEFAULT_SCRATCH else f' --scratch {args.scratch}'
    if start.started:
        state = f'{len(start.started)} trial(s) started'
    elif start.status == 'UNKNOWN':
        state = f'but its REST API did not answer within {args.timeout:.0f} s'
    else:
        state = f'no trial started within {args.timeout:.0f} s (status {start.status}; trials may wait for resources)'

    print(f'NNI experiment {start.experiment_id} is running: {start.url}  ({state})')
    print(f'  trials over REST: {start.url}/api/v1/nni/trial-jobs   manager log: {start.manager_log}')
    print(f'  stop it with: bnas-nni nni stop {start.experiment_id}{scratch}')
    for trial in start.failed:
        trial_dir = trial_directory(start.env, start.experiment_id, trial['trialJobId'])
        print(f'warning: trial {trial["trialJobId"]} failed: {trial_failure_reason(trial_dir)}',
              file=sys.stderr)
    if not args.wait:
        return 0

    def show(trial: Dict[str, Any]) -> None:
        print(f'  trial {trial["trialJobId"]} {trial.get("status")}{_metric_text(trial)}', flush=True)

    status = poll_experiment(port, show, timeout=args.wait_timeout)
    print(f'experiment {start.experiment_id}: {status}; the web UI stays up until you stop it')
    return 0 if status == 'DONE' else 1


def _nnictl(args: argparse.Namespace, *nnictl_args: str) -> int:
    env = nni_environment(args.scratch)
    env['PYTHONWARNINGS'] = 'ignore:pkg_resources is deprecated'     # nnictl's import, on every call
    return subprocess.run(nnictl_command(*nnictl_args), env=env).returncode


def _cmd_stop(args: argparse.Namespace) -> int:
    if args.all:
        return _nnictl(args, 'stop', '--all')
    env = nni_environment(args.scratch)
    if not manifest_entry(env, args.id):
        raise ExperimentError(f'no experiment {args.id!r} in {args.scratch}; `bnas-nni nni list` shows the known ones '
                              '(pass the --scratch that create used)')
    ok = stop_experiment(args.id, env)
    print(f'experiment {args.id} stopped' if ok else f'experiment {args.id}: the manager is still running')
    return 0 if ok else 1


def _cmd_list(args: argparse.Namespace) -> int:
    return _nnictl(args, 'experiment', 'list', '--all')


def register(subparsers: Any) -> None:
    """Add ``bnas-nni nni {create,stop,list}``."""
    p = subparsers.add_parser('nni', help='start, stop and list NNI experiments (web UI) safely',
                              description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='nni_command', metavar='ACTION')

    def scratch_option(q: argparse.ArgumentParser) -> None:
        q.add_argument('--scratch', default=DEFAULT_SCRATCH,
                       help=f'folder for the redirected HOME and the loopback preload (default {DEFAULT_SCRATCH})')

    c = sub.add_parser('create', help='start an experiment YAML (experiments/nnictl_*.yml) and wait until it runs')
    c.add_argument('config', metavar='CONFIG', help='experiment YAML, e.g. experiments/nnictl_train_fashion.yml')
    c.add_argument('--port', type=int, default=8080,
                   help='web UI / REST port on 127.0.0.1 (default 8080; 0 = any free)')
    scratch_option(c)
    c.add_argument('--timeout', type=float, default=120, help='seconds to wait for the first trial (default 120)')
    c.add_argument('--settle', type=float, default=20,
                   help='seconds to watch the first trial for an early failure (default 20)')
    c.add_argument('--wait', action='store_true', help='then follow the trials until the experiment is done')
    c.add_argument('--wait-timeout', type=float, default=24 * 3600, help='give up following after this many seconds')
    c.set_defaults(func=_cmd_create)

    s = sub.add_parser('stop', help='stop an experiment (nnictl stop, then its manager by PID)')
    s.add_argument('id', nargs='?', metavar='ID', help='experiment id (printed by create)')
    s.add_argument('--all', action='store_true', help='stop every experiment of this scratch folder')
    scratch_option(s)
    s.set_defaults(func=lambda a: _cmd_stop(a) if (a.id or a.all) else (s.print_usage(), 2)[1])

    ls = sub.add_parser('list', help='experiments started with this scratch folder (nnictl experiment list --all)')
    scratch_option(ls)
    ls.set_defaults(func=_cmd_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
