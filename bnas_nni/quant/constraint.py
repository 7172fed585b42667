"""The binarizers' persistent latent-weight step, run before every optimizer step.

:func:`attach_latent_constraint` is the one place that ties it to an optimizer; the optimizer factory
(:func:`bnas_nni.train.optim.build_optimizer`) calls it, and so does the one-shot search module for an
optimizer that a foreign evaluator built. Attaching twice is a no-op.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .conv import BinaryConv2d

__all__ = ['binary_convs', 'constrain_latent_weights_', 'attach_latent_constraint', 'has_latent_constraint']

_MARK = '_bnas_latent_constraint'


def binary_convs(model: nn.Module) -> List[BinaryConv2d]:
    """The convs of ``model`` whose weights are binarized, in registration order."""
    return [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.weight_quantizer is not None]


@torch.no_grad()
def constrain_latent_weights_(model: nn.Module) -> int:
    """Apply each binarizer's persistent latent step to ``model``; returns how many convs it touched."""
    convs = binary_convs(model)
    for m in convs:
        m.weight_quantizer.constrain_(m.weight)
    return len(convs)


def has_latent_constraint(optimizer: torch.optim.Optimizer) -> bool:
    return getattr(optimizer, _MARK, None) is not None


def attach_latent_constraint(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run each binarizer's latent step before every ``optimizer.step()``.

    Only convs whose weights this optimizer updates are touched. Returns the hook handle (the existing
    one when the optimizer already has it).
    """
    if has_latent_constraint(optimizer):
        return getattr(optimizer, _MARK)
    owned = {id(p) for group in optimizer.param_groups for p in group['params']}

    def hook(opt, args, kwargs):
        with torch.no_grad():
            for m in binary_convs(model):
                if id(m.weight) in owned:
                    m.weight_quantizer.constrain_(m.weight)

    handle = optimizer.register_step_pre_hook(hook)
    setattr(optimizer, _MARK, handle)
    return handle
