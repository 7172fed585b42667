"""Every fault ends in one line with nothing lost: a write the storage refuses (disk full, quota, file size
limit, read-only), SIGTERM, a kill at any point (stale temporary files, metrics.csv against the checkpoint).

Storage faults are real ones where that is possible without root: ``RLIMIT_FSIZE`` makes the kernel refuse
a write past a file size (``EFBIG``), exactly where a full disk refuses one (``ENOSPC``)."""
from __future__ import annotations

import contextlib
import csv
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnas_nni.cli import run_guarded
from bnas_nni.io import StorageError, append_text, atomic_path, atomic_torch_save, atomic_write_text
from bnas_nni.paths import REPO_ROOT, experiments_dir
from bnas_nni.rundir import RunDir

QUICK_SEARCH = str(experiments_dir() / 'search_quick_fashion.yaml')
QUICK_TRAIN = str(experiments_dir() / 'train_quick_fashion.yaml')
TINY_SEARCH = {'train_subset': 128, 'image_size': 8, 'batch_size': 32, 'threads': 1, 'progress': 'never',
               'tensorboard': False}
TINY_TRAIN = {'train_subset': 64, 'val_subset': 32, 'batch_size': 32, 'init_channels': 4, 'layers': 3,
              'threads': 1, 'progress': 'never', 'tensorboard': False, 'report_freq': 1000}


def _temps(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob('.*.tmp'))


def _epochs(run: Path) -> list:
    with open(run / 'metrics.csv', newline='') as f:
        return [int(r['epoch']) for r in csv.DictReader(f)]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses (EFBIG) any write that would grow a file of this process past ``nbytes``
    (Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# --------------------------------------------------------------------------- storage refusing a write


@pytest.mark.parametrize('err, reason', [(errno.ENOSPC, 'no space left on device'),
                                         (errno.EDQUOT, 'disk quota exceeded'),
                                         (errno.EFBIG, 'file too large'),
                                         (errno.EROFS, 'read-only file system')])
def test_a_refused_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, err, reason):
    target = tmp_path / 'checkpoint.pt'
    target.write_bytes(b'previous')
    with pytest.raises(StorageError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'half of the new')
            raise OSError(err, os.strerror(err))        # what the kernel says to the next write
    msg = str(info.value)
    assert msg.startswith(f'{reason} writing {target}; ') and '--resume' in msg and '\n' not in msg
    assert target.read_bytes() == b'previous' and _temps(tmp_path) == []
    assert info.value.exit_status == 1


def test_real_size_limit_refuses_torch_save_append_and_text_writes_cleanly(tmp_path):
    big = {'w': torch.zeros(50_000)}
    target = tmp_path / 'checkpoint.pt'
    atomic_torch_save({'w': torch.ones(3)}, target)
    before = target.read_bytes()
    log = tmp_path / 'log.txt'
    log.write_text('line 1\n')
    with file_size_limit(64 * 1024):
        with pytest.raises(StorageError, match=f'^file too large writing {target};'):
            atomic_torch_save(big, target)              # torch's own writer would only say "file write failed"
        with pytest.raises(StorageError, match=f'writing {tmp_path / "genotype.yaml"};'):
            atomic_write_text(tmp_path / 'genotype.yaml', 'x' * 100_000)
        with pytest.raises(StorageError, match=f'writing {log};'):
            append_text(log, 'y' * 100_000 + '\n')
    assert target.read_bytes() == before and torch.load(target, weights_only=True)['w'].tolist() == [1, 1, 1]
    assert log.read_text() == 'line 1\n'                # no half line
    assert not (tmp_path / 'genotype.yaml').exists() and _temps(tmp_path) == []


def test_a_csv_row_the_storage_refuses_leaves_the_file_as_it_was(tmp_path):
    run = RunDir(tmp_path / 'run', csv_fields=['epoch', 'note'], tensorboard=False).acquire()
    run.log_epoch({'epoch': 0, 'note': 'a'})
    before = run.csv_path.read_bytes()
    with file_size_limit(len(before) + 20):
        with pytest.raises(StorageError, match='metrics.csv'):
            run.log_epoch({'epoch': 1, 'note': 'b' * 100})
    assert run.csv_path.read_bytes() == before and _temps(run.path) == []
    run.log_epoch({'epoch': 1, 'note': 'b'})
    assert _epochs(run.path) == [0, 1]
    run.close()


