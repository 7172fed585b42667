"""Strategies that are not BinaryDARTS, through NNI's ``NasExperiment``.

:func:`run_nni_experiment` builds the evaluator for the strategy's kind and runs the experiment:

* **one-shot** (``darts``, ``gumbel-darts``, ``random-one-shot``, user one-shot strategies): NNI's
  sequential engine in this process; :class:`~bnas_nni.search.evaluators.BinaryClassification` trains
  the supernet (weights on the first half of the training split, architecture on the second); no NNI
  manager is started. Per-epoch callbacks get the supernet's validation accuracy (percent);
* **multi-trial** (``random``, ``regularized-evolution``, ``tpe``): the NNI manager on 127.0.0.1 (a
  ``NODE_OPTIONS`` preload, NNI has no host option) spawns ``python -m nni.nas.execution.training_service
  trial`` processes in the current directory; each trains one frozen derived network with
  :func:`~bnas_nni.search.evaluators.evaluate_derived` and reports per-epoch and final accuracy. Trials
  and metrics are visible in the web UI and over ``http://127.0.0.1:PORT/api/v1/nni/...`` while the
  experiment runs; a snapshot of ``trial-jobs`` and ``metric-data`` is kept in the result.

In both cases ``HOME`` is redirected into the run directory for the duration (NNI writes its
experiment manifest under ``~/nni-experiments`` whatever the config says), the experiment working
directory is ``<run_dir>/nni-experiments``, and the experiment is always stopped in ``finally``.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import pytorch_lightning as pl
from nni.nas.evaluator.pytorch import DataLoader
from pytorch_lightning.loggers import TensorBoardLogger

from ..config import SearchConfig
from ..console import log as console_log
from ..data import search_splits
from ..integrations.nni.environment import redirected_nni_home
from ..integrations.nni.rest import free_port, rest_snapshot
from .evaluators import BinaryClassification, derived_evaluator, train_options

__all__ = ['run_nni_experiment']


def _wait_trial_ends(exp, timeout: float = 30.0) -> None:
    """Wait until every submitted model has seen its trial-end event.

    NNI's engine stops waiting as soon as the manager reports DONE, which can come before the
    manager's trial-end commands reach this process; models then still read "training" and
    ``export_top_models`` finds none.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(m.status.completed() for m in exp.strategy.list_models(sort=False)):
            return
        time.sleep(0.5)


def _model_record(model) -> Dict[str, Any]:
    metrics = getattr(model, 'metrics', None)
    return {'arch': dict(model.sample or {}),
            'status': getattr(getattr(model, 'status', None), 'value', str(getattr(model, 'status', ''))),
            'metric': model.metric,
            'intermediates': list(getattr(metrics, 'intermediates', []) or [])}


def _quiet_lightning() -> None:
    for name in ('pytorch_lightning', 'lightning.pytorch', 'lightning_fabric'):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in ('.*number of training batches.*', '.*does not have many workers.*', '.*LeafSpec.*',
                    '.*litlogger.*'):
        warnings.filterwarnings('ignore', message=message)


def _one_shot_evaluator(cfg: SearchConfig, train_ds: Any, val_ds: Any, run_dir: Path, num_classes: int,
                        device: Any, progress: bool, epoch_callbacks: Sequence[Callable[..., None]],
                        trainer_options: Optional[Mapping[str, Any]] = None):
    class _EpochReport(pl.Callback):
        """Epoch records for the callbacks; stock DARTS-style strategies validate nothing (val_acc None)."""

        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            pct = lambda key: None if metrics.get(key) is None else 100.0 * float(metrics[key])
            record = {'epoch': trainer.current_epoch, 'val_acc': pct('val_acc'), 'train_acc': pct('train_acc'),
                      'entropy': None}
            for cb in epoch_callbacks:
                cb(record, pl_module)

    trainer_kwargs: Dict[str, Any] = dict(max_epochs=int(cfg.epochs), enable_progress_bar=progress,
                                          default_root_dir=str(run_dir), log_every_n_steps=1, num_sanity_val_steps=0,
                                          accelerator='gpu' if device.type == 'cuda' else 'cpu',
                                          callbacks=[_EpochReport()])
    if cfg.max_train_batches:
        trainer_kwargs['limit_train_batches'] = int(cfg.max_train_batches)
    if cfg.max_val_batches:
        trainer_kwargs['limit_val_batches'] = int(cfg.max_val_batches)
    if cfg.tensorboard:
        trainer_kwargs['logger'] = TensorBoardLogger(str(run_dir), name='tb', version='')
    else:
        trainer_kwargs['logger'] = False
    trainer_kwargs.update(trainer_options or {})        # e.g. Lightning's DDP strategy under torchrun
    return BinaryClassification(
        learning_rate=float(cfg.lr), weight_decay=float(cfg.weight_decay), optimizer=cfg.optimizer,
        momentum=float(cfg.momentum), lr_min=float(cfg.lr_min), num_classes=num_classes,
        train_dataloaders=DataLoader(train_ds, batch_size=int(cfg.batch_size), shuffle=True),
        val_dataloaders=DataLoader(val_ds, batch_size=int(cfg.batch_size), shuffle=False), **trainer_kwargs)


