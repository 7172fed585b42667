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

Fused elementwise passes (float32 on CPU; :func:`fused_ops`): a small C++ extension (``csrc/fused_ops.cpp``,
compiled once per machine, ~25 s) does in one pass over memory what the cell otherwise does with several
torch ops: :func:`relu_backward` (a conv's ReLU backward and the per-channel dot products of the
architecture gradient), :func:`weighted_sum`, :func:`sign_and_mask`, :func:`through_mask`,
:func:`add_blocks_`, :func:`pool_backward`. Each falls back to the torch ops it replaces for other dtypes,
devices and layouts, or when the extension cannot be built (a one-line warning, once). Selections and masks
are bit-identical either way; sums and dot products are the same terms added in another order (dot
products in double precision).

``BNAS_FAST_KERNELS=0`` in the environment turns all of these off (the cell then runs fp32 convolutions and
torch ops only); ``BNAS_FUSED_OPS=0`` turns off only the fused elementwise passes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...extensions import ExtensionBuildError, load_extension

__all__ = ['fast_kernels_enabled', 'ternary_conv_supported', 'ternary_weight', 'TernaryConv', 'sign_to_uint8',
           'fused_ops', 'fusable', 'relu_backward', 'weighted_sum', 'sign_and_mask', 'through_mask', 'add_blocks_',
           'pool_backward', 'profiler_scope']

_ENV = 'BNAS_FAST_KERNELS'
_FUSED_ENV = 'BNAS_FUSED_OPS'
_FUSED_NAME = 'bnas_nni_search_fused'
_log = logging.getLogger(__name__)
_probe_result: Optional[bool] = None


def _env_off(name: str) -> bool:
    return os.environ.get(name, '1').strip().lower() in ('0', 'false', 'off', 'no')


