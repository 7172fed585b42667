"""One training of a study, the same in-process (``--local``) and inside an NNI trial.

Contract: :func:`train_job` trains the cell of a :class:`~bnas_nni.study.results.Job` with the study's
protocol and training seed, and writes its result file (the ``results.csv`` row) atomically once the
training ended. A job with a result file is returned at once, never redone; a job whose training run
directory holds a checkpoint (a study killed mid-training) continues from it. The row holds only what
the computation determines, plus the two timing columns (:data:`~bnas_nni.study.results.TIMING_FIELDS`),
so the same job gives the same row wherever it runs.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import Any, Callable, Dict, Iterator

from ..console import log as console_log
from ..errors import ConfigError
from ..train.runner import run_training
from .config import StudyConfig
from .results import Job, StudyFiles

__all__ = ['train_job', 'cpu_seconds', 'outside_nni']


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def outside_nni() -> Iterator[None]:
    """Run the block as if NNI had not launched this process: the trainer then neither asks NNI for
    parameters a second time (the study trial already took its one set) nor reports; the trial reports
    the study's own final metric afterwards."""
    saved = os.environ.pop('NNI_PLATFORM', None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ['NNI_PLATFORM'] = saved


def train_job(study: StudyConfig, files: StudyFiles, job: Job,
              log: Callable[[str], None] = console_log) -> Dict[str, Any]:
    """Train ``job`` (see the module docstring); returns its row."""
    done = files.read_result(job)
    if done is not None:
        return done
    meta = files.read_cell(job.cell)
    if meta is None or meta.get('arm') != job.arm:
        raise ConfigError(f'study {files.root}: no cell {job.cell!r} of arm {job.arm!r} (cells/{job.cell}.yaml); '
                          'the trial parameters must name a cell the study derived')
    run_dir = files.training_dir(job)
    resume = (run_dir / 'checkpoint.pt').is_file()
    files.event(f'start {job.key} pid {os.getpid()}' + (' (continuing its checkpoint)' if resume else ''))
    t0, c0 = time.time(), cpu_seconds()
    with outside_nni():
        result = run_training(study.train_config,
                              study.train_overrides(str(files.cell_genotype(job.cell)), job.seed, str(run_dir)),
                              resume=resume)
    final = result['final'] or {}
    row = {'arm': job.arm, 'strategy': meta.get('strategy') or 'random cells', 'cell': job.cell,
           'search_seed': meta.get('search_seed'), 'seed': job.seed, 'top1': final.get('valid_top1'),
           'top5': final.get('valid_top5'), 'loss': final.get('valid_loss'), 'best_top1': result['best_top1'],
           'epochs': int(final.get('epoch', -1)) + 1, 'ops_m': meta.get('ops_m'), 'params': meta.get('params'),
           'latency_ms': meta.get('latency_ms'), 'genotype': meta.get('genotype'),
           'train_seconds': round(time.time() - t0, 2), 'cpu_seconds': round(cpu_seconds() - c0, 2)}
    files.write_result(job, row)
    files.event(f'done {job.key} top1 {row["top1"]}')
    log(f'study: {job.key} top-1 {row["top1"]:.2f}% ({row["train_seconds"]:.0f} s)')
    return row
