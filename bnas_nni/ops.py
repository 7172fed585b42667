"""The seven BNAS candidate operations, in one table.

Column order matters: it is the order of the architecture weights (alpha) in the official code, so
``PRIMITIVES.index(name)`` is the alpha column of ``name``.

Every binary op is BN -> sign -> binary conv -> ReLU (the XNOR-Net "BinConv2d" order, no BN after
the conv, so op outputs are >= 0). Search-time variants have non-affine BN and a non-affine BN after
each pool; final variants have affine BN and bare pools.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn

from .quant import BinaryConv2d, QuantizerSpec, make_activation
from .errors import ConfigError

__all__ = ['OPS', 'PRIMITIVES', 'OP_ALIASES', 'Zeroise', 'BNConvReLU', 'make_op', 'canonical_op', 'check_ops']


class Zeroise(nn.Module):
    """The BNAS ``Zeroise`` op: a zero tensor of the op's output shape (kept in derived cells)."""

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return x.new_zeros(x.shape)

    def extra_repr(self) -> str:
        return f'stride={self.stride}'


class BNConvReLU(nn.Module):
    """BN -> activation quantizer -> conv -> ReLU.

    With ``activation='ste_sign'`` and a binarizer this is the official ``BinReLUConvBN``/``BinDilConv``;
    with ``activation='identity'`` and ``binarizer=None`` it is the official full-precision
    ``ReLUConvBN`` (stem and search-time preprocessing). Attribute names (``bn``, ``op.0``) follow the
    official state-dict layout.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1,
                 affine: bool = True, *, binarizer: QuantizerSpec = 'xnor',
                 activation: QuantizerSpec = 'ste_sign') -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C_in, affine=affine)
        self.quantizer = make_activation(activation, channels=C_in)
        self.op = nn.Sequential(
            BinaryConv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False,
                         binarizer=binarizer),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.quantizer(self.bn(x)))

    @property
    def activation(self) -> str:
        """The name of the input quantizer (``ste_sign``, ``identity`` ...)."""
        return self.quantizer.name


OpFactory = Callable[..., nn.Module]

#: name -> factory(C, stride, affine, binarizer=..., activation=...)
OPS: Dict[str, OpFactory] = {
    'zeroise': lambda C, stride, affine, **q: Zeroise(stride),
    'max_pool_3x3': lambda C, stride, affine, **q: nn.MaxPool2d(3, stride=stride, padding=1),
    'avg_pool_3x3': lambda C, stride, affine, **q: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    'bin_dil_conv_3x3': lambda C, stride, affine, **q: BNConvReLU(C, C, 3, stride, 2, 2, affine, **q),
    'bin_dil_conv_5x5': lambda C, stride, affine, **q: BNConvReLU(C, C, 5, stride, 4, 2, affine, **q),
    'bin_conv_3x3': lambda C, stride, affine, **q: BNConvReLU(C, C, 3, stride, 1, 1, affine, **q),
    'bin_conv_5x5': lambda C, stride, affine, **q: BNConvReLU(C, C, 5, stride, 2, 1, affine, **q),
}

PRIMITIVES: tuple = tuple(OPS)

#: names used by the official code and other tools, mapped to ours
OP_ALIASES: Dict[str, str] = {'none': 'zeroise', 'zero': 'zeroise'}


def canonical_op(name: str, allowed: Sequence[str] = PRIMITIVES, where: str = '') -> str:
    """Resolve aliases; raise a one-line error naming the op and the allowed list."""
    name = OP_ALIASES.get(name, name)
    if name not in allowed:
        loc = f' in {where}' if where else ''
        raise ConfigError(f'unknown op {name!r}{loc}; allowed ops: {", ".join(allowed)}')
    return name


def check_ops(names: Sequence[str], where: str = '') -> tuple:
    return tuple(canonical_op(n, PRIMITIVES, where) for n in names)


def make_op(name: str, C: int, stride: int, *, search: bool = False, binarizer: QuantizerSpec = 'xnor',
            activation: QuantizerSpec = 'ste_sign') -> nn.Module:
    """Build one candidate op: the search variant (non-affine BN, BN after pools) or the final one."""
    name = canonical_op(name)
    op = OPS[name](C, stride, not search, binarizer=binarizer, activation=activation)
    if search and 'pool' in name:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    return op
