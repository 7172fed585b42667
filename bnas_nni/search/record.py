"""What a search writes into its run directory after every epoch, on both drivers.

:class:`SearchRecorder` is an epoch callback of :class:`~bnas_nni.search.binary_darts.BinaryDartsModule`:

* ``genotype.yaml`` / ``genotype_imagenet.yaml`` -- the kept (best-epoch) genotypes, rewritten atomically;
* ``alpha_history.json`` -- per epoch: alphas, entropy, metrics, the genotype of that epoch's alphas;
* ``metrics.csv`` -- one row per epoch (:data:`SEARCH_CSV_FIELDS`, plus :data:`LATENCY_CSV_FIELDS` when
  the search has a latency model), accuracies in percent, latencies in ms per batch;
* ``tb/`` -- ``epoch/*`` scalars (the driver adds per-step curves and edge probabilities), and the
  pictures: ``cell.png`` / ``cell_imagenet.png`` (the kept cells) and ``alphas/epoch_NNN.png`` (softmax(alpha),
  edges x ops), also as TensorBoard images (:func:`bnas_nni.plot.write_search_pictures`);
* ``log.txt`` -- one line per epoch.

:func:`attach_run_directory` gives the NNI path (``NasExperiment`` + ``BinaryDARTS(run_dir=...)``) the
same directory, its lock, and a resumable Lightning checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from ..console import log as console_log
from ..genotypes import save_genotype
from ..io import atomic_write_text
from ..plot import write_search_pictures
from ..rundir import RunDir
from .supernet import cell_ops

__all__ = ['SEARCH_CSV_FIELDS', 'LATENCY_CSV_FIELDS', 'search_csv_fields', 'SearchRecorder', 'attach_run_directory',
           'epoch_line']

SEARCH_CSV_FIELDS = ['epoch', 'lr', 'train_loss', 'train_acc', 'arch_ce', 'arch_loss', 'val_loss', 'val_acc',
                     'entropy', 'diversity_weight', 'epoch_seconds']
#: a search with a latency model also records the expected latency under the epoch's alphas and the
#: predicted latency of the epoch's derived genotype (ms per batch on the packed engine)
LATENCY_CSV_FIELDS = ['expected_latency_ms', 'predicted_latency_ms']


def search_csv_fields(latency: bool) -> list:
    """The ``metrics.csv`` columns of a search with (or without) a latency model."""
    return SEARCH_CSV_FIELDS + (LATENCY_CSV_FIELDS if latency else [])


def epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    """The per-epoch log line (accuracies in percent)."""
    parts = [f'epoch {record["epoch"] + 1}/{epochs}']
    for key, fmt in (('lr', '.6f'), ('train_loss', '.4f'), ('train_acc', '.2f'), ('arch_ce', '.4f'),
                     ('val_loss', '.4f'), ('val_acc', '.2f'), ('entropy', '.4f')):
        if record.get(key) is not None:
            parts.append(f'{key} {record[key]:{fmt}}')
    for key, label in (('expected_latency_ms', 'E[latency]'), ('predicted_latency_ms', 'derived latency')):
        if record.get(key) is not None:
            parts.append(f'{label} {record[key]:.3f} ms')
    if record.get('epoch_seconds') is not None:
        parts.append(f'({record["epoch_seconds"]:.1f}s)')
    return ' '.join(parts)


class SearchRecorder:
    """Writes the run directory after each recorded epoch (see the module docstring)."""

    def __init__(self, run: RunDir, *, name: str, epochs: int, strategy: str = 'binary-darts',
                 log: Callable[[str], None] = console_log, pictures: bool = True) -> None:
        self.run = run
        self.name = name
        self.epochs = int(epochs)
        self.strategy = strategy
        self.log = log
        self.pictures = pictures
        self._said: set = set()

    def __call__(self, record: Mapping[str, Any], module: Any) -> None:
        if not self.run.is_main:
            return
        cifar, imagenet = self.write_outputs(module)
        if self.pictures:
            write_search_pictures(self.run.path, alphas=record['alphas'], ops=cell_ops(module), epoch=record['epoch'],
                                  genotype=cifar, imagenet_genotype=imagenet, writer=self.run.writer(),
                                  log=self._log_once)
        row = {k: record.get(k) for k in search_csv_fields('expected_latency_ms' in record)}
        scalars = {f'epoch/{k}': record[k] for k in ('val_acc', 'val_loss', 'train_acc', 'entropy', 'diversity_weight',
                                                    *LATENCY_CSV_FIELDS)
                   if record.get(k) is not None}
        self.run.log_epoch(row, scalars)
        self.log(epoch_line(record, self.epochs))

    def _log_once(self, text: str) -> None:
        if text not in self._said:
            self._said.add(text)
            self.log(text)

    def write_outputs(self, module: Any):
        """The kept genotypes and the alpha history, atomically; returns the (CIFAR, ImageNet) genotypes."""
        cifar, imagenet = module.genotypes(self.name)
        if not self.run.is_main:
            return cifar, imagenet
        kept = module.best.get('epoch')
        acc = module.best.get('val_acc')
        meta = {'source': 'bnas-nni search', 'strategy': self.strategy,
                'epoch': None if kept is None or kept < 0 else int(kept) + 1,
                'supernet_val_acc': None if acc is None or acc < 0 else float(acc), 'select': module.select}
        predicted = getattr(module, 'predicted_latency_ms', lambda g: None)(cifar)
        if predicted is not None:
            meta['predicted_latency_ms'] = round(predicted, 4)
            meta['latency_target_ms'] = module.latency.target_ms
        save_genotype(cifar, self.run.path / 'genotype.yaml', **meta)
        save_genotype(imagenet, self.run.path / 'genotype_imagenet.yaml', gamma=module.gamma,
                      gamma_rule=module.gamma_rule, **meta)
        atomic_write_text(self.run.path / 'alpha_history.json', json.dumps(module.history, indent=1))
        return cifar, imagenet


def attach_run_directory(evaluator: Any, strategy: Any, run_dir: str, *, resume: bool = False) -> None:
    """Give a one-shot ``Lightning`` evaluator (already mutated by ``strategy``) the search run directory:
    the lock, :class:`SearchRecorder`, TensorBoard epoch scalars, and ``last.ckpt`` to resume from."""
    module = evaluator.module
    run = RunDir(run_dir).acquire()
    recorder = SearchRecorder(run, name=Path(run_dir).name, epochs=int(evaluator.trainer.max_epochs or 1),
                              strategy='binary-darts')
    module.epoch_callbacks.append(recorder)

    class _Release(pl.Callback):
        def on_fit_end(self, trainer, pl_module):   # noqa: D401 - Lightning hook
            recorder.write_outputs(pl_module)
            run.close()

        def on_exception(self, trainer, pl_module, exception):
            run.close()

    ckpt = ModelCheckpoint(dirpath=str(run.path), save_top_k=0, save_last=True, every_n_epochs=1)   # last.ckpt only
    evaluator.trainer.callbacks.extend([ckpt, _Release()])
    last = run.path / 'last.ckpt'
    if resume and last.is_file():
        evaluator.fit_kwargs['ckpt_path'] = str(last)
