r"""BinaryDARTS: the BNAS search (Kim, Singh, Choi, ECCV 2020) as an NNI ``DARTS`` strategy -- the one implementation.

:class:`BinaryDartsModule` holds the whole algorithm (the objective, the architecture step, the weight
step, per-epoch selection and the derivation). It runs in two drivers that share it:

* ``NasExperiment(space, evaluator, BinaryDARTS(...)).run()``: NNI's sequential engine and Lightning
  (:meth:`BinaryDartsModule.training_step`), with the evaluator's weight optimizer (use
  :class:`bnas_nni.search.evaluators.BinaryClassification` for the paper's SGD + cosine). Give the
  strategy a ``run_dir`` and it also gets the run directory, resume and TensorBoard of the CLI.
* :class:`bnas_nni.search.driver.SearchDriver` (what ``bnas-nni search`` uses): a plain resumable
  loop around the same module, the paper's per-epoch weight schedule, and exact resume.

What differs from NNI's stock ``DARTS``
---------------------------------------

* **Mixed cell.** :class:`~bnas_nni.search.mixed_cell.BinaryMixedCell` semantics: one logit per named
  candidate and a softmax over exactly those seven ops; Zeroise is a real candidate that can win an edge,
  with no hidden zero logit. The default implementation is the fast one
  (:class:`~bnas_nni.search.fast_cell.FastBinaryMixedCell`, the same function computed per state);
  ``mixed_cell='reference'`` selects the straightforward cell.
* **Order of an iteration** (first-order DARTS, as ``search.py``): an architecture step on a batch of
  the validation half, then a weight step on a batch of the training half. Both forwards use the
  binarized weights; the weight optimizer carries the binarizer's persistent latent-weight step. BN
  running statistics are updated by both forwards, as in the official code. The architecture step
  computes no weight gradients and the weight step no alpha gradients (both are discarded anyway, so
  every update is unchanged). Architecture batches come from cycling through the shuffled validation
  half (the official code draws ``next(iter(valid_queue))``, a fresh random batch, every iteration:
  the same distribution, without rebuilding a loader each step).
* **Objective of the architecture step**: the diversity term of :mod:`bnas_nni.search.objective`;
  with a :class:`~bnas_nni.search.objective.LatencyTerm` that has a target, plus the expected latency
  penalty of the derived network on the packed engine (same module; NNI's ``ExpectationProfilerPenalty``
  shape). Without a target that term is never computed: the loss is the paper's bit for bit. A latency
  term (with or without a target) also adds ``expected_latency_ms`` (under the alphas after the epoch)
  and ``predicted_latency_ms`` (of that epoch's derived genotype) to every epoch's record.
* **Optimizers.** Architecture: Adam, lr 3e-4, betas (0.5, 0.999), weight decay 1e-3. Weights (driver):
  SGD 0.025, momentum 0.9, weight decay 3e-4, cosine to 0.001 set once per epoch, as ``search.py``
  (:func:`~bnas_nni.search.objective.search_lr`). No gradient clipping unless asked for.
* **Selection.** After each epoch the supernet is evaluated on the whole validation half (binarized
  weights, BN in eval mode, no augmentation). The genotype kept is that of the best epoch:
  ``select='best'`` (default) derives it from the alphas *after* that epoch, the intended reading;
  ``select='official'`` reproduces the released code's off-by-one (the alphas at the *start* of the
  best epoch); ``select='last'`` keeps the final alphas. With a latency target, ``best`` ranks first by
  whether the epoch's derived network meets the target (predicted latency <= target), then by accuracy:
  the penalty acts on the *expected* latency, and the derived (argmax) network can sit on either side
  of it.
* **Derivation** (:func:`bnas_nni.genotypes.derive_genotype`): per node, the two incoming edges with
  the largest softmax weight *including* Zeroise, and on each the argmax op *including* Zeroise. The
  ImageNet variant divides Zeroise's probability by ``gamma`` (3) before deriving; that is the intended
  rule. The released code divides row 0 instead, which only reorders node 0 (``gamma_rule='official'``).
* **Nothing silent.** A non-finite loss, alpha gradient or alpha stops the search at that step with one
  line (:class:`~bnas_nni.errors.NonFiniteError`); the kept genotype is never derived from
  non-finite alphas.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

import json

import numpy as np
import torch
import torch.nn as nn
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedCell
from nni.nas.strategy import DARTS

from ..errors import ConfigError, NonFiniteError
from ..finite import check_finite_grads, check_finite_params, non_finite_message
from ..genotypes import Genotype
from ..quant import attach_latent_constraint
from .fast_cell import FastBinaryMixedCell
from .mixed_cell import BinaryMixedCell
from .objective import (
    GAMMA,
    LAMDA,
    SELECT_RULES,
    TAU,
    LatencyTerm,
    diversity_weight,
    expected_latency,
    mean_edge_entropy,
)
from .record import attach_run_directory
from .supernet import alpha_matrices, arch_parameters, binary_cells, cell_ops, derive_from_model, edge_probabilities  # noqa: F401 - re-exported

__all__ = ['binary_cells', 'alpha_matrices', 'arch_parameters', 'derive_from_model', 'edge_probabilities',
           'resolve_mixed_cell', 'BinaryDartsModule', 'BinaryDARTS', 'requires_grad_off']


def resolve_mixed_cell(spec: Union[None, str, Type[BinaryMixedCell]]) -> Type[BinaryMixedCell]:
    """``'fast'`` (default): :class:`~bnas_nni.search.fast_cell.FastBinaryMixedCell`; ``'reference'``
    (``'binary'``, its earlier name, still works): the straightforward :class:`BinaryMixedCell` the fast
    one is tested against; or a ``BinaryMixedCell`` subclass."""
    if spec is None or spec == 'fast':
        return FastBinaryMixedCell
    if spec in ('reference', 'binary'):
        return BinaryMixedCell
    if isinstance(spec, type) and issubclass(spec, BinaryMixedCell):
        return spec
    raise ConfigError(f'mixed_cell must be "fast", "reference" or a BinaryMixedCell subclass, got {spec!r}')


@contextlib.contextmanager
def requires_grad_off(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, autograd computes no gradients for ``params`` (restored afterwards)."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def _loss_of(out: Any) -> torch.Tensor:
    return out['loss'] if isinstance(out, dict) else out


def _check_hparams(lamda: float, tau: float, gamma: float, gamma_rule: str, select: str) -> None:
    for key, value, ok, what in (('lamda', lamda, lambda v: v >= 0, '>= 0 (the diversity weight)'),
                                 ('tau', tau, lambda v: v > 0, '> 0 (the diversity decay in epochs)'),
                                 ('gamma', gamma, lambda v: v > 0, '> 0 (Zeroise transfer for ImageNet)')):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ConfigError(f'{key} must be a finite number {what}, got {value!r}')
    if select not in SELECT_RULES:
        raise ConfigError(f'unknown select rule {select!r}; choose one of {", ".join(SELECT_RULES)}')
    if gamma_rule not in ('zeroise', 'official'):
        raise ConfigError(f'unknown gamma_rule {gamma_rule!r}; choose zeroise or official')


# --------------------------------------------------------------------------- the one-shot module


class BinaryDartsModule(DartsLightningModule):
    """The BNAS search algorithm on a supernet (see the module docstring), as NNI's one-shot module.

    Step methods (:meth:`arch_step`, :meth:`weight_step`) and epoch bookkeeping (:meth:`begin_epoch`,
    :meth:`record_epoch`, :meth:`genotypes`) work with or without a Lightning trainer, so the CLI's
    driver and NNI's engine run the same code. Under Lightning it logs ``arch_loss``, ``arch_ce``,
    ``arch_entropy``, ``diversity_weight``, ``lr``, ``prob/<edge>/<op>`` and, after each validation
    pass, ``val_acc`` (supernet accuracy on the evaluator's validation loader, in percent); with a latency
    target also ``expected_latency_ms`` per step.
    """

    def __init__(self, training_module: Any, *, arc_learning_rate: float = 3e-4,
                 arc_betas: Tuple[float, float] = (0.5, 0.999), arc_weight_decay: float = 1e-3,
                 lamda: float = LAMDA, tau: float = TAU, gamma: float = GAMMA, gamma_rule: str = 'zeroise',
                 select: str = 'best', gradient_clip_val: Optional[float] = None, log_prob_every_n_step: int = 10,
                 warmup_epochs: int = 0, epoch_callbacks: Sequence[Callable[..., None]] = (),
                 latency: Optional[LatencyTerm] = None) -> None:
        super().__init__(training_module, arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs, penalty=None)
        _check_hparams(lamda, tau, gamma, gamma_rule, select)
        self.arc_betas = tuple(arc_betas)
        self.arc_weight_decay = arc_weight_decay
        self.lamda, self.tau, self.gamma, self.gamma_rule, self.select = lamda, tau, gamma, gamma_rule, select
        self.epoch_callbacks = list(epoch_callbacks)
        self.latency = latency
        self.best: Dict[str, Any] = {'val_acc': -1.0, 'epoch': -1, 'alphas': None}
        self.history: List[Dict[str, Any]] = []
        self._alphas_at_start: Optional[Dict[str, np.ndarray]] = None
        self._weights: Optional[List[nn.Parameter]] = None
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

    def weight_parameters(self) -> List[nn.Parameter]:
        """Every parameter that is not an architecture weight (what the weight optimizer updates)."""
        if self._weights is None:
            alpha = {id(p) for p in self.arch_parameters()}
            self._weights = [p for p in self.parameters() if id(p) not in alpha]
        return self._weights

    def configure_architecture_optimizers(self) -> torch.optim.Optimizer:
        params = self.arch_parameters()
        if not params:
            raise ConfigError('the space has no BNAS cells to search')
        return torch.optim.Adam(params, lr=self.arc_learning_rate, betas=self.arc_betas,
                                weight_decay=self.arc_weight_decay)

    def _weight_optimizers(self) -> List[torch.optim.Optimizer]:
        return [opt for opt in self.trainer.optimizers if not getattr(opt, 'is_arch_optimizer', False)]

    def on_train_start(self) -> None:
        for opt in self._weight_optimizers():
            attach_latent_constraint(opt, self)    # a foreign evaluator's optimizer gets the latent step too
        return super().on_train_start()

    # ------------------------------------------------------------------ the steps

    def arch_entropy(self) -> torch.Tensor:
        return mean_edge_entropy(alpha_matrices(self).values())

    def arch_objective(self, ce: torch.Tensor, epoch: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """``(CE - w H [+ latency term], H, w)`` with ``w = diversity_weight(epoch)``; the latency term only
        with a target (its expectation is then kept in :attr:`last_expected_ms`)."""
        entropy = self.arch_entropy()
        weight = diversity_weight(epoch, self.lamda, self.tau)
        loss = ce - weight * entropy
        if self.latency is not None and self.latency.active:
            alphas = alpha_matrices(self)
            expected = self.latency.expected_ms(alphas)
            self.last_expected_ms = float(expected.detach())
            loss = loss + self.latency(self.latency.penalised_ms(alphas, expected))
        return loss, entropy, weight

    #: expected latency (ms) under the alphas of the last architecture step with a latency target
    last_expected_ms: Optional[float] = None

    def expected_latency_ms(self, alphas: Optional[Mapping[str, Any]] = None) -> Optional[float]:
        """Expected latency (ms) of the derived network under the current (or given) alphas; None without
        a latency model."""
        if self.latency is None:
            return None
        a = alphas if alphas is not None else self.alphas_now()
        with torch.no_grad():
            return float(expected_latency({k: torch.as_tensor(np.asarray(v)) for k, v in a.items()},
                                          self.latency.model))

    def predicted_latency_ms(self, genotype: Genotype) -> Optional[float]:
        """Predicted latency (ms) of ``genotype``'s derived network; None without a latency model."""
        return None if self.latency is None else self.latency.model.predict(genotype)

    def _backward(self, loss: torch.Tensor) -> None:
        if getattr(self, '_trainer', None) is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _lr(self, optimizer: Any) -> float:
        return float(optimizer.param_groups[0]['lr'])

    def _non_finite(self, what: str, epoch: int, step: int, optimizer: Any, arch: bool) -> NonFiniteError:
        return NonFiniteError(non_finite_message(what, epoch, step, self._lr(optimizer),
                                                 lr_name='arc_lr' if arch else 'lr'))

    #: Data-parallel seam: ``grad_sync(params, loss) -> loss``, set by a driver that runs the search on
    #: several processes (:class:`bnas_nni.search.data_parallel.GradientSync`). Called right after each
    #: step's backward with that step's parameters (alphas or weights) and loss value, it averages their
    #: gradients and the loss over the ranks before anything reads them (checks, clipping, the step).
    grad_sync: Optional[Callable[[Sequence[torch.Tensor], float], float]] = None

    def _checked_backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor], what: str, epoch: int,
                          step: int, optimizer: Any, arch: bool = False) -> float:
        """Backward of a finite ``loss`` whose gradients of ``params`` come out finite; else one line.

        With :attr:`grad_sync` every rank runs the backward and the all-reduce and then checks the
        averaged loss and gradients, so a non-finite value on one rank stops all ranks at the same step."""
        value = float(loss.detach())
        if self.grad_sync is None and not math.isfinite(value):
            raise self._non_finite(what, epoch, step, optimizer, arch)
        self._backward(loss)
        if self.grad_sync is not None:
            value = self.grad_sync(params, value)
            if not math.isfinite(value):
                raise self._non_finite(what, epoch, step, optimizer, arch)
        if not check_finite_grads(params):
            raise self._non_finite(f'{what} gradient', epoch, step, optimizer, arch)
        return value

    def arch_step(self, compute_ce: Callable[[], torch.Tensor], epoch: int, optimizer: Any,
                  step: int = 0) -> Dict[str, float]:
        """One architecture step: ``compute_ce()`` (the validation-batch cross entropy), the objective,
        backward without weight gradients, Adam on the alphas. Returns ``arch_loss``, ``arch_ce``,
        ``entropy`` and ``diversity_weight`` (and, with a latency target, ``expected_latency_ms`` before the
        step)."""
        alphas = self.arch_parameters()
        with requires_grad_off(self.weight_parameters()):
            optimizer.zero_grad(set_to_none=True)
            ce = compute_ce()
            loss, entropy, weight = self.arch_objective(ce, epoch)
            value = self._checked_backward(loss, alphas, 'architecture loss', epoch, step, optimizer, arch=True)
            optimizer.step()
        if not bool(torch.isfinite(torch.cat([a.detach().reshape(-1) for a in alphas])).all()):
            raise self._non_finite('alpha', epoch, step, optimizer, arch=True)
        stats = {'arch_loss': value, 'arch_ce': float(ce.detach()), 'entropy': float(entropy.detach()),
                 'diversity_weight': weight}
        if self.latency is not None and self.latency.active:
            stats['expected_latency_ms'] = self.last_expected_ms
        return stats

    def weight_step(self, compute_loss: Callable[[], Tuple[torch.Tensor, torch.Tensor]], epoch: int,
                    optimizer: torch.optim.Optimizer, grad_clip: Optional[float] = None,
                    step: int = 0) -> Tuple[float, torch.Tensor]:
        """One weight step without alpha gradients: ``compute_loss() -> (loss, logits)``, backward,
        optional clipping, the optimizer (whose pre-step hook runs the latent-weight step)."""
        weights = self.weight_parameters()
        with requires_grad_off(self.arch_parameters()):
            optimizer.zero_grad(set_to_none=True)
            loss, logits = compute_loss()
            value = self._checked_backward(loss, weights, 'loss', epoch, step, optimizer)
            if grad_clip:
                nn.utils.clip_grad_norm_(weights, grad_clip)
            optimizer.step()
            if not check_finite_params(weights):        # a finite but huge step: stop before it is checkpointed
                raise self._non_finite('weight update', epoch, step, optimizer, arch=False)
        return value, logits.detach()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Lightning: the same architecture step, then NNI's weight step with the evaluator's optimizer."""
        epoch = self.trainer.current_epoch
        if self.warmup_epochs == 0 or epoch >= self.warmup_epochs:
            self.resample()
            stats = self.arch_step(lambda: _loss_of(self.training_module.training_step(batch['val'], 2 * batch_idx)),
                                   epoch, self.architecture_optimizers(), batch_idx)
            self.log_dict({'arch_loss': stats['arch_loss'], 'arch_ce': stats['arch_ce'],
                           'arch_entropy': stats['entropy'], 'diversity_weight': stats['diversity_weight']})
            if 'expected_latency_ms' in stats:
                self.log('expected_latency_ms', stats['expected_latency_ms'])
        self.resample()
        with requires_grad_off(self.arch_parameters()):
            out = self.training_module.training_step(batch['train'], 2 * batch_idx + 1)
            loss = _loss_of(out)
            if not math.isfinite(float(loss.detach())):
                opts = self._weight_optimizers()
                raise NonFiniteError(non_finite_message('loss', epoch, batch_idx, self._lr(opts[0]) if opts else 0.0))
            self.advance_optimization(loss, batch_idx, self.gradient_clip_val)
        self.advance_lr_schedulers(batch_idx)
        opts = self._weight_optimizers()
        if opts:
            self.log('lr', self._lr(opts[0]))
        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return out

    # ------------------------------------------------------------------ per-epoch selection

    def alphas_now(self) -> Dict[str, np.ndarray]:
        return {k: v.detach().cpu().double().numpy().copy() for k, v in alpha_matrices(self).items()}

    def begin_epoch(self) -> None:
        """Remember the alphas at the start of an epoch (``select='official'`` keeps those)."""
        self._alphas_at_start = self.alphas_now()

    def record_epoch(self, epoch: int, val_acc: Optional[float], **metrics: Any) -> Dict[str, Any]:
        """Append the epoch to :attr:`history` and update :attr:`best` (accuracy in percent, or None when
        nothing was evaluated: then the last alphas are kept). Returns the history record."""
        after = self.alphas_now()
        with torch.no_grad():
            entropy = float(mean_edge_entropy(torch.as_tensor(a) for a in after.values()))
        genotype = derive_from_model(self, alphas=after)
        if self.latency is not None:
            metrics = {**metrics, 'expected_latency_ms': self.expected_latency_ms(after),
                       'predicted_latency_ms': self.predicted_latency_ms(genotype)}
        record = {'epoch': epoch, 'val_acc': val_acc, 'entropy': entropy, **metrics,
                  'alphas': {k: v.tolist() for k, v in after.items()}, 'genotype': str(genotype)}
        self.history.append(record)
        better = val_acc is not None and val_acc > self.best['val_acc']
        within = None
        if self.latency is not None and self.latency.active:
            # with a target, an epoch whose derived network meets it beats any that does not
            within = metrics['predicted_latency_ms'] <= self.latency.target_ms
            better = val_acc is not None and (within, val_acc) > (bool(self.best.get('within_target')),
                                                                  self.best['val_acc'])
        if self.select == 'last' or val_acc is None or better:
            chosen = self._alphas_at_start if (self.select == 'official' and self._alphas_at_start) else after
            self.best = {'val_acc': val_acc if val_acc is not None else -1.0, 'epoch': epoch,
                         'alphas': {k: np.asarray(v).copy() for k, v in chosen.items()}}
            if within is not None:
                self.best['within_target'] = within
        for cb in self.epoch_callbacks:
            cb(record, self)
        return record

    def kept_alphas(self) -> Dict[str, np.ndarray]:
        if self.best.get('alphas') is not None:
            return self.best['alphas']
        return self.alphas_now()

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

    def selection_state(self) -> Dict[str, Any]:
        """History and best epoch as plain types and tensors (for checkpoints)."""
        best = dict(self.best)
        if best.get('alphas') is not None:
            best['alphas'] = {k: torch.as_tensor(np.asarray(v)) for k, v in best['alphas'].items()}
        return {'history': json.dumps(self.history), 'best': best}

    def load_selection_state(self, state: Mapping[str, Any]) -> None:
        self.history = json.loads(state['history'])
        best = dict(state['best'])
        if best.get('alphas') is not None:
            best['alphas'] = {k: v.cpu().numpy() for k, v in best['alphas'].items()}
        self.best = best

    # ------------------------------------------------------------------ Lightning hooks

    def on_train_epoch_start(self) -> None:
        self.begin_epoch()
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
        acc = 100.0 * self._val_hits / self._val_seen
        self.log('val_acc', acc)
        self.record_epoch(self.trainer.current_epoch, acc)

    def on_train_epoch_end(self) -> None:
        # without a validation loader, keep the last alphas (select has nothing to rank)
        epoch = self.trainer.current_epoch
        if not self.trainer.val_dataloaders and (not self.history or self.history[-1]['epoch'] != epoch):
            self.record_epoch(epoch, None)
        return super().on_train_epoch_end()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint['bnas_selection'] = self.selection_state()

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if 'bnas_selection' in checkpoint:
            self.load_selection_state(checkpoint['bnas_selection'])


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
        ``'fast'`` (default, exact), ``'binary'`` (the straightforward cell) or a :class:`BinaryMixedCell` subclass.
    gradient_clip_val, log_prob_every_n_step, warmup_epochs, mutation_hooks
        As in NNI's ``DARTS`` (no clipping and no warm-up by default, as in the paper).
    validate_every_epoch
        Hand the evaluator's validation loader to Lightning as well, so the supernet is evaluated
        after every epoch (needed for ``select``); it is also the architecture batch stream.
    run_dir, resume
        NNI path only: write the run directory of ``bnas-nni search`` (genotypes, alpha history,
        ``metrics.csv``, TensorBoard, a resumable Lightning checkpoint); ``resume`` continues it.
    latency
        A :class:`~bnas_nni.search.objective.LatencyTerm`: with a target, the architecture loss gains the
        expected-latency penalty; with or without one, each epoch records expected and predicted latency.
        None (default): the paper's search.
    """

    def __init__(self, *, arc_learning_rate: float = 3e-4, arc_betas: Tuple[float, float] = (0.5, 0.999),
                 arc_weight_decay: float = 1e-3, lamda: float = LAMDA, tau: float = TAU, gamma: float = GAMMA,
                 gamma_rule: str = 'zeroise', select: str = 'best',
                 mixed_cell: Union[None, str, Type[BinaryMixedCell]] = 'fast',
                 gradient_clip_val: Optional[float] = None, log_prob_every_n_step: int = 10, warmup_epochs: int = 0,
                 validate_every_epoch: bool = True, epoch_callbacks: Sequence[Callable[..., None]] = (),
                 run_dir: Optional[str] = None, resume: bool = False, latency: Optional[LatencyTerm] = None,
                 **kwargs: Any) -> None:
        super().__init__(arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs, penalty=None,
                         **kwargs)
        _check_hparams(lamda, tau, gamma, gamma_rule, select)
        self.arc_betas = tuple(arc_betas)
        self.arc_weight_decay = arc_weight_decay
        self.lamda, self.tau, self.gamma, self.gamma_rule, self.select = lamda, tau, gamma, gamma_rule, select
        self.mixed_cell = resolve_mixed_cell(mixed_cell)
        self.validate_every_epoch = validate_every_epoch
        self.epoch_callbacks = list(epoch_callbacks)
        self.run_dir = run_dir
        self.resume = resume
        self.latency = latency

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
                                 epoch_callbacks=self.epoch_callbacks, latency=self.latency)

    def mutate_evaluator(self, evaluator: Any) -> Any:
        mutated = super().mutate_evaluator(evaluator)
        if self.run_dir:
            attach_run_directory(mutated, self, self.run_dir, resume=self.resume)
        return mutated

    def val_dataloader(self, train_dataloader_fn: Callable[[], Any], val_dataloader_fn: Callable[[], Any]) -> Any:
        return val_dataloader_fn() if self.validate_every_epoch else None

    def genotypes(self, name: str = '') -> Tuple[Genotype, Genotype]:
        """After ``run()``: the kept CIFAR and ImageNet genotypes."""
        return self.oneshot_module.genotypes(name)  # type: ignore[attr-defined]