def test_tensorboard_and_the_log_file_on_a_full_disk_are_one_line(tmp_path, capsys):
    """TensorBoard writes from a thread (whose traceback would go to stderr) and the log goes through
    logging (which prints "--- Logging error ---" and carries on): both stop the run in one line."""
    from bnas_nni.rundir import LOGGER, setup_logging

    def tensorboard_job():
        run = RunDir(tmp_path / 'tb_run', csv_fields=['epoch'], tensorboard=True).acquire()
        try:
            run.log_epoch({'epoch': 0}, {'acc': 1.0})
            with file_size_limit((run.path / 'metrics.csv').stat().st_size + 64):
                for epoch in range(1, 200):
                    run.writer().add_scalar('acc', float(epoch), epoch)
                run.writer().flush()
        finally:
            run.close()

    assert run_guarded(tensorboard_job) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: file too large writing ') and '/tb;' in err[0], err

    log = tmp_path / 'log.txt'

    def logging_job():
        setup_logging(True, log)
        LOGGER.info('first line')
        with file_size_limit(log.stat().st_size + 10):
            LOGGER.info('a line longer than what is left ' * 4)

    try:
        assert run_guarded(logging_job) == 1
    finally:
        setup_logging(False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: file too large writing {log}; raise the file size limit (ulimit -f) or point the output '
                   'to another file system; the previous file is intact and a run continues from its last checkpoint '
                   'with --resume'], err