def fast_kernels_enabled() -> bool:
    """False when ``BNAS_FAST_KERNELS`` is ``0``/``false``/``off`` (force the plain fp32 path)."""
    return not _env_off(_ENV)


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
    such a weight by declaration (its binarizer's ``exact_ternary_signs``), skip the check."""
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


# ------------------------------------------------------------------ fused elementwise passes


@functools.lru_cache(maxsize=None)
def _fused_module():
    src = Path(__file__).resolve().parent / 'csrc'
    try:
        # -fopenmp: at::parallel_for runs in torch's OpenMP pool; -ffp-contract=off: a * b + c rounds twice, as in
        # torch's own elementwise kernels
        return load_extension(_FUSED_NAME, [src / 'fused_ops.cpp'], extra_cflags=['-fopenmp', '-ffp-contract=off'],
                              extra_ldflags=['-fopenmp'], what='the fused search ops')
    except ExtensionBuildError as exc:
        _log.warning('fused search ops unavailable (%s); the search runs the equivalent torch ops (slower). '
                     'Install g++ and ninja to use them, or set %s=0 to silence this.', exc, _FUSED_ENV)
        return None


def profiler_scope(name: str):
    """A named torch.profiler range while a profiler runs (``bench/search_step.py --profile`` attributes the
    time inside to its category: ``bnas::input_grad``, ``bnas::weight_grad``, ``bnas::recompute``,
    ``bnas::fused``), else nothing."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def fused_ops():
    """The compiled fused-ops module, or None (turned off, or it cannot be built here)."""
    if not fast_kernels_enabled() or _env_off(_FUSED_ENV):
        return None
    return _fused_module()


def _rows(*ts: torch.Tensor) -> bool:
    """float32 CPU tensors laid out as rows of channels: 4-d channels-last contiguous."""
    return all(t.dtype == torch.float32 and t.device.type == 'cpu' and t.dim() == 4
               and t.is_contiguous(memory_format=torch.channels_last) for t in ts)


def relu_backward(g: torch.Tensor, z: torch.Tensor, want_dots: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """For ``z = ReLU(conv)`` kept from forward and the output gradient ``g``: the gradient through the ReLU
    (``g`` where ``z > 0``, else +0, as ``threshold_backward``) and, with ``want_dots``, the per-channel sums
    ``sum_{b,h,w} g * z`` (the raw material of the softmax-weight gradient; double precision when fused)."""
    ext = fused_ops() if _rows(g, z) else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            out = ext.relu_backward(g, z, want_dots)
        return out[0], (out[1] if want_dots else None)
    return torch.ops.aten.threshold_backward(g, z, 0), ((g * z).sum(dim=(0, 2, 3)) if want_dots else None)


def fusable(*ts: torch.Tensor) -> bool:
    """Whether the fused passes take these tensors (float32 CPU channels-last, extension available)."""
    return _rows(*ts) and fused_ops() is not None


def weighted_sum(zs: Sequence[torch.Tensor], ps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k zs[k] * ps[k]`` (``ps[k]``: one weight per channel), in list order, as a new tensor."""
    ext = fused_ops() if _rows(*zs) and all(p.dtype == torch.float32 for p in ps) else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            return ext.weighted_sum(list(zs), [p.contiguous() for p in ps])
    y = zs[0] * ps[0].view(1, -1, 1, 1)
    for z, p in zip(zs[1:], ps[1:]):
        y.addcmul_(z, p.view(1, -1, 1, 1))
    return y


def sign_and_mask(xhat: torch.Tensor, want_mask: bool
                  ) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """``(sign as float or None, sign + 1 as uint8 channels-last, |xhat| < 1 as uint8 or None)`` of a
    normalised state. The fused pass leaves ``xhat`` as it is and gives no float sign (``xhat.sign_()`` makes
    it if needed); the torch ops turn ``xhat`` into its sign in place."""
    ext = fused_ops() if _rows(xhat) else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            s_u8, mask = ext.sign_and_mask(xhat, want_mask)
        return None, s_u8, (mask if want_mask else None)
    mask = (xhat.abs() < 1).view(torch.uint8) if want_mask else None
    sign = xhat.sign_()
    return sign, sign_to_uint8(sign), mask


def through_mask(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``g`` where the (bool or uint8) ``mask`` is set, else +0: the backward of a ReLU or a clipped
    straight-through sign from its kept mask. The torch-ops path casts the mask to ``g``'s dtype first
    (PyTorch multiplies a float tensor by a byte tensor on a slow mixed-dtype path) and uses
    ``threshold_backward``, ReLU's own backward."""
    dense = g.is_contiguous() or (g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last))
    ext = fused_ops() if dense and g.dtype == torch.float32 and g.device.type == 'cpu' \
        and mask.dtype in (torch.uint8, torch.bool) and mask.shape == g.shape and mask.stride() == g.stride() else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            return ext.through_mask(g, mask)
    return torch.ops.aten.threshold_backward(g, mask.to(g.dtype), 0)


def add_blocks_(y: torch.Tensor, xh: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``y[:, e * C : (e + 1) * C] += xh * p[e]`` for each of the ``len(p)`` channel blocks of ``y``, in place."""
    ext = fused_ops() if _rows(y, xh) and p.dtype == torch.float32 else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            ext.add_blocks_(y, xh, p.contiguous())
    else:
        y.unflatten(1, (p.numel(), -1)).addcmul_(xh.unsqueeze(1), p.view(1, -1, 1, 1, 1))
    return y


def pool_backward(g: torch.Tensor, pooled: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, p: torch.Tensor,
                  want_gxh: bool, want_dots: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of :func:`add_blocks_` with ``xh = (pooled - mean) * invstd``: ``sum_e g_e * p[e]`` (the
    gradient w.r.t. ``xh``) and the ``len(p)`` sums ``sum g_e * xh`` (the gradients of ``p``)."""
    ext = fused_ops() if _rows(g, pooled) and all(t.dtype == torch.float32 for t in (mean, invstd, p)) else None
    if ext is not None:
        with profiler_scope('bnas::fused'):
            gxh, dots = ext.pool_backward(g, pooled, mean.contiguous(), invstd.contiguous(), p.contiguous(),
                                          want_gxh, want_dots)
        return (gxh if want_gxh else None), (dots if want_dots else None)
    gv = g.unflatten(1, (p.numel(), -1))  # [B, blocks, C, H, W]
    dots = gxh = None
    if want_dots:
        xh = (pooled - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        dots = torch.stack([(gv[:, e] * xh).sum() for e in range(p.numel())])
    if want_gxh:
        gxh = gv[:, 0] * p[0]
        for e in range(1, p.numel()):
            gxh.addcmul_(gv[:, e], p[e])
    return gxh, dots
