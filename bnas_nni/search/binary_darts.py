r"""BinaryDARTS: the BNAS search (Kim, Singh, Choi, ECCV 2020) as an NNI ``DARTS`` strategy.

What differs from NNI's stock ``DARTS``
---------------------------------------

* **Mixed cell.** :class:`~bnas_nni.search.mixed_cell.BinaryMixedCell` (or a subclass given with
  ``mixed_cell=``): one logit per named candidate and a softmax over exactly those seven ops. Zeroise is
  a real candidate that can win an edge; there is no hidden zero logit.
* **Order of an iteration** (first-order DARTS, as ``search.py``): an architecture step on a batch of
  the validation half, then a weight step on a batch of the training half. Both forwards use the
  binarized weights (the binary convs binarize inside their forward); the weight optimizer carries the
  binarizer's persistent latent-weight step (:func:`bnas_nni.quant.attach_latent_constraint`). BN
  running statistics are updated by both forwards, as in the official code. Architecture batches come
  from cycling through the shuffled validation half (the official code draws ``next(iter(valid_queue))``,
  a fresh random batch, every iteration: the same distribution, without rebuilding a loader each step).
  :class:`SearchRunner` skips the weight gradients during the architecture step and the alpha gradients
  during the weight step (they are discarded anyway), which leaves every update unchanged.
* **Objective of the architecture step**, the paper's diversity term:

  .. math::

     L_\alpha = \mathrm{CE}_{val} - \lambda\,\bar H(\alpha)\,e^{-\mathrm{epoch}/\tau},\qquad
     \bar H = \frac{1}{|E|}\sum_{e \in E} H(\mathrm{softmax}(\alpha_e))

  with :math:`E` all edges of *both* cell types (28 in the paper space), :math:`\lambda = 1`,
  :math:`\tau = 7.7` and the integer epoch index. The released ``architect.py`` indexes the reduce
  cell with the stale loop variable of the normal loop, so its reduce term is
  :math:`14\,H(\alpha_{reduce}[13])`; that slip is documented here and deliberately **not** reproduced.
* **Optimizers.** Architecture: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3. Weights (own
  loop, :class:`SearchRunner`): SGD 0.025, momentum 0.9, weight decay 3e-4, cosine to 0.001 set once
  per epoch. The official script steps its scheduler at the *start* of every epoch, so epoch ``e``
  trains at the cosine value of ``e + 1`` (epoch 0 at ~0.024976, the last epoch at 0.001);
  :func:`search_lr` does the same. No gradient clipping unless asked for.
* **Selection.** After each epoch the supernet is evaluated on the whole validation half (binarized
  weights, BN in eval mode, no augmentation). The genotype kept is that of the best epoch:
  ``select='best'`` (default) derives it from the alphas *after* that epoch, the intended reading;
  ``select='official'`` reproduces the released code's off-by-one (the alphas at the *start* of the
  best epoch); ``select='last'`` keeps the final alphas.
* **Derivation** (:func:`bnas_nni.genotypes.derive_genotype`): per node, the two incoming edges with
  the largest softmax weight *including* Zeroise, and on each the argmax op *including* Zeroise. The
  ImageNet variant divides Zeroise's probability by ``gamma`` (3) before deriving; that is the intended
  rule. The released code divides row 0 instead, which only reorders node 0
  (``gamma_rule='official'``).

Two ways to run it
------------------

* ``NasExperiment(space, evaluator, BinaryDARTS(...)).run()``: NNI's sequential engine and Lightning,
  with the weight optimizer of the evaluator (use
  :class:`bnas_nni.search.evaluators.BinaryClassification` for the paper's SGD + cosine). The
  Lightning module :class:`BinaryDartsModule` does the steps above, runs a validation pass each epoch
  and ``export()`` returns the kept (best-epoch) architecture.
* :class:`SearchRunner` (what ``bnas-nni search`` uses): the same supernet (built by
  :meth:`BinaryDARTS.mutate_model`), the same objective, a plain loop with exact resume, atomic
  per-epoch checkpoints, the alpha history and TensorBoard logs in a run directory.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedCell
from nni.nas.strategy import DARTS

from ..quant import attach_latent_constraint
from ..errors import ConfigError
from ..genotypes import Genotype, derive_genotype
from ..io import atomic_torch_save, atomic_write_text
from .mixed_cell import BinaryMixedCell

__all__ = ['LAMDA', 'TAU', 'GAMMA', 'SELECT_RULES', 'diversity_weight', 'mean_edge_entropy', 'search_lr',
           'binary_cells', 'alpha_matrices', 'arch_parameters', 'derive_from_model', 'edge_probabilities',
           'resolve_mixed_cell', 'BinaryDartsModule', 'BinaryDARTS', 'SearchRunner', 'EpochResult',
           'capture_rng', 'restore_rng']

LAMDA = 1.0
TAU = 7.7
GAMMA = 3.0
SELECT_RULES = ('best', 'official', 'last')


# --------------------------------------------------------------------------- the objective


def check_hparams(lamda: float, tau: float, gamma: float = GAMMA, select: str = 'best') -> None:
    """One-line errors for out-of-range search hyperparameters."""
    if not (isinstance(lamda, (int, float)) and math.isfinite(lamda) and lamda >= 0):
        raise ConfigError(f'lamda must be a finite number >= 0 (the diversity weight), got {lamda!r}')
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ConfigError(f'tau must be a finite number > 0 (the diversity decay in epochs), got {tau!r}')
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f'gamma must be a finite number > 0 (Zeroise transfer for ImageNet), got {gamma!r}')
    if select not in SELECT_RULES:
        raise ConfigError(f'unknown select rule {select!r}; choose one of {", ".join(SELECT_RULES)}')


def diversity_weight(epoch: int, lamda: float = LAMDA, tau: float = TAU) -> float:
    r""":math:`\lambda e^{-\mathrm{epoch}/\tau}` (epoch is the 0-based integer epoch index)."""
    return float(lamda) * math.exp(-float(epoch) / float(tau))


def mean_edge_entropy(alphas: Iterable[torch.Tensor]) -> torch.Tensor:
    r"""Mean over every edge (row) of every ``[edges, ops]`` logit matrix of
    :math:`H(p) = -\sum_k p_k \log p_k`, :math:`p = \mathrm{softmax}(\alpha_e)`. Differentiable."""
    rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in alphas], 0)
    logp = torch.log_softmax(rows, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def search_lr(epoch: int, epochs: int, lr: float = 0.025, lr_min: float = 0.001) -> float:
    """The weight learning rate of ``search.py`` for 0-based ``epoch``: cosine from ``lr`` to ``lr_min``
    over ``epochs``, evaluated at ``epoch + 1`` because the official scheduler steps before each epoch."""
    t = min(epoch + 1, epochs)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / epochs)) / 2


# --------------------------------------------------------------------------- reading the supernet


def binary_cells(model: nn.Module) -> Dict[str, BinaryMixedCell]:
    """The first mixed cell of each label (cells sharing a label share their alphas), in model order."""
    cells: Dict[str, BinaryMixedCell] = {}
    for m in model.modules():
        if isinstance(m, BinaryMixedCell) and str(m.label) not in cells:
            cells[str(m.label)] = m   # NNI labels are a str subclass; keep plain str keys
    return cells


def alpha_matrices(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{'normal': [E, K], 'reduce': [E, K]}`` logits (differentiable), rows in official order."""
    return {label: cell.alpha_matrix() for label, cell in binary_cells(model).items()}


