"""The run directory of a search or a training run: one writer, written by rank 0 only.

Layout::

    <run_dir>/config.yaml      the resolved config, saved once (compared on --resume)
    <run_dir>/log.txt          the log lines, as printed
    <run_dir>/metrics.csv      one row per finished epoch
    <run_dir>/tb/              TensorBoard event files
    <run_dir>/checkpoint.pt    the latest epoch (bnas_nni.checkpoints)
    <run_dir>/.lock            held (fcntl.flock) by the process writing the directory; holds its PID

A second search or training into a directory in use stops at once with one line naming the holder's
PID. The lock belongs to the open file, so the kernel drops it when its process dies however it dies
(kill -9 included): a stale lock file of a dead process is simply taken over, and the hidden temporary
files a kill -9 left in the middle of a write (``.checkpoint.pt.XXXXXXXX.tmp``) are removed then.

``metrics.csv`` always agrees with the checkpoint, wherever a run was stopped: every row is written
whole (the file is rewritten atomically, never appended in place), an epoch's row is written before its
checkpoint (:meth:`RunDir.commit_epoch`), and a run that starts or resumes at epoch ``e`` first drops
the rows of epochs ``>= e`` (:meth:`RunDir.truncate_rows`): a kill between the row and the checkpoint
neither loses the row nor writes it twice.
"""
from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .console import ConsoleHandler
from .errors import ConfigError
from .io import (
    StorageError,
    atomic_write_text,
    check_output_dir,
    is_storage_error,
    load_yaml,
    remove_stale_temp_files,
    save_yaml,
    storage_errors,
)

__all__ = ['RunDir', 'setup_logging', 'LOGGER']

LOG_FORMAT = '%(asctime)s %(message)s'
DATE_FORMAT = '%m/%d %I:%M:%S %p'
LOGGER = logging.getLogger('bnas_nni.run')


def setup_logging(is_main: bool, log_file: Optional[Path] = None) -> logging.Logger:
    """The run logger: stdout on rank 0 (silent elsewhere), plus ``log_file`` if given."""
    logger = LOGGER
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    if is_main:
        sh = ConsoleHandler(sys.stdout)              # log lines go above the progress bars
        sh.setFormatter(fmt)
        logger.addHandler(sh)
        if log_file is not None:
            fh = _LogFileHandler(log_file, delay=True)       # created with the first line
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    return logger


