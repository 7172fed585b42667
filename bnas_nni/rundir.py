"""The run directory of a training run, written by rank 0 only.

Layout::

    <run_dir>/config.yaml      the resolved config (defaults <- YAML <- CLI <- NNI), saved once
    <run_dir>/log.txt          the log lines, as printed
    <run_dir>/metrics.csv      one row per finished epoch
    <run_dir>/tb/              TensorBoard event files (train/valid top1, top5, loss; lr)
    <run_dir>/checkpoint.pt    the latest epoch (see :mod:`bnas_nni.train.checkpoint`)

On resume the CSV keeps only rows of epochs before the resume point, so a run killed between the
CSV row and the checkpoint does not end up with a duplicated epoch.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .io import atomic_write_text, save_yaml

__all__ = ['RunDir', 'setup_logging', 'CSV_FIELDS']

CSV_FIELDS = ['epoch', 'lr', 'drop_path_prob', 'train_loss', 'train_top1', 'train_top5', 'valid_loss', 'valid_top1',
              'valid_top5', 'epoch_seconds']
LOG_FORMAT = '%(asctime)s %(message)s'
DATE_FORMAT = '%m/%d %I:%M:%S %p'


def setup_logging(is_main: bool, log_file: Optional[Path] = None) -> logging.Logger:
    """The ``bnas_nni.train`` logger: stdout on rank 0 (silent elsewhere), plus ``log_file`` if given."""
    logger = logging.getLogger('bnas_nni.train')
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    if is_main:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
        if log_file is not None:
            fh = logging.FileHandler(log_file)
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    return logger


class RunDir:
    """Files of one run. Every method is a no-op unless ``is_main``."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.tensorboard = tensorboard
        self._writer = None

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

    def create(self) -> 'RunDir':
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
        return self

    def save_config(self, cfg: Mapping[str, Any]) -> None:
        if self.is_main:
            save_yaml(dict(cfg), self.config_path)

    def read_rows(self) -> List[Dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline='') as f:
            return list(csv.DictReader(f))

    def truncate_rows(self, before_epoch: int) -> None:
        """Keep only the rows of epochs ``< before_epoch`` (called on resume)."""
        if not self.is_main or not self.csv_path.is_file():
            return
        rows = [r for r in self.read_rows() if int(r['epoch']) < before_epoch]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Append one CSV row and the matching TensorBoard scalars."""
        if not self.is_main:
            return
        new = not self.csv_path.is_file()
        with open(self.csv_path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction='ignore')
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, '') for k in CSV_FIELDS})
        writer = self.writer()
        if writer is not None:
            epoch = int(row['epoch'])
            for split in ('train', 'valid'):
                for m in ('top1', 'top5', 'loss'):
                    if f'{split}_{m}' in row:
                        writer.add_scalar(f'{split}/{m}', float(row[f'{split}_{m}']), epoch)
            writer.add_scalar('lr', float(row['lr']), epoch)
            writer.flush()

    def writer(self):
        """A TensorBoard ``SummaryWriter`` on ``<run_dir>/tb`` (created on first use)."""
        if not (self.is_main and self.tensorboard):
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path / 'tb'))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
