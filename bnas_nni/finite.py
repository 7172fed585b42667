"""Stopping a run at the first NaN or Inf: the checks, and the one line that says where and what to change.

The training loop and the search's architecture and weight steps call these after a loss, a backward and
an update; what they find becomes a :class:`~bnas_nni.errors.NonFiniteError` (the last checkpoint stays).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ['non_finite_message', 'check_finite_grads', 'check_finite_params']


def non_finite_message(what: str, epoch: int, step: int, lr: float, amp: Optional[str] = None,
                       lr_name: str = 'lr') -> str:
    """The one line for a NaN/Inf: where, at which learning rate, and a fix that fits the run."""
    fix = 'lower the learning rate (lr) or set grad_clip' if lr_name == 'lr' else \
        'lower the learning rates (lr, arc_lr) or set grad_clip'
    if amp == 'fp16':
        fix += ', or train without fp16 (amp: null or bf16)'
    return (f'non-finite {what} at epoch {epoch} step {step} ({lr_name} {lr:.3g}); {fix}; '
            'the last checkpoint is untouched, continue with --resume after the change')


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(list(tensors)))).all())   # one reduction, one sync


def check_finite_grads(params: Sequence[torch.Tensor]) -> bool:
    """True when every gradient of ``params`` is finite."""
    return _all_finite([p.grad for p in params if p.grad is not None])


def check_finite_params(params: Sequence[torch.Tensor]) -> bool:
    """True when every parameter in ``params`` is finite (after a step: a finite but huge update)."""
    return _all_finite([p.detach() for p in params])
