"""The seven BNAS candidate operations, in one table.

Column order matters: it is the order of the architecture weights (alpha) in the official code, so
``PRIMITIVES.index(name)`` is the alpha column of ``name``.

Every binary op is BN -> sign -> binary conv -> ReLU (the XNOR-Net "BinConv2d" order, no BN after
the conv, so op outputs are >= 0). Search-time variants have non-affine BN and a non-affine BN after
each pool; final variants have affine BN and bare pools.

Op sets (:data:`OP_SETS`) name the binary block's parts; keys given explicitly win over the set's:

=========  ======================================================================================
``paper``  BN -> ``ste_sign`` -> ``xnor`` conv -> ReLU (:class:`BNConvReLU`, the official ops)
``react``  BN -> ``rsign`` -> ``scaled_sign`` conv -> ``rprelu`` (:class:`ReActConv`), optionally with
           ReActNet's real-valued shortcut around the conv (``shortcut: true``) where shapes allow
=========  ======================================================================================
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError
from .quant import BinaryConv2d, QuantizerSpec, make_activation, make_nonlinearity
from .quant.base import snake_name
from .registry import Registry

__all__ = ['OPS', 'PRIMITIVES', 'OP_ALIASES', 'OP_SETS', 'Zeroise', 'BNConvReLU', 'ReActConv', 'binary_block',
           'make_op', 'canonical_op', 'check_ops', 'expand_op_set']


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


class _QuantizedConvBlock(nn.Module):
    """BN -> activation quantizer -> conv -> nonlinearity, the parts every binary op is made of.

    Built in that order (``bn``, ``quantizer``, ``op.0`` the conv, ``op.1`` the nonlinearity) so the
    random initialisation and the state-dict layout are the official ones.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool, binarizer: QuantizerSpec, activation: QuantizerSpec,
                 nonlinearity: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C_in, affine=affine)
        self.quantizer = make_activation(activation, channels=C_in)
        self.op = nn.Sequential(
            BinaryConv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False,
                         binarizer=binarizer),
            nonlinearity(),
        )

    @property
    def activation(self) -> str:
        """The name of the input quantizer (``ste_sign``, ``identity``, ``rsign`` ...)."""
        return self.quantizer.name