def arch_parameters(model: nn.Module) -> List[nn.Parameter]:
    """All architecture parameters of the BNAS cells, in a fixed order (label, then edge)."""
    out: List[nn.Parameter] = []
    for cell in binary_cells(model).values():
        out.extend(cell._arch_alpha[e] for e in cell.edge_labels())
    return out


def _cell_ops(model: nn.Module) -> Tuple[str, ...]:
    cells = binary_cells(model)
    if not cells:
        raise ConfigError('no BinaryMixedCell in the model; mutate the space with BinaryDARTS first')
    return tuple(next(iter(cells.values())).op_names)


def derive_from_model(model: nn.Module, *, gamma: float = 1.0, gamma_rule: str = 'zeroise', name: str = '',
                      alphas: Optional[Mapping[str, Any]] = None) -> Genotype:
    """The BNAS genotype of the current (or given) alphas; ``gamma`` > 1 for the ImageNet variant."""
    a = alphas if alphas is not None else {k: v.detach() for k, v in alpha_matrices(model).items()}
    return derive_genotype(torch.as_tensor(np.asarray(a['normal'])), torch.as_tensor(np.asarray(a['reduce'])),
                           _cell_ops(model), gamma=gamma, gamma_rule=gamma_rule, name=name)


def edge_probabilities(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """``{'normal/2_0': {'zeroise': p, ...}, ...}`` softmax weights of every edge."""
    out: Dict[str, Dict[str, float]] = {}
    for label, cell in binary_cells(model).items():
        probs = torch.softmax(cell.alpha_matrix().detach().double(), -1).tolist()
        for edge, row in zip(cell.edge_labels(), probs):
            out[edge] = dict(zip(cell.op_names, row))
    return out


def resolve_mixed_cell(spec: Union[None, str, Type[BinaryMixedCell]]) -> Type[BinaryMixedCell]:
    """``None``/``'binary'``: :class:`BinaryMixedCell`; ``'fast'``: ``fast_cell.FastBinaryMixedCell``
    (or the first ``BinaryMixedCell`` subclass that module defines); or a class."""
    if spec is None or spec == 'binary':
        return BinaryMixedCell
    if isinstance(spec, str):
        if spec != 'fast':
            raise ConfigError(f'unknown mixed cell {spec!r}; choose binary or fast (or pass a class)')
        try:
            from . import fast_cell
        except ImportError as exc:
            raise ConfigError(f'mixed_cell fast is not available ({exc})') from None
        cls = getattr(fast_cell, 'FastBinaryMixedCell', None)
        if cls is None:
            cands = [v for v in vars(fast_cell).values()
                     if isinstance(v, type) and issubclass(v, BinaryMixedCell) and v is not BinaryMixedCell]
            if not cands:
                raise ConfigError('bnas_nni.search.fast_cell defines no BinaryMixedCell subclass')
            cls = cands[0]
        return cls
    if isinstance(spec, type) and issubclass(spec, BinaryMixedCell):
        return spec
    raise ConfigError(f'mixed_cell must be "binary", "fast" or a BinaryMixedCell subclass, got {spec!r}')


def _has_latent_hook(optimizer: torch.optim.Optimizer) -> bool:
    hooks = getattr(optimizer, '_optimizer_step_pre_hooks', {}) or {}
    return any('attach_latent_constraint' in getattr(h, '__qualname__', '') for h in hooks.values())


def _loss_of(out: Any) -> torch.Tensor:
    return out['loss'] if isinstance(out, dict) else out


# --------------------------------------------------------------------------- Lightning module (NNI path)


class BinaryDartsModule(DartsLightningModule):
    """``DartsLightningModule`` with the BNAS objective, alpha optimizer and best-epoch selection.

    The weight optimizer is the evaluator's (NNI design); if it does not yet run the binarizer's
    latent-weight step, the step is attached at the start of training. Logs ``arch_loss``,
    ``arch_ce``, ``arch_entropy``, ``diversity_weight``, ``lr``, ``prob/<edge>/<op>`` and, after each
    validation pass, ``val_acc`` (supernet accuracy on the evaluator's validation loader).
    """

    def __init__(self, training_module: Any, *, arc_learning_rate: float = 3e-4,
                 arc_betas: Tuple[float, float] = (0.5, 0.999), arc_weight_decay: float = 1e-3,
                 lamda: float = LAMDA, tau: float = TAU, gamma: float = GAMMA, gamma_rule: str = 'zeroise',
                 select: str = 'best', gradient_clip_val: Optional[float] = None, log_prob_every_n_step: int = 10,
                 warmup_epochs: int = 0, epoch_callbacks: Sequence[Callable[..., None]] = ()) -> None:
        super().__init__(training_module, arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs, penalty=None)
        check_hparams(lamda, tau, gamma, select)
        self.arc_betas = tuple(arc_betas)
        self.arc_weight_decay = arc_weight_decay
        self.lamda, self.tau, self.gamma, self.gamma_rule, self.select = lamda, tau, gamma, gamma_rule, select
        self.epoch_callbacks = list(epoch_callbacks)
        self.best: Dict[str, Any] = {'val_acc': -1.0, 'epoch': -1}
        self.history: List[Dict[str, Any]] = []
        self._alphas_at_start: Optional[Dict[str, np.ndarray]] = None
        self._val_hits = 0
        self._val_seen = 0

    # ------------------------------------------------------------------ parameters and optimizers

    def arch_parameters(self) -> List[nn.Parameter]:
        params = arch_parameters(self)
        seen = {id(p) for p in params}
        # other differentiable modules (e.g. a LayerChoice outside the cells) keep NNI's behaviour
        for m in self.supernet_modules():
            if not isinstance(m, BinaryMixedCell) and hasattr(m, 'arch_parameters'):
                for p in m.arch_parameters():
                    if id(p) not in seen:
                        params.append(p)
                        seen.add(id(p))
        return params

    def configure_architecture_optimizers(self) -> torch.optim.Optimizer:
        params = self.arch_parameters()
        if not params:
            raise ValueError('No architecture parameters found. Nothing to search.')
        return torch.optim.Adam(params, lr=self.arc_learning_rate, betas=self.arc_betas,
                                weight_decay=self.arc_weight_decay)

    def _weight_optimizers(self) -> List[torch.optim.Optimizer]:
        return [opt for opt in self.trainer.optimizers if not getattr(opt, 'is_arch_optimizer', False)]

    def on_train_start(self) -> None:
        for opt in self._weight_optimizers():
            if not _has_latent_hook(opt):
                attach_latent_constraint(opt, self)
        return super().on_train_start()

    # ------------------------------------------------------------------ the step

    def arch_entropy(self) -> torch.Tensor:
        return mean_edge_entropy(alpha_matrices(self).values())

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        arc_optim = self.architecture_optimizers()
        epoch = self.trainer.current_epoch
        if self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            self.resample()
            arc_optim.zero_grad()
            ce = _loss_of(self.training_module.training_step(batch['val'], 2 * batch_idx))
            entropy = self.arch_entropy()
            weight = diversity_weight(epoch, self.lamda, self.tau)
            arc_loss = ce - weight * entropy
            self.manual_backward(arc_loss)
            arc_optim.step()
            self.log_dict({'arch_loss': arc_loss.detach(), 'arch_ce': ce.detach(), 'arch_entropy': entropy.detach(),
                           'diversity_weight': weight})
        self.resample()
        out = self.training_module.training_step(batch['train'], 2 * batch_idx + 1)
        self.advance_optimization(_loss_of(out), batch_idx, self.gradient_clip_val)
        self.advance_lr_schedulers(batch_idx)
        opts = self._weight_optimizers()
        if opts:
            self.log('lr', float(opts[0].param_groups[0]['lr']))
        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return out

    # ------------------------------------------------------------------ per-epoch validation and selection

    def on_train_epoch_start(self) -> None:
        self._alphas_at_start = {k: v.detach().cpu().numpy().copy() for k, v in alpha_matrices(self).items()}
        return super().on_train_epoch_start()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._val_hits += int((logits.argmax(-1) == y).sum())
        self._val_seen += int(y.numel())

    def on_validation_epoch_start(self) -> None:
        self._val_hits = self._val_seen = 0

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._val_seen == 0:
            return
        acc = self._val_hits / self._val_seen
        self.log('val_acc', acc)
        self._record_epoch(self.trainer.current_epoch, acc)

    def on_train_epoch_end(self) -> None:
        # without a validation loader, keep the last alphas (select has nothing to rank)
        epoch = self.trainer.current_epoch
        if not self.trainer.val_dataloaders and (not self.history or self.history[-1]['epoch'] != epoch):
            self._record_epoch(epoch, None)
        return super().on_train_epoch_end()

    def _record_epoch(self, epoch: int, acc: Optional[float]) -> None:
        after = {k: v.detach().cpu().numpy().copy() for k, v in alpha_matrices(self).items()}
        with torch.no_grad():
            entropy = float(mean_edge_entropy(torch.as_tensor(a) for a in after.values()))
        self.history.append({'epoch': epoch, 'val_acc': acc, 'entropy': entropy,
                             'alphas': {k: v.tolist() for k, v in after.items()}})
        better = acc is not None and acc > self.best['val_acc']
        if self.select == 'last' or acc is None or better:
            chosen = self._alphas_at_start if (self.select == 'official' and self._alphas_at_start) else after
            self.best = {'val_acc': acc if acc is not None else -1.0, 'epoch': epoch,
                         'alphas': {k: np.asarray(v).copy() for k, v in chosen.items()}}
        for cb in self.epoch_callbacks:
            cb(epoch=epoch, val_acc=acc, entropy=entropy, module=self)

    # ------------------------------------------------------------------ export

    def kept_alphas(self) -> Dict[str, np.ndarray]:
        if 'alphas' in self.best:
            return self.best['alphas']
        return {k: v.detach().cpu().numpy() for k, v in alpha_matrices(self).items()}

    def genotypes(self, name: str = '') -> Tuple[Genotype, Genotype]:
        """(CIFAR genotype, ImageNet genotype with Zeroise divided by gamma) of the kept alphas."""
        alphas = self.kept_alphas()
        cifar = derive_from_model(self, alphas=alphas, name=name)
        imagenet = derive_from_model(self, alphas=alphas, gamma=self.gamma, gamma_rule=self.gamma_rule,
                                     name=f'{name}_imagenet' if name else '')
        return cifar, imagenet

    def export(self) -> Dict[str, Any]:
        """The kept (best-epoch) architecture as an NNI sample; other mutables as NNI exports them."""
        sample: Dict[str, Any] = {}
        for m in self.supernet_modules():
            if not isinstance(m, BinaryMixedCell):
                sample.update(m.export(memo=sample))
        cifar, _ = self.genotypes()
        sample.update(cifar.to_arch_dict())
        return sample


# --------------------------------------------------------------------------- the strategy


class BinaryDARTS(DARTS):
    """NNI ``DARTS`` with the BNAS mixed cell, objective and selection (see the module docstring).

    Parameters
    ----------
    arc_learning_rate, arc_betas, arc_weight_decay
        Adam for the alphas (3e-4, (0.5, 0.999), 1e-3).
    lamda, tau
        Diversity term weight and decay (1.0, 7.7).
    gamma, gamma_rule
        Zeroise transfer for the ImageNet genotype (3.0, ``'zeroise'``).
    select
        ``'best'`` (alphas after the best validation epoch), ``'official'`` or ``'last'``.
    mixed_cell
        ``'binary'`` (default), ``'fast'`` or a :class:`BinaryMixedCell` subclass.
    gradient_clip_val, log_prob_every_n_step, warmup_epochs, mutation_hooks
        As in NNI's ``DARTS`` (no clipping and no warm-up by default, as in the paper).
    validate_every_epoch
        Hand the evaluator's validation loader to Lightning as well, so the supernet is evaluated
        after every epoch (needed for ``select``); it is also the architecture batch stream.
    """

    def __init__(self, *, arc_learning_rate: float = 3e-4, arc_betas: Tuple[float, float] = (0.5, 0.999),
                 arc_weight_decay: float = 1e-3, lamda: float = LAMDA, tau: float = TAU, gamma: float = GAMMA,
                 gamma_rule: str = 'zeroise', select: str = 'best',
                 mixed_cell: Union[None, str, Type[BinaryMixedCell]] = None, gradient_clip_val: Optional[float] = None,
                 log_prob_every_n_step: int = 10, warmup_epochs: int = 0, validate_every_epoch: bool = True,
                 epoch_callbacks: Sequence[Callable[..., None]] = (), **kwargs: Any) -> None:
        super().__init__(arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs, penalty=None,
                         **kwargs)
        check_hparams(lamda, tau, gamma, select)
        if gamma_rule not in ('zeroise', 'official'):
            raise ConfigError(f'unknown gamma_rule {gamma_rule!r}; choose zeroise or official')
        self.arc_betas = tuple(arc_betas)
        self.arc_weight_decay = arc_weight_decay
        self.lamda, self.tau, self.gamma, self.gamma_rule, self.select = lamda, tau, gamma, gamma_rule, select
        self.mixed_cell = resolve_mixed_cell(mixed_cell)
        self.validate_every_epoch = validate_every_epoch
        self.epoch_callbacks = list(epoch_callbacks)

    def default_mutation_hooks(self) -> list:
        hooks = super().default_mutation_hooks()
        return [self.mixed_cell.mutate if getattr(h, '__self__', None) is DifferentiableMixedCell else h
                for h in hooks]

    def configure_oneshot_module(self, training_module: Any) -> BinaryDartsModule:
        return BinaryDartsModule(training_module, arc_learning_rate=self.arc_learning_rate, arc_betas=self.arc_betas,
                                 arc_weight_decay=self.arc_weight_decay, lamda=self.lamda, tau=self.tau,
                                 gamma=self.gamma, gamma_rule=self.gamma_rule, select=self.select,
                                 gradient_clip_val=self.gradient_clip_val,
                                 log_prob_every_n_step=self.log_prob_every_n_step, warmup_epochs=self.warmup_epochs,
                                 epoch_callbacks=self.epoch_callbacks)

    def val_dataloader(self, train_dataloader_fn: Callable[[], Any], val_dataloader_fn: Callable[[], Any]) -> Any:
        return val_dataloader_fn() if self.validate_every_epoch else None

    def genotypes(self, name: str = '') -> Tuple[Genotype, Genotype]:
        """After ``run()``: the kept CIFAR and ImageNet genotypes."""
        return self.oneshot_module.genotypes(name)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> Dict[str, Any]:
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(_tuples(state['python']))
    np.random.set_state(_tuples(state['numpy']))
    torch.set_rng_state(torch.as_tensor(state['torch'], dtype=torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state['cuda']])


def _tuples(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def _rng_for_checkpoint(state: Mapping[str, Any]) -> Dict[str, Any]:
    """RNG state in types ``torch.load(weights_only=True)`` accepts (tensors, lists, ints, strs)."""
    py = state['python']
    np_state = state['numpy']
    out = {'python': [py[0], list(py[1]), py[2]],
           'numpy': [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                     int(np_state[3]), float(np_state[4])],
           'torch': state['torch']}
    if 'cuda' in state:
        out['cuda'] = list(state['cuda'])
    return out


def _rng_from_checkpoint(saved: Mapping[str, Any]) -> Dict[str, Any]:
    py = saved['python']
    nps = saved['numpy']
    out = {'python': (py[0], tuple(py[1]), py[2]),
           'numpy': (nps[0], np.asarray(nps[1], dtype=np.uint32), nps[2], nps[3], nps[4]),
           'torch': saved['torch']}
    if 'cuda' in saved:
        out['cuda'] = saved['cuda']
    return out


# --------------------------------------------------------------------------- own search loop (CLI)


class EpochResult(dict):
    """Per-epoch record: epoch, train_loss, train_acc, arch_ce, val_loss, val_acc, entropy, lr, seconds."""


class _Cycle:
    """Endless iteration over a loader, re-shuffled on every pass (the architecture batch stream)."""

    def __init__(self, make_iter: Callable[[int], Iterator]) -> None:
        self.make_iter = make_iter
        self.passes = 0
        self.it: Optional[Iterator] = None

    def __next__(self):
        if self.it is None:
            self.it = self.make_iter(self.passes)
        try:
            return next(self.it)
        except StopIteration:
            self.passes += 1
            self.it = self.make_iter(self.passes)
            return next(self.it)


class SearchRunner:
    """The BNAS search loop on a :class:`~bnas_nni.space.BNASSpace`, with a run directory.

    ``space`` is mutated in place into the supernet by ``strategy.mutate_model``. ``train_data`` and
    ``val_data`` are the two halves of the training set (augmented); ``eval_data`` is the validation
    half without augmentation (used for the per-epoch supernet accuracy; defaults to ``val_data``).

    Run directory: ``checkpoint.pt`` (after every epoch, atomic; the state to resume exactly: weights,
    alphas, both optimizers, RNG states, history, best epoch), ``alpha_history.json`` (alphas, softmax
    entropy and metrics per epoch), ``genotype.yaml`` / ``genotype_imagenet.yaml`` (the kept genotype,
    rewritten after every epoch), ``log.txt`` and ``tb/`` (TensorBoard).
    """

    def __init__(self, space: nn.Module, strategy: BinaryDARTS, *, train_data: Any, val_data: Any,
                 eval_data: Any = None, run_dir: Union[str, os.PathLike], epochs: int = 50, batch_size: int = 64,
                 lr: float = 0.025, lr_min: float = 0.001, momentum: float = 0.9, weight_decay: float = 3e-4,
                 grad_clip: Optional[float] = None, seed: int = 2, workers: int = 0,
                 max_train_batches: Optional[int] = None, max_eval_batches: Optional[int] = None,
                 device: Union[str, torch.device] = 'cpu', progress: bool = False, tensorboard: bool = True,
                 channels_last: bool = False,
                 log_prob_every: int = 10, name: str = 'search',
                 epoch_callbacks: Sequence[Callable[[EpochResult, 'SearchRunner'], None]] = (),
                 log: Callable[[str], None] = print) -> None:
        if epochs < 1 or batch_size < 1:
            raise ConfigError(f'epochs and batch_size must be >= 1, got {epochs} and {batch_size}')
        if not (lr > 0 and 0 <= lr_min <= lr):
            raise ConfigError(f'need lr > 0 and 0 <= lr_min <= lr, got lr={lr}, lr_min={lr_min}')
        self.strategy = strategy
        self.run_dir = Path(run_dir)
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.lr, self.lr_min, self.momentum, self.weight_decay = lr, lr_min, momentum, weight_decay
        self.grad_clip = grad_clip
        self.seed, self.workers = int(seed), int(workers)
        self.max_train_batches, self.max_eval_batches = max_train_batches, max_eval_batches
        self.device = torch.device(device)
        self.progress, self.tensorboard = progress, tensorboard
        self.log_prob_every = max(1, int(log_prob_every))
        self.name = name
        self.epoch_callbacks = list(epoch_callbacks)
        self._log = log
        self.train_data, self.val_data = train_data, val_data
        self.eval_data = eval_data if eval_data is not None else val_data

        self.channels_last = bool(channels_last)
        self.model = strategy.mutate_model(space).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.alphas = arch_parameters(self.model)
        if not self.alphas:
            raise ConfigError('the space has no BNAS cells to search')
        alpha_ids = {id(p) for p in self.alphas}
        self.weights = [p for p in self.model.parameters() if id(p) not in alpha_ids]
        self.w_optim = torch.optim.SGD(self.weights, lr=lr, momentum=momentum, weight_decay=weight_decay)
        attach_latent_constraint(self.w_optim, self.model)
        self.a_optim = torch.optim.Adam(self.alphas, lr=strategy.arc_learning_rate, betas=strategy.arc_betas,
                                        weight_decay=strategy.arc_weight_decay)
        self.start_epoch = 0
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {'val_acc': -1.0, 'epoch': -1, 'alphas': None}
        self._writer = None

    # ------------------------------------------------------------------ data

    def _loader(self, data: Any, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
        gen = torch.Generator()
        gen.manual_seed(seed)
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, generator=gen,
                                           num_workers=self.workers, drop_last=False,
                                           pin_memory=self.device.type == 'cuda')

    def batches_per_epoch(self) -> int:
        n = math.ceil(len(self.train_data) / self.batch_size)
        return min(n, self.max_train_batches) if self.max_train_batches else n

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / 'checkpoint.pt'

    def state_dict(self) -> Dict[str, Any]:
        best = dict(self.best)
        if best.get('alphas') is not None:
            best['alphas'] = {k: torch.as_tensor(np.asarray(v)) for k, v in best['alphas'].items()}
        return {'format': 'bnas-nni-search/1', 'epoch': self.start_epoch, 'global_step': self.global_step,
                # plain str keys: NNI names some submodules with str subclasses that weights_only refuses
                'model': {str(k): v for k, v in self.model.state_dict().items()}, 'w_optim': self.w_optim.state_dict(),
                'a_optim': self.a_optim.state_dict(), 'rng': _rng_for_checkpoint(capture_rng()),
                'history': json.dumps(self.history), 'best': best, 'epochs': self.epochs}

    def save_checkpoint(self) -> None:
        atomic_torch_save(self.state_dict(), self.checkpoint_path)

    def load_checkpoint(self, path: Optional[Union[str, os.PathLike]] = None) -> bool:
        """Restore from ``path`` (default: the run directory's checkpoint); False when there is none."""
        path = Path(path) if path else self.checkpoint_path
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # truncated or foreign files
            raise ConfigError(f'cannot read search checkpoint {path}: {type(exc).__name__}: {exc}') from None
        if not isinstance(state, dict) or state.get('format') != 'bnas-nni-search/1':
            raise ConfigError(f'{path} is not a bnas-nni search checkpoint')
        try:
            self.model.load_state_dict(state['model'])
        except RuntimeError as exc:
            raise ConfigError(f'{path} was written for a different supernet: {str(exc).splitlines()[0]}') from None
        self.w_optim.load_state_dict(state['w_optim'])
        self.a_optim.load_state_dict(state['a_optim'])
        self.start_epoch = int(state['epoch'])
        self.global_step = int(state['global_step'])
        self.history = json.loads(state['history'])
        best = dict(state['best'])
        if best.get('alphas') is not None:
            best['alphas'] = {k: v.cpu().numpy() for k, v in best['alphas'].items()}
        self.best = best
        restore_rng(_rng_from_checkpoint(state['rng']))
        return True

    # ------------------------------------------------------------------ outputs

    def _alphas_now(self) -> Dict[str, np.ndarray]:
        return {k: v.detach().cpu().double().numpy().copy() for k, v in alpha_matrices(self.model).items()}

    def genotypes(self, name: Optional[str] = None) -> Tuple[Genotype, Genotype]:
        """(CIFAR, ImageNet) genotypes of the kept alphas (the current ones before any epoch ended)."""
        name = self.name if name is None else name
        alphas = self.best.get('alphas')
        if alphas is None:
            alphas = self._alphas_now()
        cifar = derive_from_model(self.model, alphas=alphas, name=name)
        imagenet = derive_from_model(self.model, alphas=alphas, gamma=self.strategy.gamma,
                                     gamma_rule=self.strategy.gamma_rule, name=f'{name}_imagenet')
        return cifar, imagenet

    def _write_outputs(self) -> None:
        from ..genotypes import save_genotype

        cifar, imagenet = self.genotypes()
        kept = self.best.get('epoch')
        meta = {'source': 'bnas-nni search', 'strategy': 'binary-darts',
                'epoch': None if kept is None or kept < 0 else kept + 1,
                'supernet_val_acc': self.best.get('val_acc'), 'select': self.strategy.select}
        save_genotype(cifar, self.run_dir / 'genotype.yaml', **meta)
        save_genotype(imagenet, self.run_dir / 'genotype_imagenet.yaml', gamma=self.strategy.gamma,
                      gamma_rule=self.strategy.gamma_rule, **meta)
        atomic_write_text(self.run_dir / 'alpha_history.json', json.dumps(self.history, indent=1))

    def _tb(self):
        if not self.tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / 'tb'), purge_step=self.global_step or None)
        return self._writer

    def _log_line(self, text: str) -> None:
        self._log(text)
        with open(self.run_dir / 'log.txt', 'a') as f:
            f.write(text + '\n')

    # ------------------------------------------------------------------ one epoch

    @torch.no_grad()
    def _entropy_now(self) -> float:
        return float(mean_edge_entropy(alpha_matrices(self.model).values()))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, non_blocking=True)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _arch_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Tuple[float, float, float]:
        for p in self.weights:
            p.requires_grad_(False)
        try:
            self.a_optim.zero_grad(set_to_none=True)
            ce = F.cross_entropy(self.model(x), y)
            entropy = mean_edge_entropy(alpha_matrices(self.model).values())
            loss = ce - diversity_weight(epoch, self.strategy.lamda, self.strategy.tau) * entropy
            loss.backward()
            self.a_optim.step()
        finally:
            for p in self.weights:
                p.requires_grad_(True)
        return float(loss.detach()), float(ce.detach()), float(entropy.detach())

    def _weight_step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, int]:
        for p in self.alphas:
            p.requires_grad_(False)
        try:
            self.w_optim.zero_grad(set_to_none=True)
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.weights, self.grad_clip)
            self.w_optim.step()
        finally:
            for p in self.alphas:
                p.requires_grad_(True)
        return float(loss.detach()), int((logits.argmax(-1) == y).sum())

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, float]:
        """(accuracy, mean loss) of the supernet on ``eval_data`` (BN in eval mode)."""
        self.model.eval()
        hits = seen = 0
        loss_sum = 0.0
        try:
            for i, (x, y) in enumerate(self._loader(self.eval_data, False, 0)):
                if self.max_eval_batches is not None and i >= self.max_eval_batches:
                    break
                x, y = self._to_device(x), y.to(self.device)
                out = self.model(x)
                loss_sum += float(F.cross_entropy(out, y, reduction='sum'))
                hits += int((out.argmax(-1) == y).sum())
                seen += int(y.numel())
        finally:
            self.model.train()
        return hits / max(seen, 1), loss_sum / max(seen, 1)

    def _progress(self, total: int, epoch: int):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f'search {epoch + 1}/{self.epochs}', leave=False, dynamic_ncols=True)

    def run_epoch(self, epoch: int) -> EpochResult:
        t0 = time.time()
        lr = search_lr(epoch, self.epochs, self.lr, self.lr_min)
        for group in self.w_optim.param_groups:
            group['lr'] = lr
        alphas_before = self._alphas_now()
        self.model.train()
        train_loader = self._loader(self.train_data, True, self.seed * 1_000_003 + 2 * epoch)
        val_stream = _Cycle(lambda k: iter(self._loader(self.val_data, True,
                                                        self.seed * 1_000_003 + 2 * epoch + 1 + 7919 * k)))
        total = self.batches_per_epoch()
        bar = self._progress(total, epoch)
        tb = self._tb()
        sums = {'loss': 0.0, 'hits': 0, 'seen': 0, 'arch_ce': 0.0, 'arch_loss': 0.0, 'steps': 0}
        entropy = self._entropy_now()
        try:
            for step, (x, y) in enumerate(train_loader):
                if step >= total:
                    break
                xv, yv = next(val_stream)
                x, y = self._to_device(x), y.to(self.device, non_blocking=True)
                xv, yv = self._to_device(xv), yv.to(self.device, non_blocking=True)
                arch_loss, arch_ce, entropy = self._arch_step(xv, yv, epoch)
                loss, hits = self._weight_step(x, y)
                n = int(y.numel())
                sums['loss'] += loss * n
                sums['hits'] += hits
                sums['seen'] += n
                sums['arch_ce'] += arch_ce
                sums['arch_loss'] += arch_loss
                sums['steps'] += 1
                self.global_step += 1
                if tb is not None:
                    tb.add_scalar('loss/train', loss, self.global_step)
                    tb.add_scalar('loss/arch_ce', arch_ce, self.global_step)
                    tb.add_scalar('loss/arch', arch_loss, self.global_step)
                    tb.add_scalar('arch/entropy', entropy, self.global_step)
                    tb.add_scalar('lr', lr, self.global_step)
                    if self.global_step % self.log_prob_every == 0:
                        self._log_probs(tb, self.global_step)
                if bar is not None:
                    bar.set_postfix(loss=f'{loss:.3f}', arch_ce=f'{arch_ce:.3f}', H=f'{entropy:.3f}')
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        val_acc, val_loss = self.evaluate()
        steps = max(sums['steps'], 1)
        result = EpochResult(epoch=epoch, lr=lr, train_loss=sums['loss'] / max(sums['seen'], 1),
                             train_acc=sums['hits'] / max(sums['seen'], 1), arch_ce=sums['arch_ce'] / steps,
                             arch_loss=sums['arch_loss'] / steps, val_loss=val_loss, val_acc=val_acc,
                             entropy=self._entropy_now(),
                             diversity_weight=diversity_weight(epoch, self.strategy.lamda, self.strategy.tau),
                             seconds=time.time() - t0)
        after = self._alphas_now()
        better = val_acc > self.best['val_acc']
        if self.strategy.select == 'last' or better:
            chosen = alphas_before if self.strategy.select == 'official' else after
            self.best = {'val_acc': val_acc, 'epoch': epoch, 'alphas': chosen}
        self.history.append({**result, 'alphas': {k: v.tolist() for k, v in after.items()},
                             'genotype': str(derive_from_model(self.model, alphas=after))})
        if tb is not None:
            tb.add_scalar('epoch/val_acc', val_acc, epoch)
            tb.add_scalar('epoch/val_loss', val_loss, epoch)
            tb.add_scalar('epoch/train_acc', result['train_acc'], epoch)
            tb.add_scalar('epoch/entropy', result['entropy'], epoch)
            tb.add_scalar('epoch/diversity_weight', result['diversity_weight'], epoch)
            self._log_probs(tb, self.global_step)
            tb.flush()
        return result

    def _log_probs(self, tb: Any, step: int) -> None:
        for edge, probs in edge_probabilities(self.model).items():
            for op, p in probs.items():
                tb.add_scalar(f'prob/{edge}/{op}', p, step)

    # ------------------------------------------------------------------ the search

    def run(self, resume: bool = False) -> Tuple[Genotype, Genotype]:
        """Search from scratch (or from the run directory's checkpoint when ``resume``); returns the
        kept (CIFAR, ImageNet) genotypes. A ``KeyboardInterrupt`` leaves the last completed epoch's
        checkpoint in place, so ``run(resume=True)`` continues exactly."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.load_checkpoint():
            self._log_line(f'resumed from {self.checkpoint_path} at epoch {self.start_epoch}/{self.epochs}')
        try:
            for epoch in range(self.start_epoch, self.epochs):
                result = self.run_epoch(epoch)
                self.start_epoch = epoch + 1
                self.save_checkpoint()
                self._write_outputs()
                self._log_line(
                    f'epoch {epoch + 1}/{self.epochs} lr {result["lr"]:.6f} train_loss {result["train_loss"]:.4f} '
                    f'train_acc {100 * result["train_acc"]:.2f} arch_ce {result["arch_ce"]:.4f} '
                    f'val_loss {result["val_loss"]:.4f} val_acc {100 * result["val_acc"]:.2f} '
                    f'entropy {result["entropy"]:.4f} ({result["seconds"]:.1f}s)')
                for cb in self.epoch_callbacks:
                    cb(result, self)
            self._write_outputs()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        return self.genotypes()
