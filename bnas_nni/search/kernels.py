"""Exact low-level kernels for the fast search cell: the ternary convolution.

The binary ops of the search cell convolve a *sign* (values -1, 0, 1) with binarized weights
``sign(W) * a_o`` (one scale per output filter, XNOR style). That convolution is an integer sum times
``a_o``: ``conv(s, W_b)[o] = a_o * sum(s * sign(W)[o])``, with ``|sum| <= C_in k_h k_w``. oneDNN
computes it exactly with its int8 kernels (uint8 x int8 -> int32, VNNI where the CPU has it), about 3x
faster than the fp32 convolution on CPU; the scale is applied once to the exact integer sum, so the
result differs from the fp32 convolution only by the latter's summation round-off.

* :func:`ternary_conv_supported` -- whether this build and CPU run it (an exactness probe, once);
* :func:`ternary_weight` -- ``(sign(W) as int8, a)`` when a weight tensor is exactly ``sign * a_o`` per
  filter (checked, never assumed), else ``None``;
* :class:`TernaryConv` -- the packed weights of one convolution and the call itself.

``BNAS_FAST_KERNELS=0`` in the environment turns these off (the cell then runs fp32 convolutions only).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['fast_kernels_enabled', 'ternary_conv_supported', 'ternary_weight', 'TernaryConv', 'sign_to_uint8']

_ENV = 'BNAS_FAST_KERNELS'
_probe_result: Optional[bool] = None


def fast_kernels_enabled() -> bool:
    """False when ``BNAS_FAST_KERNELS`` is ``0``/``false``/``off`` (force the plain fp32 path)."""
    return os.environ.get(_ENV, '1').strip().lower() not in ('0', 'false', 'off', 'no')


def _onednn_ops_present() -> bool:
    onednn = getattr(torch.ops, 'onednn', None)
    try:
        return onednn is not None and hasattr(onednn, 'qconv_prepack') and hasattr(onednn, 'qconv2d_pointwise') \
            and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def ternary_conv_supported() -> bool:
    """Whether the int8 ternary convolution runs here and is exact (probed once per process).

    The probe convolves random signs with random signed weights (strided, dilated, padded, every output
    sign) and requires the result to equal the fp32 convolution exactly; the integers involved are small
    enough that fp32 represents every partial sum, so any difference means a broken kernel."""
    global _probe_result
    if not fast_kernels_enabled():
        return False
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result


def _probe() -> bool:
    if not _onednn_ops_present():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        for (k, s, p, d) in ((3, 1, 1, 1), (5, 2, 4, 2)):
            x = torch.randint(-1, 2, (3, 8, 9, 9), generator=g).float()
            w = torch.randint(-1, 2, (12, 8, k, k), generator=g).float()
            conv = TernaryConv(w.to(torch.int8), (s, s), (p, p), (d, d), 1)
            got = conv(sign_to_uint8(x), relu=False)
            want = F.conv2d(x, w, None, s, p, d)
            if got.shape != want.shape or not torch.equal(got, want):
                return False
            if not torch.equal(conv(sign_to_uint8(x), relu=True), want.clamp_min(0)):
                return False
        return True
    except (RuntimeError, TypeError, AttributeError):
        return False


def sign_to_uint8(s: torch.Tensor) -> torch.Tensor:
    """A sign tensor (values -1, 0, 1, any float dtype) as the uint8 ``s + 1`` (zero point 1), channels-last."""
    return (s + 1).to(torch.uint8).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def ternary_weight(w: torch.Tensor, trusted: bool = False) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(sign(w) as int8, per-filter scale a)`` if ``w == sign(w) * a`` exactly, with ``a_o = max|w_o|``;
    ``None`` otherwise (a weight that is not binarized per filter, or not finite). ``trusted``: ``w`` is
    such a weight by construction (the xnor and sign binarizers), skip the check."""
    if w.dim() != 4 or not w.is_floating_point():
        return None
    scale = w.abs().amax(dim=(1, 2, 3))
    q = torch.sign(w)
    if not trusted and (not torch.equal(q * scale.view(-1, 1, 1, 1), w) or not bool(torch.isfinite(scale).all())):
        return None
    return q.to(torch.int8), scale


class TernaryConv:
    """A convolution of a uint8 ``s + 1`` input (``s`` a sign) with int8 weights ``q`` (values -1, 0, 1),
    giving the exact integer sums ``sum(s * q_o)`` as fp32 (optionally ReLU'd), channels-last. Per-filter
    scales are applied by the caller (one multiply, together with whatever else scales the output)."""

    _ONE = torch.ones(1)
    _ZERO = torch.zeros(1, dtype=torch.int64)

    def __init__(self, q: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int) -> None:
        self.stride: List[int] = list(stride)
        self.padding: List[int] = list(padding)
        self.dilation: List[int] = list(dilation)
        self.groups = int(groups)
        # per-tensor weight scale 1 and input scale 1 (zero point 1): the kernel's output is the integer sum
        self.packed = torch.ops.onednn.qconv_prepack(q, self._ONE, 1.0, 1, self.stride, self.padding,
                                                     self.dilation, self.groups, None)

    def __call__(self, s_u8: torch.Tensor, relu: bool) -> torch.Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            s_u8, 1.0, 1, self.packed, self._ONE, self._ZERO, None, self.stride, self.padding,
            self.dilation, self.groups, 1.0, 0, torch.float32, 'relu' if relu else 'none', [], '')
