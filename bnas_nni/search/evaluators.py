"""Evaluators that keep training binarization-aware under every NNI strategy.

* :class:`BinaryClassification` -- a ``Classification``-style Lightning evaluator for the one-shot
  strategies (``DARTS``, ``GumbelDARTS``, ``RandomOneShot``). Its module builds the weight optimizer
  itself (SGD or Adam, cosine schedule per epoch) and attaches the binarizers' latent-weight step
  (:func:`bnas_nni.quant.attach_latent_constraint`) to it, so the latent weights of every binary conv
  are constrained before each weight step exactly as in the official code, whichever strategy drives
  the optimizer (automatic optimization, or the one-shot modules' manual ``advance_optimization``).
* :func:`evaluate_derived` -- the target of a ``FunctionalEvaluator`` for the multi-trial strategies
  (``Random``, ``RegularizedEvolution``, ``TPE``): it trains the frozen derived network briefly, reports
  the validation accuracy after every epoch as an intermediate result and once more as the final
  result (``{'default': acc, ...}``), and writes the trial's genotype into ``$NNI_OUTPUT_DIR``.
* :func:`search_datasets` -- the datasets, wrapped with ``nni.trace`` so that a trial's payload holds
  constructor arguments, never tensors (NNI caps it at 64 KB): the search's train and validation parts
  are disjoint slices of the *training* split (the test split is never used in search).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Dict, Optional, Tuple

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import nni
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as tud
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.evaluator.pytorch import DataLoader, Lightning, Trainer
from nni.nas.evaluator.pytorch.lightning import ClassificationModule

from ..quant import attach_latent_constraint, binary_convs
from ..errors import ConfigError

__all__ = ['DatasetView', 'search_datasets', 'make_loader', 'BinaryClassificationModule', 'BinaryClassification',
           'build_optimizer', 'evaluate_derived', 'derived_evaluator', 'accuracy', 'DATASETS']

DATASETS = ('fashion-mnist',)
OPTIMIZERS = ('sgd', 'adam')


# --------------------------------------------------------------------------- data


@nni.trace
class DatasetView(tud.Dataset):
    """Images ``[start, stop)`` of ``dataset``, optionally resized to ``image_size`` x ``image_size``.

    ``dataset`` should itself be ``nni.trace``'d so the whole view serialises to a few hundred bytes.
    Resizing (bilinear, antialiased) lets tiny test spaces run on 8x8 or 16x16 crops.
    """

    def __init__(self, dataset: Any, start: int = 0, stop: Optional[int] = None,
                 image_size: Optional[int] = None) -> None:
        n = len(dataset)
        stop = n if stop is None else min(int(stop), n)
        if not 0 <= start < stop:
            raise ConfigError(f'dataset slice [{start}, {stop}) is empty (the dataset has {n} images)')
        self.dataset, self.start, self.stop = dataset, int(start), stop
        self.image_size = int(image_size) if image_size else None

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        x, y = self.dataset[self.start + index]
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode='bilinear',
                              align_corners=False, antialias=True).squeeze(0)
        return x, y


def search_datasets(data: Dict[str, Any]) -> Tuple[tud.Dataset, tud.Dataset]:
    """``(train, val)`` for a search: two disjoint slices of the training split, ``nni.trace``'d.

    ``data`` keys: ``dataset`` (``fashion-mnist``), ``root`` (folder of the idx files; default
    ``$BNAS_FASHION_MNIST`` or Debian's), ``train_size`` / ``val_size`` (images in each part; by
    default a 50/50 split of the training set, as in the paper), ``image_size`` (resize; default the
    native 32).
    """
    from ..data import FashionMNIST32, fashion_mnist_root

    name = str(data.get('dataset', 'fashion-mnist')).lower()
    if name not in DATASETS:
        raise ConfigError(f'unknown search dataset {name!r}; choose one of {", ".join(DATASETS)}')
    root = data.get('root')
    root = str(fashion_mnist_root(root))  # one-line DatasetError if missing
    train_size, val_size = data.get('train_size'), data.get('val_size')
    subset = int(train_size) + int(val_size) if train_size and val_size else None
    full = nni.trace(FashionMNIST32)(root, train=True, subset=subset, augment=False)
    n = len(full)
    train_size = int(train_size) if train_size else n // 2
    val_size = int(val_size) if val_size else n - train_size
    if train_size < 1 or val_size < 1 or train_size + val_size > n:
        raise ConfigError(f'train_size {train_size} + val_size {val_size} must be >= 1 each and fit in {n} images')
    size = data.get('image_size')
    return (DatasetView(full, 0, train_size, image_size=size),
            DatasetView(full, train_size, train_size + val_size, image_size=size))


def make_loader(dataset: tud.Dataset, batch_size: int, shuffle: bool, **kw: Any):
    """An ``nni.trace``'d DataLoader (NNI's); shuffling follows the global torch seed."""
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=shuffle, **kw)


# --------------------------------------------------------------------------- optimisation


def build_optimizer(params, *, optimizer: str = 'sgd', learning_rate: float = 0.025, momentum: float = 0.9,
                    weight_decay: float = 3e-4) -> torch.optim.Optimizer:
    name = str(optimizer).lower()
    if name == 'sgd':
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == 'adam':
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    raise ConfigError(f'unknown optimizer {optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')


def _check_train_args(learning_rate: float, lr_min: float, epochs: int) -> None:
    if not (learning_rate > 0 and 0 <= lr_min <= learning_rate):
        raise ConfigError(f'need learning_rate > 0 and 0 <= lr_min <= learning_rate, got {learning_rate}, {lr_min}')
    if epochs < 1:
        raise ConfigError(f'epochs must be >= 1, got {epochs}')


@nni.trace
class BinaryClassificationModule(ClassificationModule):
    """NNI's ``ClassificationModule`` whose weight optimizer honours the binarizers' latent-weight step.

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
        self.latent_hook = None
        self.constrained_convs = 0

    def configure_optimizers(self):
        opt = build_optimizer(self.parameters(), optimizer=self.optimizer_name,
                              learning_rate=self.hparams.learning_rate, momentum=self.momentum,
                              weight_decay=self.hparams.weight_decay)
        # strategies hand the supernet to this module as ``self.model``: every binary conv in it
        # gets its latent step before each weight step (alphas live in another optimizer)
        self.latent_hook = attach_latent_constraint(opt, self)
        self.constrained_convs = len(binary_convs(self))
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


