r"""Nonlinearities after a binary conv: ``relu`` (BNAS), ``prelu``, ``rprelu`` (ReActNet), ``identity``.

They are not quantizers (their output is real-valued, ``precision = 32``), but they are chosen the same
way: by name, ``{name: ..., option: ...}``, class or instance (:func:`make_nonlinearity`), each layer owning
its own module, so a learnable one keeps its parameters per op and in the state dict.

``rprelu`` is ReActNet's RPReLU, :math:`\mathrm{PReLU}_c(x_c - \gamma_c) + \zeta_c`, with a learnable
shift before (:math:`\gamma`, init 0), a learnable PReLU slope per channel (``init`` 0.25, as
``nn.PReLU``) and a learnable shift after (:math:`\zeta`, init 0). Plain autograd, so its gradients are
exact: :math:`\partial y/\partial x = 1_{x>\gamma} + a\,1_{x\le\gamma}`, :math:`\partial y/\partial\gamma =
-\partial y/\partial x`, :math:`\partial y/\partial\zeta = 1`,
:math:`\partial y/\partial a = (x-\gamma)\,1_{x\le\gamma}`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import Registry
from .activations import channel_view
from .base import Quantizer, QuantizerSpec, class_registrar, make_quantizer, snake_name

__all__ = ['NONLINEARITIES', 'Nonlinearity', 'ReLU', 'PReLU', 'RPReLU', 'IdentityNonlinearity',
           'register_nonlinearity', 'make_nonlinearity']

#: name -> nonlinearity class
NONLINEARITIES: Registry = Registry('nonlinearity', normalize=snake_name)

#: class decorator: ``@register_nonlinearity('my_act')`` makes ``nonlinearity: my_act`` usable everywhere
register_nonlinearity = class_registrar(NONLINEARITIES)


class Nonlinearity(Quantizer):
    """A real-valued elementwise function after a binary conv (``forward(x)``)."""

    precision = 32


def _channels(channels, name: str) -> int:
    if channels is None or int(channels) < 1:
        raise ConfigError(f'{name} needs the number of channels of the layer it follows')
    return int(channels)


@register_nonlinearity('relu')
class ReLU(Nonlinearity):
    """:math:`\\max(x, 0)`, the BNAS ops' nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


@register_nonlinearity('identity')
class IdentityNonlinearity(Nonlinearity):
    """No nonlinearity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_nonlinearity('prelu')
class PReLU(Nonlinearity):
    """PReLU with one learnable slope per channel (``init`` 0.25)."""

    stateless = False
    option_names = ('init',)

    def __init__(self, channels=None, init: float = 0.25) -> None:
        super().__init__(channels)
        self.init = float(init)
        self.slope = nn.Parameter(torch.full((_channels(channels, 'prelu'),), self.init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.slope.to(x.dtype))


@register_nonlinearity('rprelu')
class RPReLU(Nonlinearity):
    """ReActNet's RPReLU (see the module docstring): parameters ``gamma``, ``slope``, ``zeta`` per channel."""

    stateless = False
    option_names = ('init',)

    def __init__(self, channels=None, init: float = 0.25) -> None:
        super().__init__(channels)
        c = _channels(channels, 'rprelu')
        self.init = float(init)
        self.gamma = nn.Parameter(torch.zeros(c))
        self.slope = nn.Parameter(torch.full((c,), self.init))
        self.zeta = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x - channel_view(self.gamma, x).to(x.dtype)
        return F.prelu(shifted, self.slope.to(x.dtype)) + channel_view(self.zeta, x).to(x.dtype)


def make_nonlinearity(spec: QuantizerSpec, channels=None, where: str = 'nonlinearity') -> Nonlinearity:
    """A nonlinearity module for a layer with ``channels`` output channels (``None``/``'none'``: identity)."""
    module = make_quantizer(spec, NONLINEARITIES, channels=channels, where=where)
    return module if module is not None else IdentityNonlinearity(channels)
