"""Nothing silent, nothing mixed up: non-finite values stop a search or a training run in one line with the
last good state untouched, and a run directory has exactly one writer."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnas_nni.cli import main
from bnas_nni.paths import REPO_ROOT, experiments_dir

QUICK_SEARCH = str(experiments_dir() / 'search_quick_fashion.yaml')
QUICK_TRAIN = str(experiments_dir() / 'train_quick_fashion.yaml')
TINY_SEARCH = ['--set', 'train_subset=128', '--set', 'image_size=8', '--set', 'batch_size=32', '--set', 'threads=1']


pytestmark = pytest.mark.usefixtures('needs_fashion')


def _one_line(capsys, *needles):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith('error: '), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_search_with_a_diverging_lr_stops_in_one_line(tmp_path, capsys):
    run = tmp_path / 'nan'
    rc = main(['search', '--config', QUICK_SEARCH, '--epochs', '2', '--set', 'lr=1e6', *TINY_SEARCH,
               '--run-dir', str(run)])
    assert rc == 2
    line = _one_line(capsys, 'non-finite', 'at epoch 0 step', 'lower the learning rate')
    assert 'fp16' not in line                                  # the fix fits the run: no fp16 here
    assert not (run / 'genotype.yaml').exists() and not (run / 'checkpoint.pt').exists()   # no all-zeroise genotype


def test_search_nan_keeps_the_last_good_epoch_and_resumes(tmp_path):
    from bnas_nni.genotypes import load_genotype
    from bnas_nni.search.run import resolve_search_config, run_search
    from bnas_nni.train.loop import NonFiniteError

    run = tmp_path / 'run'
    cfg = resolve_search_config(QUICK_SEARCH, {'epochs': 3, 'train_subset': 128, 'image_size': 8, 'batch_size': 32,
                                               'threads': 1, 'run_dir': str(run), 'progress': 'never'})

    def explode_after_first_epoch(record, driver):
        if record['epoch'] == 0:
            driver.lr = 1e6                         # epoch 1 diverges
    with pytest.raises(NonFiniteError, match='epoch 1 step'):
        run_search(cfg, epoch_callbacks=[explode_after_first_epoch], log=lambda s: None)
    kept = load_genotype(run / 'genotype.yaml')
    ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['state_dict'].values()
                                      if v.is_floating_point())
    history = __import__('json').loads((run / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in history] == [0] and kept == load_genotype(run / 'genotype.yaml')
    summary = run_search(cfg, resume=True, log=lambda s: None)           # resumable from the last good epoch
    assert summary['driver'].start_epoch == 3 and len(summary['driver'].history) == 3


def test_training_with_a_diverging_lr_stops_in_one_line(tmp_path, capsys):
    run = tmp_path / 'nan'
    rc = main(['train', '--config', QUICK_TRAIN, '--epochs', '2', '--set', 'lr=1e6', '--train-subset', '256',
               '--val-subset', '64', '--threads', '1', '--run-dir', str(run)])
    assert rc == 2
    line = _one_line(capsys, 'non-finite', 'lower the learning rate (lr)')
    assert 'fp16' not in line and 'Traceback' not in line
    epoch = int(line.split('at epoch ')[1].split()[0])
    if epoch == 0:
        assert not (run / 'checkpoint.pt').exists()
    else:                                   # the last good epoch's checkpoint, never one with NaN weights
        ckpt = torch.load(run / 'checkpoint.pt', weights_only=True)
        assert ckpt['epoch'] == epoch
        assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())


LONG_SEARCH = [sys.executable, '-m', 'bnas_nni', 'search', '--config', QUICK_SEARCH, '--epochs', '40',
               '--set', 'train_subset=256', '--set', 'image_size=8', '--set', 'batch_size=32', '--set', 'threads=1']


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _start(argv, env):
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _holder(run: Path) -> str:
    lock = run / '.lock'
    return lock.read_text().split()[0] if lock.is_file() and lock.read_text().strip() else ''


@pytest.mark.parametrize('command', ['search', 'train'])
def test_one_writer_per_run_directory_and_stale_locks(tmp_path, command):
    """Two runs started into the same directory a moment apart: the second stops at once naming the first's
    PID; after the first is killed -9, its stale lock is taken over."""
    from bnas_nni.errors import ConfigError
    from bnas_nni.rundir import RunDir

    run = tmp_path / 'run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO_ROOT)}
    if command == 'search':
        argv = LONG_SEARCH + ['--run-dir', str(run)]
    else:
        argv = [sys.executable, '-m', 'bnas_nni', 'train', '--config', QUICK_TRAIN, '--epochs', '40', '--threads', '1',
                '--train-subset', '512', '--val-subset', '64', '--run-dir', str(run)]
    first = _start(argv, env)
    try:
        assert _wait_for(lambda: _holder(run) == str(first.pid) or first.poll() is not None)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f'in use by another run (PID {first.pid})' in err[0], err
        assert first.poll() is None                          # the first run was not disturbed
        # the first run writes its config once its data is loaded (seconds on a loaded machine): kill it after that,
        # so that the check below sees whether taking over the lock removes anything
        assert _wait_for(lambda: (run / 'config.yaml').is_file() or first.poll() is not None)
        os.killpg(first.pid, signal.SIGKILL)                 # a real crash: the lock file stays behind
        first.wait(30)
        assert _holder(run) == str(first.pid)
        taken = RunDir(run).acquire()                        # the stale lock of the dead process is taken over
        assert _holder(run) == str(os.getpid())
        with pytest.raises(ConfigError, match=f'in use by another run .PID {os.getpid()}'):
            RunDir(run).acquire()                            # ... and really held again
        taken.close()
        assert (run / 'config.yaml').is_file()               # nothing of the first run was removed
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