@pytest.mark.usefixtures('needs_fashion')
def test_disk_full_during_a_search_checkpoint_is_one_line_and_the_search_resumes(tmp_path, capsys):
    from bnas_nni.search.run import resolve_search_config, run_search

    run = tmp_path / 'run'
    cfg = resolve_search_config(QUICK_SEARCH, {**TINY_SEARCH, 'epochs': 2, 'run_dir': str(run)})
    limit = contextlib.ExitStack()

    def fill_the_disk(record, driver):
        if record['epoch'] == 1:                        # epoch 0 is checkpointed; epoch 1's checkpoint fails
            limit.enter_context(file_size_limit((run / 'checkpoint.pt').stat().st_size // 2))

    with limit:
        rc = run_guarded(lambda: run_search(cfg, epoch_callbacks=[fill_the_disk], log=lambda s: None))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith('error: file too large') and f'writing {run / "checkpoint.pt"};' in err[0]
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == 1       # the previous one, intact
    assert _temps(run) == []
    summary = run_search(cfg, resume=True, log=lambda s: None)
    assert summary['driver'].start_epoch == 2 and _epochs(run) == [0, 1]


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_unwinds_like_ctrl_c_removing_the_temporary_file(tmp_path, capsys):
    target = tmp_path / 'genotype.yaml'
    target.write_text('previous\n')

    def killed_mid_write():
        with atomic_path(target) as tmp:
            tmp.write_text('half')
            os.kill(os.getpid(), signal.SIGTERM)         # nnictl stop, a scheduler, kill
            time.sleep(30)

    assert run_guarded(killed_mid_write) == 143
    assert capsys.readouterr().err.strip() == 'interrupted by SIGTERM; the run directory is resumable with --resume'
    assert target.read_text() == 'previous\n' and _temps(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the handler lives only as long as the call
    assert run_guarded(lambda: (_ for _ in ()).throw(KeyboardInterrupt())) == 130


def _start(argv):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO_ROOT)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate() or proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


@pytest.mark.usefixtures('needs_fashion')
def test_sigterm_stops_a_search_in_one_line_and_it_resumes(tmp_path):
    run = tmp_path / 'run'
    argv = [sys.executable, '-m', 'bnas_nni', 'search', '--config', QUICK_SEARCH, '--epochs', '40',
            '--set', 'train_subset=256', '--set', 'image_size=8', '--set', 'batch_size=32', '--set', 'threads=1',
            '--set', 'tensorboard=false', '--run-dir', str(run)]
    for attempt, ready in ((argv, lambda: (run / 'checkpoint.pt').is_file()),
                           (argv + ['--resume'], lambda: 'resumed from' in _text(run / 'log.txt'))):
        proc = _start(attempt)
        try:
            assert _wait_for(ready, proc), proc.stderr.read() if proc.poll() is not None else 'timed out'
            time.sleep(0.3)                               # somewhere inside an epoch or a checkpoint write
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        err = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
        assert rc == 143 and err == ['interrupted by SIGTERM; the run directory is resumable with --resume'], (rc, err)
        assert _temps(run) == []
        done = torch.load(run / 'checkpoint.pt', weights_only=True)['epoch']
        rows = _epochs(run)
        # every finished epoch has its row; at most one row past the checkpoint (dropped on resume)
        assert rows == list(range(len(rows))) and len(rows) in (done, done + 1), (rows, done)


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ''


# --------------------------------------------------------------------------- kills at any point


def test_locking_a_run_directory_removes_temporary_files_of_a_killed_writer(tmp_path):
    run = tmp_path / 'run'
    (run / 'step1').mkdir(parents=True)
    stale = [run / '.checkpoint.pt.k2j4h1x0.tmp', run / '.metrics.csv.a8d7e6f5.tmp',
             run / 'step1' / '.checkpoint.pt.q1w2e3r4.tmp']
    for p in stale:
        p.write_bytes(b'\0' * 1000)
    kept = [run / 'checkpoint.pt', run / 'notes.tmp', run / 'step1' / 'checkpoint.pt']
    for p in kept:
        p.write_bytes(b'mine')
    with RunDir(run) as locked:
        assert locked.lock_path.is_file()
        assert [p for p in stale if p.exists()] == [] and all(p.read_bytes() == b'mine' for p in kept)


@pytest.mark.usefixtures('needs_fashion')
def test_a_search_stopped_before_its_first_checkpoint_resumes_without_a_duplicate_row(tmp_path):
    from bnas_nni.search.run import resolve_search_config, run_search

    run = tmp_path / 'run'
    cfg = resolve_search_config(QUICK_SEARCH, {**TINY_SEARCH, 'epochs': 2, 'run_dir': str(run)})

    def stop_before_the_checkpoint(record, driver):
        raise KeyboardInterrupt                           # epoch 0's row is written, its checkpoint is not

    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, epoch_callbacks=[stop_before_the_checkpoint], log=lambda s: None)
    assert _epochs(run) == [0] and not (run / 'checkpoint.pt').exists()
    run_search(cfg, resume=True, log=lambda s: None)
    assert _epochs(run) == [0, 1]


@pytest.mark.usefixtures('needs_fashion')
@pytest.mark.parametrize('when', ['during', 'after'])
def test_training_stopped_around_a_checkpoint_keeps_metrics_and_checkpoint_in_step(tmp_path, monkeypatch, when):
    """Stopped while epoch 1's checkpoint is written (the row is already there) or right after it (before
    anything else): on resume every epoch has exactly one row."""
    import bnas_nni.train.runner as runner
    from bnas_nni.train.runner import run_training

    run = tmp_path / 'run'
    save = runner.save_checkpoint          # the name the training runner calls

    def stopping_save(model, path, **extra):
        if extra.get('epoch') == 2:
            if when == 'after':
                save(model, path, **extra)
            raise KeyboardInterrupt
        return save(model, path, **extra)

    monkeypatch.setattr(runner, 'save_checkpoint', stopping_save)
    with pytest.raises(KeyboardInterrupt):
        run_training(QUICK_TRAIN, {**TINY_TRAIN, 'epochs': 3, 'run_dir': str(run)})
    assert _epochs(run) == [0, 1]
    assert torch.load(run / 'checkpoint.pt', weights_only=True)['epoch'] == (2 if when == 'after' else 1)
    monkeypatch.setattr(runner, 'save_checkpoint', save)
    run_training(QUICK_TRAIN, {**TINY_TRAIN, 'epochs': 3, 'run_dir': str(run)}, resume=True)
    assert _epochs(run) == [0, 1, 2]
