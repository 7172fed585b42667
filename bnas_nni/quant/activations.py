r"""Activation quantizers: what a binary op applies to its (batch-normalised) input.

``ste_sign`` is the official BNAS ``BinActive``: forward :math:`\mathrm{sign}(x)` with
``sign(0) = 0``, backward the clipped straight-through estimator :math:`g\,1_{|x|<1}`. ``identity``
keeps activations in full precision (the stem, search-time preprocessing, ablations).

The ReActNet family (Liu et al., ECCV 2020; Bi-Real Net, ECCV 2018):

* ``approx_sign``: forward :math:`\mathrm{sign}(x)`, backward the piecewise-polynomial ApproxSign
  derivative of Bi-Real Net, :math:`2 + 2x` on :math:`[-1, 0)`, :math:`2 - 2x` on :math:`[0, 1)`, 0 elsewhere
  (the derivative of the quadratic spline that approximates sign);
* ``rsign``: ReActNet's RSign, :math:`\mathrm{sign}(x_c - \beta_c)` with a learnable threshold per
  channel (``init`` 0), the ApproxSign gradient w.r.t. :math:`x - \beta`; so
  :math:`\partial L/\partial\beta_c = -\sum_{b,h,w} g\,\mathrm{approx}'(x - \beta_c)`. Stateful: the
  fast search cell runs it per op, never shared.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry
from .base import Quantizer, class_registrar, snake_name

__all__ = ['ACTIVATIONS', 'ActivationQuantizer', 'SteSign', 'IdentityQuantizer', 'ApproxSign', 'RSign',
           'register_activation', 'approx_sign_grad', 'channel_view']

#: name -> activation quantizer class
ACTIVATIONS: Registry = Registry('activation quantizer', normalize=snake_name)


#: class decorator: ``@register_activation('my_sign')`` makes ``activation: my_sign`` usable everywhere
register_activation = class_registrar(ACTIVATIONS)


class ActivationQuantizer(Quantizer):
    """Maps activations ``x`` to a low-precision set (``forward(x)``)."""


def ste_grad(x: torch.Tensor) -> torch.Tensor:
    r"""The clipped straight-through derivative of sign: :math:`1_{|x|<1}`."""
    return (x.abs() < 1).to(x.dtype)


class _SignFn(torch.autograd.Function):
    """sign(x) forward; ``surrogate(x)`` times the incoming gradient backward (keeps only ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * ctx.surrogate(x).to(grad.dtype), None


@register_activation('ste_sign')
class SteSign(ActivationQuantizer):
    r"""Forward :math:`\mathrm{sign}(x)` (``sign(0) = 0`` as in the official code); backward
    :math:`g\,1_{|x|<1}` (the hardtanh straight-through estimator)."""

    precision = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignFn.apply(x, ste_grad)


@register_activation('identity')
class IdentityQuantizer(ActivationQuantizer):
    """Full-precision pass-through."""

    precision = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    r"""Bi-Real Net's ApproxSign derivative: :math:`2 + 2x` on [-1, 0), :math:`2 - 2x` on [0, 1), 0 elsewhere."""
    return (2.0 - 2.0 * x.abs()).clamp_min(0.0)     # both pieces are 2 - 2|x|, which is <= 0 outside (-1, 1)


@register_activation('approx_sign')
class ApproxSign(ActivationQuantizer):
    r"""Forward :math:`\mathrm{sign}(x)` (``sign(0) = 0``); backward Bi-Real's ApproxSign derivative
    :math:`2 - 2|x|` for :math:`|x| < 1`, else 0."""

    precision = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignFn.apply(x, approx_sign_grad)


def channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``v`` shaped to broadcast over ``x`` (channels at dim 1: NC, NCHW, ...)."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


@register_activation('rsign')
class RSign(ActivationQuantizer):
    r"""ReActNet's RSign: :math:`\mathrm{sign}(x_c - \beta_c)`, :math:`\beta` learnable per channel
    (``init``: its initial value), ApproxSign gradient (see the module docstring)."""

    precision = 1
    stateless = False
    option_names = ('init',)

    def __init__(self, channels=None, init: float = 0.0) -> None:
        super().__init__(channels)
        if channels is None or int(channels) < 1:
            raise ConfigError('rsign needs the number of channels of the layer it quantizes')
        self.init = float(init)
        self.beta = nn.Parameter(torch.full((int(channels),), self.init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignFn.apply(x - channel_view(self.beta, x).to(x.dtype), approx_sign_grad)
