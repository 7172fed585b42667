r"""Binary primitives: activation quantizers, weight binarizers and the binary convolution.

Quantizers are looked up by name (larq style) so that other schemes can be registered without
touching the ops; each one knows its ``precision`` in bits, which :mod:`bnas_nni.summary` uses to
count binary and full-precision work.

The default weight binarizer, ``xnor``, reproduces the official BNAS ``BinOp`` exactly, but as an
autograd function instead of swapping ``.data`` in and out around each step:

* latent step (persistent, applied to the latent weights before every optimizer step):
  :math:`W \leftarrow \mathrm{clip}(W - \bar W_{\text{in}}, -1, 1)` where :math:`\bar W_{\text{in}}`
  is the mean over input channels;
* forward: :math:`W_b = \mathrm{sign}(W)\,\alpha_o`, :math:`\alpha_o = \lVert W_o\rVert_1 / n`,
  :math:`n = C_{in} k_h k_w`;
* backward, with :math:`g` the gradient w.r.t. :math:`W_b`:
  :math:`g_W = \bigl(\alpha_o 1_{|W|\le 1}\, g + \mathrm{sign}(W)\,\overline{\mathrm{sign}(W) g}_o\bigr)
  (1 - 1/C_{in})\, n`.

The forward and backward use the constrained weights :math:`C(W)` and the optimizer pre-step hook
installed by :func:`attach_latent_constraint` writes :math:`C(W)` back into the latent weights, which
is the same sequence of values the official code produces (constrain, forward/backward, step).
"""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch
import torch.nn as nn

from .errors import ConfigError

__all__ = [
    'ActivationQuantizer', 'WeightBinarizer', 'register_activation', 'register_binarizer',
    'get_activation', 'get_binarizer', 'ACTIVATIONS', 'BINARIZERS', 'BinaryConv2d',
    'constrain_latent_weights_', 'attach_latent_constraint', 'binary_convs',
]


# --------------------------------------------------------------------------- activations


class ActivationQuantizer:
    """Maps activations to a low-precision set; ``precision`` is the bit width of its output."""

    name: str = ''
    precision: int = 32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


ACTIVATIONS: Dict[str, ActivationQuantizer] = {}


def register_activation(name: str) -> Callable[[Type[ActivationQuantizer]], Type[ActivationQuantizer]]:
    def deco(cls: Type[ActivationQuantizer]) -> Type[ActivationQuantizer]:
        inst = cls()
        inst.name = name
        ACTIVATIONS[name] = inst
        return cls
    return deco


def get_activation(name: str) -> ActivationQuantizer:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f'unknown activation quantizer {name!r}; choose one of {sorted(ACTIVATIONS)}') from None


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


@register_activation('identity')
class IdentityActivation(ActivationQuantizer):
    """Full-precision pass-through, for ablations."""

    precision = 32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------- weights


class WeightBinarizer:
    """Turns latent real weights into binary ones.

    ``binarize`` is differentiable w.r.t. the latent weights; ``constrain_`` is the persistent latent
    step applied before each optimizer step (identity by default).
    """

    name: str = ''
    precision: int = 1

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def constrain_(self, w: torch.Tensor) -> None:
        w.copy_(self.constrain(w))

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


BINARIZERS: Dict[str, WeightBinarizer] = {}


def register_binarizer(name: str) -> Callable[[Type[WeightBinarizer]], Type[WeightBinarizer]]:
    def deco(cls: Type[WeightBinarizer]) -> Type[WeightBinarizer]:
        inst = cls()
        inst.name = name
        BINARIZERS[name] = inst
        return cls
    return deco


def get_binarizer(name: str) -> WeightBinarizer:
    try:
        return BINARIZERS[name]
    except KeyError:
        raise ConfigError(f'unknown weight binarizer {name!r}; choose one of {sorted(BINARIZERS)}') from None


def _xnor_constrain(w: torch.Tensor) -> torch.Tensor:
    return (w - w.mean(dim=1, keepdim=True)).clamp(-1.0, 1.0)


class _XnorWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        wc = _xnor_constrain(w)
        n = wc[0].numel()
        alpha = wc.abs().sum(dim=(1, 2, 3), keepdim=True) / n
        ctx.save_for_backward(wc, alpha)
        return torch.sign(wc) * alpha

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        wc, alpha = ctx.saved_tensors
        n = wc[0].numel()
        c_in = wc.shape[1]
        sign = torch.sign(wc)
        inside = (wc.abs() <= 1.0).to(g.dtype)
        mean_sg = (sign * g).sum(dim=(1, 2, 3), keepdim=True) / n
        return (alpha * inside * g + sign * mean_sg) * ((1.0 - 1.0 / c_in) * n)


@register_binarizer('xnor')
class XnorBinarizer(WeightBinarizer):
    """The official BNAS/XNOR-Net scheme (see the module docstring for the formulas)."""

    precision = 1

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return _xnor_constrain(w)

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        return _XnorWeight.apply(w)


class _SignWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sign(w)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


@register_binarizer('sign')
class SignBinarizer(WeightBinarizer):
    r"""Plain :math:`\mathrm{sign}(W)` without scaling, identity straight-through gradient; latent
    weights clipped to [-1, 1] (BinaryConnect)."""

    precision = 1

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return w.clamp(-1.0, 1.0)

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        return _SignWeight.apply(w)


# --------------------------------------------------------------------------- binary conv


class BinaryConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weights go through a named binarizer when ``binarizer`` is set.

    Setting ``binarizer = None`` keeps the layer full precision (the stem, residual convs and the
    quirks of the official precision rules); the module and its state dict stay the same.
    """

    def __init__(self, *args, binarizer: str | None = 'xnor', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if binarizer is not None:
            get_binarizer(binarizer)
        self.binarizer = binarizer

    def effective_weight(self) -> torch.Tensor:
        if self.binarizer is None:
            return self.weight
        return get_binarizer(self.binarizer).binarize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', binarizer={self.binarizer}'


def binary_convs(model: nn.Module):
    """The convs of ``model`` whose weights are binarized, in registration order."""
    return [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.binarizer is not None]


@torch.no_grad()
def constrain_latent_weights_(model: nn.Module) -> int:
    """Apply each binarizer's persistent latent step to ``model``; returns how many convs it touched."""
    convs = binary_convs(model)
    for m in convs:
        get_binarizer(m.binarizer).constrain_(m.weight)
    return len(convs)


def attach_latent_constraint(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`constrain_latent_weights_` before every ``optimizer.step()``.

    Only convs whose weights this optimizer updates are touched. Returns the hook handle.
    """
    owned = {id(p) for group in optimizer.param_groups for p in group['params']}

    def hook(opt, args, kwargs):
        with torch.no_grad():
            for m in binary_convs(model):
                if id(m.weight) in owned:
                    get_binarizer(m.binarizer).constrain_(m.weight)

    return optimizer.register_step_pre_hook(hook)