class BNConvReLU(_QuantizedConvBlock):
    """BN -> activation quantizer -> conv -> ReLU.

    With ``activation='ste_sign'`` and a binarizer this is the official ``BinReLUConvBN``/``BinDilConv``;
    with ``activation='identity'`` and ``binarizer=None`` it is the official full-precision
    ``ReLUConvBN`` (stem and search-time preprocessing). Attribute names (``bn``, ``op.0``) follow the
    official state-dict layout.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1,
                 affine: bool = True, *, binarizer: QuantizerSpec = 'xnor',
                 activation: QuantizerSpec = 'ste_sign') -> None:
        super().__init__(C_in, C_out, kernel_size, stride, padding, dilation, affine, binarizer, activation,
                         lambda: nn.ReLU(inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.quantizer(self.bn(x)))


class ReActConv(_QuantizedConvBlock):
    """BN -> activation quantizer -> binary conv [+ real-valued shortcut of the input] -> nonlinearity.

    The ReActNet block in the BNAS order (BN before the sign, no BN after the conv): with the ``react``
    op set, ``rsign`` -> ``scaled_sign`` conv -> ``rprelu``. The shortcut (``shortcut=True``) adds the
    block's real-valued input to the conv output before the nonlinearity, as ReActNet does around each
    binary conv, where the shapes allow it: the identity for stride 1, a 2x2 average pool for stride 2,
    none when the channel counts differ. Attribute names follow :class:`BNConvReLU` so tools that look
    for ``op.0`` work.
    """

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1,
                 affine: bool = True, *, binarizer: QuantizerSpec = 'scaled_sign', activation: QuantizerSpec = 'rsign',
                 nonlinearity: QuantizerSpec = 'rprelu', shortcut: bool = False) -> None:
        super().__init__(C_in, C_out, kernel_size, stride, padding, dilation, affine, binarizer, activation,
                         lambda: make_nonlinearity(nonlinearity, channels=C_out))
        self.shortcut: Optional[nn.Module] = None
        if shortcut and C_in == C_out:
            self.shortcut = nn.Identity() if stride == 1 else \
                nn.AvgPool2d(stride, stride=stride, ceil_mode=True, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op[0](self.quantizer(self.bn(x)))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return self.op[1](y)

    @property
    def nonlinearity(self) -> str:
        return self.op[1].name


def _is_relu(spec: QuantizerSpec) -> bool:
    return spec is None or (isinstance(spec, str) and snake_name(spec) == 'relu')


def binary_block(C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int = 1,
                 affine: bool = True, *, binarizer: QuantizerSpec = 'xnor', activation: QuantizerSpec = 'ste_sign',
                 nonlinearity: QuantizerSpec = 'relu', shortcut: bool = False) -> nn.Module:
    """A binary op's block: the official :class:`BNConvReLU` for ReLU without shortcut (same modules and
    state dict as before), else a :class:`ReActConv`."""
    if _is_relu(nonlinearity) and not shortcut:
        return BNConvReLU(C_in, C_out, kernel_size, stride, padding, dilation, affine, binarizer=binarizer,
                          activation=activation)
    return ReActConv(C_in, C_out, kernel_size, stride, padding, dilation, affine, binarizer=binarizer,
                     activation=activation, nonlinearity=nonlinearity, shortcut=bool(shortcut))


OpFactory = Callable[..., nn.Module]

#: name -> factory(C, stride, affine, binarizer=..., activation=..., nonlinearity=..., shortcut=...)
OPS: Dict[str, OpFactory] = {
    'zeroise': lambda C, stride, affine, **q: Zeroise(stride),
    'max_pool_3x3': lambda C, stride, affine, **q: nn.MaxPool2d(3, stride=stride, padding=1),
    'avg_pool_3x3': lambda C, stride, affine, **q: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    'bin_dil_conv_3x3': lambda C, stride, affine, **q: binary_block(C, C, 3, stride, 2, 2, affine, **q),
    'bin_dil_conv_5x5': lambda C, stride, affine, **q: binary_block(C, C, 5, stride, 4, 2, affine, **q),
    'bin_conv_3x3': lambda C, stride, affine, **q: binary_block(C, C, 3, stride, 1, 1, affine, **q),
    'bin_conv_5x5': lambda C, stride, affine, **q: binary_block(C, C, 5, stride, 2, 1, affine, **q),
}

#: op set name -> the block parts it stands for (see the module docstring)
OP_SETS: Registry = Registry('op set')
OP_SETS.register('paper', {'binarizer': 'xnor', 'activation': 'ste_sign', 'nonlinearity': 'relu', 'shortcut': False})
OP_SETS.register('react', {'binarizer': 'scaled_sign', 'activation': 'rsign', 'nonlinearity': 'rprelu',
                           'shortcut': False})


def expand_op_set(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``cfg`` without ``op_set``, its block keys that are unset (None) filled from the named op set."""
    out = dict(cfg)
    name = out.pop('op_set', None)
    if name is not None:
        for key, value in OP_SETS.get(str(name)).items():
            if out.get(key) is None:
                out[key] = value
    return out

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
            activation: QuantizerSpec = 'ste_sign', nonlinearity: QuantizerSpec = 'relu',
            shortcut: bool = False) -> nn.Module:
    """Build one candidate op: the search variant (non-affine BN, BN after pools) or the final one."""
    name = canonical_op(name)
    op = OPS[name](C, stride, not search, binarizer=binarizer, activation=activation, nonlinearity=nonlinearity,
                   shortcut=shortcut)
    if search and 'pool' in name:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    return op
