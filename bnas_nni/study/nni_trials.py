"""The trainings of a study as one NNI experiment: every training is one trial, watched in the web UI.

Contract: :func:`run_experiment` writes ``<study>/nni/experiment.yml`` for the trainings not finished yet:
NNI's ``BatchTuner`` hands out one parameter set per trial, ``{'arm': ..., 'cell': ..., 'seed': ...}``,
and every trial runs ``python -m bnas_nni.study.nni_trials <study>``, which trains that job with
:func:`bnas_nni.study.jobs.train_job` (the same code as ``--local``) and reports its top-1 as the final
metric. The experiment is started with the project's safe life cycle (:mod:`bnas_nni.integrations.nni`:
``HOME`` redirected into ``<study>/nni``, the manager bound to 127.0.0.1), followed until it ends, and
stopped by id and PID. Its id, port and manager PID are kept in ``<study>/nni/experiment.json``; a study
continued after a kill first stops an experiment that record names which still runs. Concurrency is the
study's ``trial_concurrency`` (1 by default: NNI 3.0 mixes up concurrent trials, microsoft/nni#5726).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from ..cli import quiet_warnings, run_guarded
from ..console import log as console_log
from ..integrations.nni.environment import experiment_environment
from ..integrations.nni.forensics import trial_failure_reason
from ..integrations.nni.lifecycle import start_experiment, stop_experiment
from ..integrations.nni.nnictl import manifest_entry, trial_directory
from ..integrations.nni.processes import pid_alive
from ..integrations.nni.rest import free_port, rest_get, wait_for_experiment
from ..io import atomic_write_text, save_yaml
from ..paths import REPO_ROOT
from .results import Job, StudyFiles

__all__ = ['experiment_config', 'run_experiment', 'stop_previous_experiment', 'main']


def _duration_seconds(text: str) -> float:
    units = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
    text = str(text).strip()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def experiment_config(files: StudyFiles, name: str, jobs: Sequence[Job], concurrency: int,
                      max_duration: str) -> Dict[str, Any]:
    """The nnictl YAML of the study's pending trainings (see the module docstring)."""
    return {
        'experimentName': f'study-{name}',
        'trialCodeDirectory': str(REPO_ROOT),
        'trialCommand': f'python -m bnas_nni.study.nni_trials {files.root.resolve()}',
        'trialConcurrency': int(concurrency),
        'trialGpuNumber': 0,
        'maxTrialNumber': len(jobs),
        'maxExperimentDuration': max_duration,
        'experimentWorkingDirectory': str((files.root / 'nni' / 'experiments').resolve()),
        'searchSpace': {'combine_params': {'_type': 'choice', '_value': [j.params() for j in jobs]}},
        'tuner': {'name': 'BatchTuner'},
        'trainingService': {'platform': 'local', 'useActiveGpu': False},
    }


def _record_path(files: StudyFiles) -> Path:
    return files.root / 'nni' / 'experiment.json'


def stop_previous_experiment(files: StudyFiles, log: Callable[[str], None] = console_log) -> None:
    """Stop the experiment an earlier, killed run of this study left running (its trials would race ours)."""
    path = _record_path(files)
    if not path.is_file():
        return
    record = json.loads(path.read_text())
    env = experiment_environment(files.root / 'nni')
    pid = manifest_entry(env, record['id']).get('pid') or record.get('pid')
    if pid_alive(pid):
        log(f'study: stopping experiment {record["id"]} left running by an earlier run (manager PID {pid})')
        stop_experiment(record['id'], env)


def run_experiment(files: StudyFiles, name: str, jobs: Sequence[Job], *, concurrency: int = 1,
                   port: int | None = None, max_duration: str = '24h',
                   log: Callable[[str], None] = console_log) -> List[Job]:
    """Run ``jobs`` as the trials of one NNI experiment; returns the jobs that still have no result."""
    stop_previous_experiment(files, log)
    config = files.root / 'nni' / 'experiment.yml'
    save_yaml(experiment_config(files, name, jobs, concurrency, max_duration), config)
    port = port or free_port()
    start = start_experiment(config, port, files.root / 'nni', timeout=300, settle=1, threads=None)
    pid = manifest_entry(start.env, start.experiment_id).get('pid')
    atomic_write_text(_record_path(files), json.dumps({'id': start.experiment_id, 'port': port, 'pid': pid}) + '\n')
    files.event(f'start experiment {start.experiment_id} port {port} ({len(jobs)} trials)')
    log(f'study: NNI experiment {start.experiment_id}, {len(jobs)} trials, web UI {start.url} '
        f'(manager log {start.manager_log})')
    try:
        status = wait_for_experiment(port, timeout=_duration_seconds(max_duration) + 60, poll=2.0)
        try:
            trials = rest_get(port, 'trial-jobs')
        except (OSError, ValueError):
            trials = []
    finally:
        stop_experiment(start.experiment_id, start.env)
    files.event(f'done experiment {start.experiment_id} status {status}')
    missing = [j for j in jobs if files.read_result(j) is None]
    failed = [t for t in trials if t.get('status') in ('FAILED', 'SYS_CANCELED', 'USER_CANCELED')]
    for t in failed[:3]:
        reason = trial_failure_reason(trial_directory(start.env, start.experiment_id, t['trialJobId']))
        log(f'study: trial {t["trialJobId"]} {t.get("status")}: {reason}')
    if missing:
        log(f'study: experiment {start.experiment_id} ended {status} with {len(missing)} training(s) unfinished')
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """The trial command: train the job NNI hands this trial and report its top-1 (percent)."""
    quiet_warnings()
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print('usage: python -m bnas_nni.study.nni_trials STUDY_DIR', file=sys.stderr)
        return 2

    def trial() -> int:
        import nni  # only a trial talks to NNI

        from .config import load_study_config  # training and its configs: loaded by the trial only
        from .jobs import train_job

        files = StudyFiles(args[0])
        study = load_study_config(files.study_path)
        params = dict(nni.get_next_parameter() or {})
        job = Job(str(params['arm']), str(params['cell']), int(params['seed']))
        t0 = time.time()
        row = train_job(study, files, job)
        nni.report_final_result({'default': float(row['top1']), 'top5': float(row['top5'] or 0.0),
                                 'ops_m': float(row['ops_m'] or 0.0), 'seconds': round(time.time() - t0, 1)})
        return 0

    return run_guarded(trial)


if __name__ == '__main__':
    sys.exit(main())
