"""``run_study``: a study from its config to its report, continued wherever it was stopped.

Order: lock the run directory (one study writes it); keep the study as ``study.yaml`` (a continued study
must match it, except how it runs: ``trial_concurrency``, ``port``, ``max_duration``); state every arm's
search cost side by side and refuse unequal budgets; make the missing cells (searches, random samples);
train every (arm, cell, seed) without a result, in this process (``local``) or as the trials of one NNI
experiment; then write ``results.csv``, ``summary.json``, ``report.md`` and the plots. Finished searches
and trainings are never redone (see :mod:`bnas_nni.study.results`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..console import log as console_log
from ..errors import ConfigError, ExperimentError
from ..io import load_yaml, save_yaml
from ..rundir import RunDir
from .arms import arm_costs, check_equal_budgets
from .cells import ensure_cells, plan_jobs
from .config import RESUME_FREE, StudyConfig, parse_study
from .jobs import train_job
from .nni_trials import run_experiment
from .ranking import rank_cells
from .report import budget_table, measured_table, write_report
from .results import StudyFiles

__all__ = ['run_study', 'default_study_dir']


def default_study_dir(study: StudyConfig) -> Path:
    return Path('runs') / f'study-{study.name}'


def _check_same_study(study: StudyConfig, files: StudyFiles) -> None:
    if not files.study_path.is_file():
        save_yaml(study.to_dict(), files.study_path)
        return
    saved = parse_study(load_yaml(files.study_path), source=str(files.study_path))
    old, new = saved.to_dict(), study.to_dict()
    diff = sorted(k for k in new if k not in RESUME_FREE and old.get(k) != new[k])
    if diff:
        raise ConfigError(f'{files.root} holds a study with other {", ".join(diff)}; continue it with the same '
                          'config or choose another --run-dir')
    save_yaml(study.to_dict(), files.study_path)


def run_study(study: StudyConfig, run_dir: Optional[str | Path] = None, *, local: bool = False,
              log: Callable[[str], None] = console_log) -> Dict[str, Any]:
    """Run (or continue) ``study`` in ``run_dir``; returns the summary written to ``summary.json``."""
    costs = arm_costs(study)                      # before any file: unequal budgets are refused up front
    log(budget_table(costs, study))
    check_equal_budgets(costs, study.budget_tolerance)
    files = StudyFiles(run_dir or default_study_dir(study))
    lock = RunDir(files.root)
    lock.check_free()
    lock.acquire()
    try:
        _check_same_study(study, files)
        t0 = time.time()
        jobs = plan_jobs(study)
        done = sum(files.read_result(j) is not None for j in jobs)
        files.event(f'study {"continues" if done or files.events() else "starts"}: {done} of {len(jobs)} '
                    f'trainings done ({"local" if local else "NNI"})')
        log(f'study {study.name}: {len(jobs)} trainings ({len(study.train_seeds)} seeds per cell), {done} done; '
            f'run directory {files.root}')
        ensure_cells(study, files, {c.arm: c for c in costs}, log)
        log(measured_table(study, files, costs))
        pending = [j for j in jobs if files.read_result(j) is None]
        if pending and local:
            for job in pending:
                train_job(study, files, job, log)
                files.write_csv(files.rows(jobs))
        elif pending:
            missing: List = run_experiment(files, study.name, pending, concurrency=study.trial_concurrency,
                                           port=study.port, max_duration=study.max_duration, log=log)
            if missing:
                files.write_csv(files.rows(jobs))
                raise ExperimentError(f'{len(missing)} of {len(pending)} trainings did not finish in the NNI '
                                      f'experiment (first: {missing[0].key}); see {files.root}/nni and rerun the '
                                      'same command to continue')
        rows = files.rows(jobs)
        files.write_csv(rows)
        rank_cells(study, files, list(dict.fromkeys(j.cell for j in jobs)), log)
        summary = write_report(study, files, rows, costs)
        log(f'study {study.name}: {len(rows)} trainings in results.csv; report {files.report_path} '
            f'({time.time() - t0:.0f} s this run)')
        return summary
    finally:
        lock.close()
