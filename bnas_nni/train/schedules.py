"""Learning-rate schedules of the two BNAS recipes, both stepped every iteration.

* CIFAR-10: :class:`OneCycleLR`, the official one-cycle schedule (``src/utils.py``), which also cycles
  momentum. It is a :class:`torch.optim.lr_scheduler.LRScheduler`, so ``state_dict`` /
  ``load_state_dict`` / ``get_last_lr`` behave like torch's and resuming is exact. The value at each
  step is computed in closed form from the step index.
* ImageNet: torch's ``CosineAnnealingWarmRestarts(T_0=50, eta_min=0)`` stepped with the fractional
  epoch ``epoch + i / iters`` before each optimizer step (:func:`cosine_restarts`).
* ``cosine`` (torch's ``CosineAnnealingLR`` to ``lr_min`` over all iterations) and ``linear`` (decay to 0
  over all iterations, the ReActNet recipe), both stepped after every optimizer step; ``constant``.

Use :class:`IterationSchedule` to drive either from a training loop without caring which.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, LambdaLR, LRScheduler

from ..errors import ConfigError

__all__ = ['OneCycleLR', 'cosine_restarts', 'IterationSchedule', 'build_schedule']


class OneCycleLR(LRScheduler):
    """The official BNAS one-cycle schedule (not torch's ``OneCycleLR``, whose shape differs).

    With ``num_steps`` = epochs x iterations per epoch and ``cycle = int(num_steps * (1 - annihilation_frac))``:

    * steps ``0 .. cycle//2``: lr rises linearly ``min_lr -> max_lr``, momentum falls ``max_m -> min_m``;
    * up to ``cycle``: lr falls ``max_lr -> min_lr``, momentum rises ``min_m -> max_m``;
    * up to ``num_steps``: lr falls ``min_lr -> min_lr * reduce_factor``, momentum stays at ``max_m``;
    * beyond: unchanged.

    Like the original, constructing it performs step 0 (lr = ``min_lr``), and ``step()`` is called
    after every optimizer step. Every param group gets the same lr and momentum (the original only
    updated group 0; the BNAS trainers have a single group).
    """

    def __init__(self, optimizer: Optimizer, num_steps: int, lr_range: Tuple[float, float] = (0.1, 1.0),
                 momentum_range: Tuple[float, float] = (0.85, 0.95), annihilation_frac: float = 0.1,
                 reduce_factor: float = 0.01, last_epoch: int = -1) -> None:
        self.min_lr, self.max_lr = float(lr_range[0]), float(lr_range[1])
        self.min_momentum, self.max_momentum = float(momentum_range[0]), float(momentum_range[1])
        if not self.min_lr < self.max_lr:
            raise ConfigError(f'one-cycle lr_range must be (min, max) with min < max, got {tuple(lr_range)}')
        if not self.min_momentum < self.max_momentum:
            raise ConfigError(f'one-cycle momentum_range must be (min, max) with min < max, '
                              f'got {tuple(momentum_range)}')
        if num_steps < 1:
            raise ConfigError(f'one-cycle num_steps must be positive, got {num_steps}')
        self.num_steps = int(num_steps)
        # same expression as the original, so the integer rounding matches
        self.num_cycle_steps = int(num_steps * (1. - annihilation_frac))
        self.final_lr = self.min_lr * reduce_factor
        super().__init__(optimizer, last_epoch)

    # closed forms ---------------------------------------------------------------------------
    @staticmethod
    def _frac(num: int, den: int) -> float:
        return num / den if den > 0 else 1.0       # degenerate phases of very short runs

    def lr_at(self, step: int) -> float:
        half = self.num_cycle_steps // 2
        step = min(step, self.num_steps)
        if step <= half:
            return self.min_lr + (self.max_lr - self.min_lr) * self._frac(step, half)
        if step <= self.num_cycle_steps:
            scale = self._frac(step - half, self.num_cycle_steps - half)
            return self.max_lr - (self.max_lr - self.min_lr) * scale
        scale = self._frac(step - self.num_cycle_steps, self.num_steps - self.num_cycle_steps)
        return self.min_lr - (self.min_lr - self.final_lr) * scale

    def momentum_at(self, step: int) -> float:
        half = self.num_cycle_steps // 2
        if step <= half:
            return self.max_momentum - (self.max_momentum - self.min_momentum) * self._frac(step, half)
        if step <= self.num_cycle_steps:
            scale = self._frac(step - half, self.num_cycle_steps - half)
            return self.min_momentum + (self.max_momentum - self.min_momentum) * scale
        return self.max_momentum

    # LRScheduler protocol -------------------------------------------------------------------
    def get_lr(self) -> List[float]:  # type: ignore[override]
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def step(self, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        if epoch is not None:
            raise TypeError('OneCycleLR is stepped once per iteration without arguments')
        super().step()
        momentum = self.momentum_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            if 'momentum' in group:
                group['momentum'] = momentum
            elif 'betas' in group:
                group['betas'] = (momentum, *group['betas'][1:])

    def get_last_momentum(self) -> List[float]:
        return [g.get('momentum', g.get('betas', (None,))[0]) for g in self.optimizer.param_groups]


def cosine_restarts(optimizer: Optimizer, restart_epochs: int = 50,
                    eta_min: float = 0.0) -> CosineAnnealingWarmRestarts:
    """The ImageNet schedule; step it with ``scheduler.step(epoch + i / iters)`` before each optimizer step."""
    return CosineAnnealingWarmRestarts(optimizer, T_0=restart_epochs, eta_min=eta_min)


class IterationSchedule:
    """Drives a per-iteration scheduler from the loop: ``before_step(epoch, i, iters)`` then ``after_step()``.

    ``kind`` is ``onecycle``, ``cosine`` or ``linear`` (stepped after the optimizer step),
    ``cosine_restarts`` (stepped with the fractional epoch before it) or ``constant``.
    """

    AFTER_STEP = ('onecycle', 'cosine', 'linear')

    def __init__(self, kind: str, scheduler: Optional[LRScheduler], optimizer: Optional[Optimizer] = None) -> None:
        self.kind = kind
        self.scheduler = scheduler
        self.optimizer = optimizer if optimizer is not None else getattr(scheduler, 'optimizer', None)

    def before_step(self, epoch: int, i: int, iters: int) -> None:
        if self.kind == 'cosine_restarts':
            self.scheduler.step(epoch + i / iters)

    def after_step(self) -> None:
        if self.kind in self.AFTER_STEP:
            self.scheduler.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]['lr'])

    def set_epoch_start(self, epoch: int) -> None:
        """Before logging ``epoch N lr ...``: the cosine schedule shows the value of the epoch's first step."""
        if self.kind == 'cosine_restarts':
            self.scheduler.step(epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def build_schedule(cfg: Dict[str, Any], optimizer: Optimizer, iters_per_epoch: int) -> IterationSchedule:
    """The schedule named by ``cfg['schedule']`` for ``cfg['epochs']`` epochs of ``iters_per_epoch`` steps."""
    kind = cfg['schedule']
    if kind == 'onecycle':
        lr = cfg['lr']
        sched = OneCycleLR(optimizer, cfg['epochs'] * iters_per_epoch, lr_range=(cfg['onecycle_min_factor'] * lr, lr),
                           momentum_range=tuple(cfg['onecycle_momentum']),
                           annihilation_frac=cfg['onecycle_annihilation'], reduce_factor=cfg['onecycle_reduce_factor'])
        return IterationSchedule(kind, sched)
    if kind == 'cosine_restarts':
        return IterationSchedule(kind, cosine_restarts(optimizer, cfg['restart_epochs']))
    total = max(1, cfg['epochs'] * iters_per_epoch)
    if kind == 'cosine':
        return IterationSchedule(kind, CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.get('lr_min', 0.0)))
    if kind == 'linear':
        return IterationSchedule(kind, LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total)))
    if kind == 'constant':
        return IterationSchedule(kind, None, optimizer)
    raise ConfigError(f'unknown schedule {kind!r}; choose onecycle, cosine_restarts, cosine, linear or constant')