class _LogFileHandler(logging.FileHandler):
    """``log.txt``: a write the storage refuses stops the run with one :class:`StorageError` line instead of
    logging's "--- Logging error ---" traceback on every later line."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and is_storage_error(exc):
            raise StorageError.writing(self.baseFilename, exc.errno) from None
        super().handleError(record)


class _StorageGuard:
    """A writer whose every call turns a write the storage refuses into a :class:`StorageError` naming ``path``
    (TensorBoard writes from a thread and re-raises its ``OSError`` at a later call, without a file name)."""

    def __init__(self, target: Any, path: Path) -> None:
        self._target, self._path = target, path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with storage_errors(self._path):
                return attr(*args, **kwargs)
        return guarded


class RunDir:
    """Files of one run. Writing methods are no-ops unless ``is_main``."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True, tensorboard: bool = True,
                 csv_fields: Optional[Sequence[str]] = None) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.tensorboard = tensorboard
        self.csv_fields = list(csv_fields) if csv_fields else None
        self._writer = None
        self._lock_file = None
        self._created = False
        self._created_dirs: List[Path] = []

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / 'config.yaml'

    @property
    def csv_path(self) -> Path:
        return self.path / 'metrics.csv'

    @property
    def log_path(self) -> Path:
        return self.path / 'log.txt'

    @property
    def checkpoint_path(self) -> Path:
        return self.path / 'checkpoint.pt'

    @property
    def lock_path(self) -> Path:
        return self.path / '.lock'

    # ------------------------------------------------------------------ one writer

    def acquire(self) -> 'RunDir':
        """Create the directory and take its lock (rank 0); one-line error when another process holds it."""
        if not self.is_main or self._lock_file is not None:
            return self
        check_output_dir(self.path, 'run directory', '--run-dir')
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._created = bool(missing)
        self._created_dirs = missing            # removed again by release() if nothing was written
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, 'a+')
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().split()
            f.close()
            pid = holder[0] if holder else 'unknown'
            raise ConfigError(f'{self.path} is in use by another run (PID {pid}); wait for it to finish, stop it, '
                              'or choose another run directory') from None
        f.seek(0)
        f.truncate()
        f.write(f'{os.getpid()} {time.strftime("%Y-%m-%dT%H:%M:%S")}\n')
        f.flush()
        self._lock_file = f
        # nobody else writes here now: temporary files are leftovers of a writer killed mid-write
        remove_stale_temp_files(self.path)
        for sub in os.scandir(self.path):
            if sub.is_dir(follow_symlinks=False) and sub.name != 'tb':
                remove_stale_temp_files(sub.path)           # stage directories of multi-stage recipes
        return self

    def check_free(self) -> None:
        """One-line error if the directory cannot be a run directory (a file, a name too long) or another
        live process holds it (checked before anything else)."""
        if self.is_main:
            check_output_dir(self.path, 'run directory', '--run-dir')
        if self.is_main and self.path.is_dir() and self._lock_file is None:
            self.acquire().release()

    def release(self) -> None:
        """Drop the lock; a directory this run created and never wrote to is removed again."""
        if self._lock_file is not None:
            if self._created and [e.name for e in os.scandir(self.path)] == [self.lock_path.name]:
                self.lock_path.unlink()
                for folder in self._created_dirs:   # the run directory, then parents it created (runs/)
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            self._lock_file.close()     # closing the file drops the flock
            self._lock_file = None

    def __enter__(self) -> 'RunDir':
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ files

    def save_config(self, cfg: Mapping[str, Any]) -> None:
        if self.is_main:
            save_yaml(dict(cfg), self.config_path)

    def read_config(self) -> Optional[Dict[str, Any]]:
        if not self.config_path.is_file():
            return None
        data = load_yaml(self.config_path)
        return dict(data) if isinstance(data, Mapping) else None

    def read_rows(self) -> List[Dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline='') as f:
            return list(csv.DictReader(f))

    def truncate_rows(self, before_epoch: int) -> None:
        """Keep only the rows of epochs ``< before_epoch`` (called when a run starts or resumes at that epoch)."""
        if not self.is_main or not self.csv_path.is_file():
            return
        rows = [r for r in self.read_rows() if int(r['epoch']) < before_epoch]
        fields = self.csv_fields or (list(rows[0]) if rows else ['epoch'])
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def log_epoch(self, row: Mapping[str, Any], scalars: Optional[Mapping[str, float]] = None) -> None:
        """Add one CSV row (columns: ``csv_fields``, else the first row's keys) and TensorBoard scalars.

        The file is rewritten atomically with the new row rather than appended to in place, so a kill or
        a full disk leaves the file as it was before this row or after it, never half a row."""
        if not self.is_main:
            return
        fields = self.csv_fields or list(row)
        old = self.csv_path.read_bytes().decode() if self.csv_path.is_file() else ''
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore')
        if not old:
            w.writeheader()
        w.writerow({k: row.get(k, '') for k in fields})
        atomic_write_text(self.csv_path, old + buf.getvalue())
        writer = self.writer()
        if writer is not None and scalars:
            epoch = int(row['epoch'])
            for tag, value in scalars.items():
                writer.add_scalar(tag, float(value), epoch)
            writer.flush()

    def commit_epoch(self, row: Mapping[str, Any], scalars: Optional[Mapping[str, float]],
                     save_checkpoint: Callable[[], Any]) -> None:
        """Record a finished epoch: its row first, then its checkpoint (``save_checkpoint()``). Stopped
        between the two, the run keeps a row past its checkpoint, which the next start drops
        (:meth:`truncate_rows`); the other order would lose the row."""
        self.log_epoch(row, scalars)
        save_checkpoint()

    def writer(self):
        """A TensorBoard ``SummaryWriter`` on ``<run_dir>/tb`` (created on first use); a write the storage
        refuses raises a :class:`~bnas_nni.io.StorageError` naming ``tb/``."""
        if not (self.is_main and self.tensorboard):
            return None
        if self._writer is None:
            # TensorBoard is slow to import and only a run that writes scalars needs it
            from torch.utils.tensorboard import SummaryWriter

            tb = self.path / 'tb'
            with storage_errors(tb):
                self._writer = _StorageGuard(SummaryWriter(log_dir=str(tb)), tb)
        return self._writer

    def close(self) -> None:
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.close()
        finally:
            self.release()