def run_nni_experiment(cfg: SearchConfig, strategy: Any, kind: str, space: Any, run_dir: Path, *, device: Any,
                       progress: bool = False, epoch_callbacks: Sequence[Callable[..., None]] = (),
                       on_running: Optional[Callable[[Any, Optional[int]], None]] = None,
                       log: Callable[[str], None] = console_log,
                       trainer_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Run ``strategy`` on ``space`` as an NNI experiment (see the module docstring).

    ``trainer_options``: extra Lightning ``Trainer`` keywords for a one-shot strategy (data-parallel
    search passes Lightning's DDP strategy, :func:`bnas_nni.search.data_parallel.lightning_ddp_options`).

    ``on_running(experiment, port)`` is called after the search, while the experiment (and, for
    multi-trial, the NNI manager and its REST API) is still up and before it is stopped.

    Returns ``arch`` (the top architecture dict), ``experiment_id``, ``port``, ``trials`` (multi-trial: one
    record per model with ``arch``, ``status``, ``metric`` and ``intermediates``), ``metrics`` (one-shot:
    the supernet's last logged metrics and ``probs`` for DARTS-style strategies), ``rest`` (multi-trial:
    ``check-status``, ``trial-jobs``, ``metric-data`` and ``experiment`` before the stop), ``manager_pid``
    and ``seconds``.
    """
    # local import: NNI's experiment machinery is slow to import and only the runner='nni' path needs it
    from nni.nas.experiment import NasExperiment

    _quiet_lightning()
    num_classes = int(space.classifier.out_features)
    train_ds, val_ds, val_plain = search_splits(cfg, trace=kind == 'multi-trial')
    if kind == 'one-shot':
        evaluator = _one_shot_evaluator(cfg, train_ds, val_ds, run_dir, num_classes, device, progress,
                                        epoch_callbacks, trainer_options)
    else:
        evaluator = derived_evaluator(train_ds, val_plain, **train_options(cfg))
    result: Dict[str, Any] = {'port': None, 'manager_pid': None}
    started = time.perf_counter()
    with redirected_nni_home(run_dir, manager=kind == 'multi-trial'):
        exp = NasExperiment(space, evaluator, strategy)
        exp.config.experiment_name = f'bnas-{cfg.name or cfg.strategy}'
        exp.config.experiment_working_directory = str((run_dir / 'nni-experiments').resolve())
        port: Optional[int] = None
        if kind == 'multi-trial':
            exp.config.max_trial_number = int(cfg.max_trial_number)
            exp.config.trial_concurrency = int(cfg.trial_concurrency)
            if cfg.max_experiment_duration:
                exp.config.max_experiment_duration = str(cfg.max_experiment_duration)
            port = int(cfg.port or free_port())
            result['port'] = port
        result['experiment_id'] = exp.id
        try:
            log(f'[{cfg.strategy}] {kind} search, run dir {run_dir}' +
                (f', NNI manager on http://127.0.0.1:{port}' if port else ''))
            if port is not None:
                exp.run(port=port)
                result['manager_pid'] = getattr(getattr(exp, '_proc', None), 'pid', None)
            else:
                exp.run()
            result['seconds'] = round(time.perf_counter() - started, 2)
            if kind == 'multi-trial':
                _wait_trial_ends(exp)
                result['rest'] = rest_snapshot(port)
                result['trials'] = [_model_record(m) for m in exp.strategy.list_models(sort=False)]
                if not any(t['metric'] is not None for t in result['trials']):
                    raise RuntimeError(f'{cfg.strategy}: no trial reported a final metric; see the trial logs '
                                       f'under {run_dir / "nni-experiments" / exp.id}')
            else:
                module = exp.strategy.oneshot_module
                metrics: Dict[str, Any] = {k: float(v) for k, v in evaluator.trainer.callback_metrics.items()
                                           if not k.startswith('prob/')}
                if hasattr(module, 'export_probs') and cfg.strategy != 'random-one-shot':
                    try:
                        metrics['probs'] = module.export_probs()
                    except NotImplementedError:
                        pass
                result['metrics'] = metrics
            result['arch'] = dict(exp.export_top_models(formatter='dict')[0])
            if on_running is not None:
                on_running(exp, port)
        finally:
            exp.stop()
    result['seconds_total'] = round(time.perf_counter() - started, 2)
    return result
