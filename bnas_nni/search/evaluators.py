"""Evaluators that keep training binarization-aware under every NNI strategy.

* :class:`BinaryClassification` -- a ``Classification``-style Lightning evaluator for the one-shot
  strategies (``DARTS``, ``GumbelDARTS``, ``RandomOneShot``, and ``BinaryDARTS`` through
  ``NasExperiment``). Its module builds the weight optimizer with the project's factory
  (:func:`bnas_nni.train.optim.build_optimizer`), so the latent weights of every binary conv get their
  constraint before each weight step exactly as in the official code, whichever strategy drives the
  optimizer; cosine schedule per epoch.
* :func:`evaluate_derived` -- trains a derived network briefly with the project's one train loop and
  reports the validation accuracy (percent) per epoch and at the end. It is the target of a
  ``FunctionalEvaluator`` for the multi-trial strategies (:func:`derived_evaluator`) and the brief
  final training of search trials.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Any, Dict, Mapping, Optional

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import dataclasses

import nni
import torch
import torch.nn as nn
import torch.utils.data as tud
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.evaluator.pytorch import Lightning, Trainer
from nni.nas.evaluator.pytorch.lightning import ClassificationModule

from ..distributed import DistContext
from ..errors import ConfigError
from ..genotypes import save_genotype
from ..integrations.nni.trial import TrialReporter
from ..train.loop import evaluate, train_one_epoch
from ..train.losses import CrossEntropy
from ..train.optim import OPTIMIZERS, build_optimizer
from ..train.schedules import build_schedule

__all__ = ['BinaryClassificationModule', 'BinaryClassification', 'TRAIN_DEFAULTS', 'evaluate_derived',
           'derived_evaluator']


def _check_train_args(lr: float, lr_min: float, epochs: int) -> None:
    if not (lr > 0 and 0 <= lr_min <= lr):
        raise ConfigError(f'need lr > 0 and 0 <= lr_min <= lr, got {lr}, {lr_min}')
    if epochs < 1:
        raise ConfigError(f'epochs must be >= 1, got {epochs}')


@nni.trace
class BinaryClassificationModule(ClassificationModule):
    """NNI's ``ClassificationModule`` whose weight optimizer carries the binarizers' latent-weight step.

    The paper's search defaults: SGD 0.025 momentum 0.9, weight decay 3e-4, cosine to 0.001 over
    ``max_epochs`` (stepped once per epoch).
    """

    def __init__(self, learning_rate: float = 0.025, weight_decay: float = 3e-4, optimizer: str = 'sgd',
                 momentum: float = 0.9, lr_min: float = 0.001, max_epochs: int = 50, num_classes: int = 10) -> None:
        _check_train_args(learning_rate, lr_min, max_epochs)
        if str(optimizer).lower() not in OPTIMIZERS:
            raise ConfigError(f'unknown optimizer {optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')
        super().__init__(criterion=nn.CrossEntropyLoss, learning_rate=learning_rate, weight_decay=weight_decay,
                         export_onnx=False, num_classes=num_classes)
        self.optimizer_name = str(optimizer).lower()
        self.momentum = momentum
        self.lr_min = lr_min
        self.max_epochs = int(max_epochs)

    def configure_optimizers(self):
        # strategies hand the supernet to this module as ``self.model``; alphas live in another optimizer
        opt = build_optimizer(self, optimizer=self.optimizer_name, lr=self.hparams.learning_rate,
                              momentum=self.momentum, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs, eta_min=self.lr_min)
        return {'optimizer': opt, 'lr_scheduler': {'scheduler': sched, 'interval': 'epoch'}}


@nni.trace
class BinaryClassification(Lightning):
    """``Classification`` with :class:`BinaryClassificationModule`; extra keywords go to the (traced)
    Lightning ``Trainer``. For DARTS-style strategies ``val_dataloaders`` is the architecture batch
    stream (the validation half of the training set)."""

    def __init__(self, *, learning_rate: float = 0.025, weight_decay: float = 3e-4, optimizer: str = 'sgd',
                 momentum: float = 0.9, lr_min: float = 0.001, num_classes: int = 10,
                 train_dataloaders: Any = None, val_dataloaders: Any = None, **trainer_kwargs: Any) -> None:
        trainer_kwargs.setdefault('max_epochs', 1)
        trainer_kwargs.setdefault('accelerator', 'cpu')
        trainer_kwargs.setdefault('enable_checkpointing', False)
        trainer_kwargs.setdefault('enable_model_summary', False)
        module = BinaryClassificationModule(learning_rate=learning_rate, weight_decay=weight_decay,
                                            optimizer=optimizer, momentum=momentum, lr_min=lr_min,
                                            max_epochs=trainer_kwargs['max_epochs'], num_classes=num_classes)
        super().__init__(module, Trainer(**trainer_kwargs), train_dataloaders=train_dataloaders,
                         val_dataloaders=val_dataloaders)


# --------------------------------------------------------------------------- brief training of a derived net

#: the options of :func:`evaluate_derived` (config key names) and their defaults
TRAIN_DEFAULTS: Dict[str, Any] = {
    'epochs': 1, 'batch_size': 32, 'optimizer': 'sgd', 'lr': 0.025, 'momentum': 0.9, 'betas': [0.9, 0.999],
    'weight_decay': 3e-4, 'lr_min': 0.001, 'schedule': 'cosine', 'max_train_batches': None, 'max_val_batches': None,
    'seed': 0, 'threads': None, 'channels_last': False,
}


def evaluate_derived(model: nn.Module, *, train_data: tud.Dataset, val_data: tud.Dataset, reinit: bool = True,
                     report: bool = True, genotype_dir: Optional[str] = None, **train: Any) -> Dict[str, Any]:
    """Train a frozen (derived) network briefly with the one train loop and return (and, in an NNI
    trial, report) its validation accuracy.

    ``train`` keys are config names (:data:`TRAIN_DEFAULTS`): SGD/Adam with the latent-weight step, the
    ``schedule`` per iteration (cosine to ``lr_min`` by default). Reports ``{'default': val top-1 %,
    'val_loss', 'train_loss', 'train_acc', 'epoch'}`` after every epoch (intermediate) and the last one
    again as the final result.

    With ``reinit`` (default) the weights are re-initialised from ``seed`` first: NNI builds the
    trial's model before this function runs, from an unseeded generator, so this is what makes a
    trial's result a function of its architecture and seed alone.
    """
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f'unknown training options {unknown}; allowed: {", ".join(TRAIN_DEFAULTS)}')
    cfg = {**TRAIN_DEFAULTS, **{k: v for k, v in train.items() if v is not None or k.startswith('max_')}}
    _check_train_args(cfg['lr'], cfg['lr_min'], int(cfg['epochs']))
    if cfg['threads']:
        torch.set_num_threads(int(cfg['threads']))
    torch.manual_seed(int(cfg['seed']))
    if reinit:
        for m in model.modules():
            if hasattr(m, 'reset_parameters') and callable(m.reset_parameters):
                m.reset_parameters()
    if cfg['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    train_loader = tud.DataLoader(train_data, batch_size=int(cfg['batch_size']), shuffle=True,
                                  generator=torch.Generator().manual_seed(int(cfg['seed'])))
    val_loader = tud.DataLoader(val_data, batch_size=max(int(cfg['batch_size']), 256), shuffle=False)
    opt = build_optimizer(model, optimizer=cfg['optimizer'], lr=cfg['lr'], momentum=cfg['momentum'],
                          betas=cfg['betas'], weight_decay=cfg['weight_decay'])
    iters = len(train_loader) if cfg['max_train_batches'] is None else min(len(train_loader), cfg['max_train_batches'])
    schedule = build_schedule(cfg, opt, iters)
    reporter = TrialReporter(enabled=None if report else False)   # None: report when NNI launched us
    ctx = DistContext()
    criterion = CrossEntropy()
    metric: Dict[str, Any] = {}
    for epoch in range(int(cfg['epochs'])):
        tr = train_one_epoch(model, train_loader, opt, criterion, epoch=epoch, ctx=ctx, schedule=schedule,
                             channels_last=cfg['channels_last'], report_freq=0, max_batches=cfg['max_train_batches'])
        va = evaluate(model, val_loader, ctx=ctx, channels_last=cfg['channels_last'], report_freq=0,
                      max_batches=cfg['max_val_batches'])
        metric = {'default': va['top1'], 'val_loss': va['loss'], 'train_loss': tr['loss'], 'train_acc': tr['top1'],
                  'epoch': epoch + 1}
        if report:
            reporter.intermediate(va['top1'], val_loss=va['loss'], train_loss=tr['loss'], train_acc=tr['top1'],
                                  epoch=epoch + 1)
    metric = dict(metric, params=sum(p.numel() for p in model.parameters()),
                  seconds=round(time.perf_counter() - started, 3))
    genotype = getattr(model, 'genotype', None)
    out_dir = genotype_dir or os.environ.get('NNI_OUTPUT_DIR')
    if report and genotype is not None and out_dir:
        trial = os.environ.get('NNI_TRIAL_JOB_ID', 'trial')
        save_genotype(dataclasses.replace(genotype, name=f'trial-{trial}'), os.path.join(out_dir, 'genotype.yaml'),
                      source='nni trial', trial=trial, val_acc=metric['default'], epochs=int(cfg['epochs']))
    if report:
        reporter.final(metric['default'], val_loss=metric['val_loss'], train_loss=metric['train_loss'],
                       train_acc=metric['train_acc'], epoch=metric['epoch'], params=metric['params'])
    return metric


def derived_evaluator(train_data: tud.Dataset, val_data: tud.Dataset, **train: Any) -> FunctionalEvaluator:
    """``FunctionalEvaluator(evaluate_derived, ...)``; ``train`` keys are :data:`TRAIN_DEFAULTS`' names."""
    unknown = sorted(set(train) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ConfigError(f'unknown training options {unknown} for the multi-trial evaluator; allowed: '
                          f'{", ".join(TRAIN_DEFAULTS)}')
    return FunctionalEvaluator(evaluate_derived, train_data=train_data, val_data=val_data, **train)


def train_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The :func:`evaluate_derived` options of a resolved search config (multi-trial: per trial)."""
    return {k: cfg[k] for k in TRAIN_DEFAULTS if k in cfg and k != 'schedule'}