# --------------------------------------------------------------------------- multi-trial target


@torch.no_grad()
def accuracy(model: nn.Module, loader, max_batches: Optional[int] = None) -> Tuple[float, float]:
    """``(top-1 accuracy, mean loss)`` of ``model`` on ``loader`` in eval mode."""
    model.eval()
    hits = seen = 0
    loss_sum = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction='sum'))
        hits += int((out.argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        raise ConfigError('the validation loader yielded no images')
    return hits / seen, loss_sum / seen


def _report(kind: str, metric: Dict[str, float], report: bool) -> None:
    if not report:
        return
    if kind == 'intermediate':
        nni.report_intermediate_result(metric)
    else:
        nni.report_final_result(metric)


def evaluate_derived(model: nn.Module, *, train_data: tud.Dataset, val_data: tud.Dataset, epochs: int = 1,
                     batch_size: int = 32, optimizer: str = 'sgd', learning_rate: float = 0.025,
                     momentum: float = 0.9, weight_decay: float = 3e-4, lr_min: float = 0.001,
                     max_train_batches: Optional[int] = None, max_val_batches: Optional[int] = None,
                     seed: int = 0, num_threads: Optional[int] = None, reinit: bool = True,
                     report: bool = True) -> Dict[str, Any]:
    """Train a frozen (derived) network briefly and report its validation accuracy to NNI.

    Binarization-aware: the latent-weight step of every binary conv runs before each SGD/Adam step,
    cosine schedule to ``lr_min`` per epoch. Reports ``{'default': val_acc, 'val_loss', 'train_loss',
    'train_acc', 'epoch'}`` after every epoch (intermediate) and ``{'default': val_acc, ...}`` at the end
    (final). Returns the final metrics (also when ``report`` is false, for use outside NNI).

    With ``reinit`` (default) the weights are re-initialised from ``seed`` first: NNI builds the
    trial's model before this function runs, from an unseeded generator, so this is what makes a
    trial's result a function of its architecture and seed alone.
    """
    _check_train_args(learning_rate, lr_min, epochs)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    torch.manual_seed(seed)
    if reinit:
        for m in model.modules():
            if hasattr(m, 'reset_parameters') and callable(m.reset_parameters):
                m.reset_parameters()
    started = time.perf_counter()
    train_loader = tud.DataLoader(train_data, batch_size=batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(seed))
    val_loader = tud.DataLoader(val_data, batch_size=batch_size, shuffle=False)
    opt = build_optimizer(model.parameters(), optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
                          weight_decay=weight_decay)
    attach_latent_constraint(opt, model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=lr_min)
    metric: Dict[str, Any] = {}
    for epoch in range(epochs):
        model.train()
        loss_sum, hits, seen = 0.0, 0, 0
        for i, (x, y) in enumerate(train_loader):
            if max_train_batches is not None and i >= max_train_batches:
                break
            out = model(x)
            loss = F.cross_entropy(out, y)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f'training loss became {float(loss)} in epoch {epoch}')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            hits += int((out.argmax(1) == y).sum())
            seen += len(y)
        sched.step()
        val_acc, val_loss = accuracy(model, val_loader, max_val_batches)
        metric = {'default': val_acc, 'val_loss': val_loss, 'train_loss': loss_sum / max(seen, 1),
                  'train_acc': hits / max(seen, 1), 'epoch': epoch + 1}
        _report('intermediate', metric, report)
    metric = dict(metric, params=sum(p.numel() for p in model.parameters()),
                  seconds=round(time.perf_counter() - started, 3))
    genotype = getattr(model, 'genotype', None)
    out_dir = os.environ.get('NNI_OUTPUT_DIR')
    if report and genotype is not None and out_dir:
        import dataclasses

        from ..genotypes import save_genotype
        trial = os.environ.get('NNI_TRIAL_JOB_ID', 'trial')
        save_genotype(dataclasses.replace(genotype, name=f'trial-{trial}'), os.path.join(out_dir, 'genotype.yaml'),
                      source='nni trial', trial=trial, val_acc=metric['default'], epochs=epochs)
    _report('final', metric, report)
    return metric


def derived_evaluator(train_data: tud.Dataset, val_data: tud.Dataset, **train: Any) -> FunctionalEvaluator:
    """``FunctionalEvaluator(evaluate_derived, ...)``; ``train`` keys are :func:`evaluate_derived`'s options."""
    import inspect

    allowed = [k for k in inspect.signature(evaluate_derived).parameters
               if k not in ('model', 'train_data', 'val_data', 'report')]
    unknown = sorted(set(train) - set(allowed))
    if unknown:
        raise ConfigError(f'unknown training options {unknown} for the multi-trial evaluator; allowed: '
                          f'{", ".join(allowed)}')
    return FunctionalEvaluator(evaluate_derived, train_data=train_data, val_data=val_data, **train)
