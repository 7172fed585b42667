r"""Activation quantizers: what a binary op applies to its (batch-normalised) input.

``ste_sign`` is the official BNAS ``BinActive``: forward :math:`\mathrm{sign}(x)` with
``sign(0) = 0``, backward the clipped straight-through estimator :math:`g\,1_{|x|<1}`. ``identity``
keeps activations in full precision (the stem, search-time preprocessing, ablations).
"""
from __future__ import annotations

import torch

from ..registry import Registry
from .base import Quantizer, class_registrar, snake_name

__all__ = ['ACTIVATIONS', 'ActivationQuantizer', 'SteSign', 'IdentityQuantizer', 'register_activation']

#: name -> activation quantizer class
ACTIVATIONS: Registry = Registry('activation quantizer', normalize=snake_name)


#: class decorator: ``@register_activation('my_sign')`` makes ``activation: my_sign`` usable everywhere
register_activation = class_registrar(ACTIVATIONS)


class ActivationQuantizer(Quantizer):
    """Maps activations ``x`` to a low-precision set (``forward(x)``)."""


class _SignSTE(torch.autograd.Function):
    """sign(x) forward; clipped straight-through gradient (passes where |x| < 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1).to(grad.dtype)


@register_activation('ste_sign')
class SteSign(ActivationQuantizer):
    r"""Forward :math:`\mathrm{sign}(x)` (``sign(0) = 0`` as in the official code); backward
    :math:`g\,1_{|x|<1}` (the hardtanh straight-through estimator)."""

    precision = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


@register_activation('identity')
class IdentityQuantizer(ActivationQuantizer):
    """Full-precision pass-through."""

    precision = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
