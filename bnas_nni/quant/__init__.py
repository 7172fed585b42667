"""Quantizers as modules (larq style): activation quantizers, weight binarizers, the binary conv.

* :mod:`.base` -- :class:`Quantizer` (``precision``, ``stateless``) and :func:`make_quantizer`, which
  accepts a name, ``{name: ..., option: ...}``, a class or an instance;
* :mod:`.activations` -- ``ste_sign`` (the official ``BinActive``), ``identity``, ``approx_sign`` (Bi-Real),
  ``rsign`` (ReActNet, learnable threshold);
* :mod:`.weights` -- ``xnor`` (the official ``BinOp``, exactly), ``sign``, ``scaled_sign`` (ReActNet: no centring);
* :mod:`.nonlinear` -- what follows a binary conv: ``relu``, ``prelu``, ``rprelu`` (ReActNet), ``identity``;
* :mod:`.conv` -- :class:`BinaryConv2d`, which owns its weight binarizer;
* :mod:`.constraint` -- the persistent latent-weight step and where it is attached.
"""
from __future__ import annotations

from .activations import (
    ACTIVATIONS,
    ActivationQuantizer,
    ApproxSign,
    IdentityQuantizer,
    RSign,
    SteSign,
    approx_sign_grad,
    register_activation,
)
from .base import Quantizer, QuantizerSpec, make_quantizer, quantizer_spec
from .constraint import attach_latent_constraint, binary_convs, constrain_latent_weights_, has_latent_constraint
from .conv import BinaryConv2d
from .nonlinear import NONLINEARITIES, Nonlinearity, PReLU, RPReLU, make_nonlinearity, register_nonlinearity
from .weights import (
    WEIGHT_BINARIZERS,
    ScaledSignBinarizer,
    SignBinarizer,
    WeightBinarizer,
    XnorBinarizer,
    register_binarizer,
    xnor_constrain,
)

__all__ = ['Quantizer', 'QuantizerSpec', 'make_quantizer', 'quantizer_spec', 'ACTIVATIONS', 'ActivationQuantizer',
           'SteSign', 'IdentityQuantizer', 'register_activation', 'WEIGHT_BINARIZERS', 'WeightBinarizer',
           'XnorBinarizer', 'SignBinarizer', 'register_binarizer', 'xnor_constrain', 'BinaryConv2d',
           'binary_convs', 'constrain_latent_weights_', 'attach_latent_constraint', 'has_latent_constraint',
           'make_activation', 'make_binarizer', 'ApproxSign', 'RSign', 'approx_sign_grad', 'ScaledSignBinarizer',
           'NONLINEARITIES', 'Nonlinearity', 'PReLU', 'RPReLU', 'make_nonlinearity', 'register_nonlinearity']


def make_activation(spec: QuantizerSpec, channels=None, where: str = 'activation'):
    """An activation quantizer module for a layer reading ``channels`` channels."""
    return make_quantizer(spec, ACTIVATIONS, channels=channels, where=where)


def make_binarizer(spec: QuantizerSpec, channels=None, where: str = 'binarizer'):
    """A weight binarizer module (``None`` for full precision)."""
    return make_quantizer(spec, WEIGHT_BINARIZERS, channels=channels, where=where)
