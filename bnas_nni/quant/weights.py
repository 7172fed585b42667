r"""Weight binarizers: what a binary conv does to its latent real weights.

The default, ``xnor``, reproduces the official BNAS ``BinOp`` exactly, but as an autograd function
instead of swapping ``.data`` in and out around each step:

* latent step (persistent, applied to the latent weights before every optimizer step):
  :math:`W \leftarrow \mathrm{clip}(W - \bar W_{\text{in}}, -1, 1)` where :math:`\bar W_{\text{in}}`
  is the mean over input channels;
* forward: :math:`W_b = \mathrm{sign}(W)\,\alpha_o`, :math:`\alpha_o = \lVert W_o\rVert_1 / n`,
  :math:`n = C_{in} k_h k_w`;
* backward, with :math:`g` the gradient w.r.t. :math:`W_b`:
  :math:`g_W = \bigl(\alpha_o 1_{|W|\le 1}\, g + \mathrm{sign}(W)\,\overline{\mathrm{sign}(W) g}_o\bigr)
  (1 - 1/C_{in})\, n`.

The forward and backward use the constrained weights :math:`C(W)`, and the optimizer pre-step hook
(:func:`bnas_nni.quant.attach_latent_constraint`) writes :math:`C(W)` back into the latent weights,
which is the same sequence of values the official code produces (constrain, forward/backward, step).

``scaled_sign`` is the ReActNet / Bi-Real weight binarizer: the same :math:`\mathrm{sign}(W)\,\alpha_o`
forward, but on the latent weights as they are (no mean-centring, no persistent clamp), with
:math:`\alpha_o` treated as a constant in backward and the clipped straight-through gradient
:math:`g_W = g\,1_{|W|\le 1}`.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import Registry
from .base import Quantizer, class_registrar, snake_name

__all__ = ['WEIGHT_BINARIZERS', 'WeightBinarizer', 'XnorBinarizer', 'SignBinarizer', 'ScaledSignBinarizer',
           'register_binarizer', 'xnor_constrain']

#: name -> weight binarizer class
WEIGHT_BINARIZERS: Registry = Registry('weight binarizer', normalize=snake_name)


#: class decorator: ``@register_binarizer('my_bin')`` makes ``binarizer: my_bin`` usable everywhere
register_binarizer = class_registrar(WEIGHT_BINARIZERS)


class WeightBinarizer(Quantizer):
    """Turns latent real weights into binary ones.

    ``forward(w)`` (= :meth:`binarize`) is differentiable w.r.t. the latent weights; :meth:`constrain`
    is the persistent latent step applied before each optimizer step (identity by default).

    Class attributes: ``per_filter`` (the result for one output filter depends only on that filter,
    so binarizing concatenated weights equals concatenating binarized ones), ``scaled`` (the signs
    are multiplied by one fp32 scale per output filter, which a packed model must store) and
    ``exact_ternary_signs`` (below).
    """

    precision = 1
    per_filter: ClassVar[bool] = True
    scaled: ClassVar[bool] = False
    #: A promise about ``forward(w)``: for every output filter ``o`` it is exactly ``alpha_o * s_o``, with
    #: ``s_o`` in {-1, 0, +1} elementwise and one finite scale ``alpha_o >= 0``, bit for bit, for any
    #: finite ``w``. An int8 convolution of the signs times ``alpha_o`` then reproduces the fp32 convolution with
    #: it, and the fast search cell (:mod:`bnas_nni.search.fast_cell`) takes its int8 path for this
    #: binarizer without checking the binarized weight; for a ``stateless`` binarizer it also reuses the
    #: packed int8 weights while the latent weights are unchanged. False (the default): each binarized
    #: weight is checked, and convolved in fp32 unless it passes. A subclass that changes ``forward``
    #: states it again.
    exact_ternary_signs: ClassVar[bool] = False

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def constrain_(self, w: torch.Tensor) -> None:
        w.copy_(self.constrain(w))

    def binarize(self, w: torch.Tensor) -> torch.Tensor:
        return self(w)


def xnor_constrain(w: torch.Tensor) -> torch.Tensor:
    """The official latent step: mean-centre over input channels, clamp to [-1, 1]."""
    return (w - w.mean(dim=1, keepdim=True)).clamp(-1.0, 1.0)


class _XnorWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        wc = xnor_constrain(w)
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

    scaled = True
    exact_ternary_signs = True

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return xnor_constrain(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
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

    exact_ternary_signs = True

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        return w.clamp(-1.0, 1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _SignWeight.apply(w)


class _ScaledSignWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        return torch.sign(w) * alpha

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1.0).to(g.dtype)


@register_binarizer('scaled_sign')
class ScaledSignBinarizer(WeightBinarizer):
    r""":math:`\mathrm{sign}(W)\cdot\mathrm{mean}|W|` per output filter without latent mean-centring;
    clipped straight-through gradient :math:`g\,1_{|W|\le 1}` (ReActNet, Bi-Real Net)."""

    scaled = True
    exact_ternary_signs = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _ScaledSignWeight.apply(w)
