"""A faster, leaner drop-in for :class:`~bnas_nni.search.mixed_cell.BinaryMixedCell`.

:class:`FastBinaryMixedCell` computes the same function as ``BinaryMixedCell`` (same modules, parameters,
buffers and state dict, same alphas shared per label, same export) but organises a search cell's work
around its *states* instead of its edges:

* **One normalisation and one sign per state.** Every binary op reading state ``s_j`` starts with a
  non-affine ``BatchNorm2d``. In training mode they all normalise with the same batch statistics, so
  ``sign(BN(s_j))`` is computed once and shared by every binary op on every edge leaving ``s_j`` (4 ops x up
  to 4 edges in the paper cell); BN and sign are fused (:class:`_BNSignSTE`) so that backward keeps a
  boolean ``|BN(s_j)| < 1`` mask instead of the float ``BN(s_j)``. Every BN module's running statistics are
  still updated as its own forward would (batch mean, unbiased variance, momentum or cumulative average,
  ``num_batches_tracked``), with a few ``_foreach`` ops on C-vectors. In eval mode BNs normalise with their
  own running statistics: BNs whose statistics are equal (always so when the supernet was trained as a
  whole from the common init) share one normalisation, BNs whose statistics differ get their own, so eval
  mode is exact too.
* **One conv per kernel type per state.** The binary convs of one kind (kernel, dilation, padding, stride)
  leaving a state run as one convolution over the concatenation, along output channels, of the ops'
  binarized weights. XNOR scales are per output filter, so binarizing the concatenated latent weights in
  one call equals binarizing each op's weights (binarizers with ``per_filter`` and no state; others go op by op).
* **One autograd node per state** (:class:`_StateBinaryOps`, the default path). BN, sign, every merged
  conv and every pool leaving a state run in one function; ops going to the same nodes are summed into one
  *bundle* output whose channel block ``e`` is the state's contribution to its ``e``-th destination node.
  On CPU the binary convolutions are exact int8 ternary convolutions (``sign(x)`` times ``sign(W)`` summed
  as integers by oneDNN, the per-filter XNOR scale applied once, with the softmax weight; see
  :mod:`.kernels`), about 3x cheaper than fp32; elsewhere, or for weights that are not per-filter-scaled
  signs, fp32 convs. A reduction cell's dilated convs (stride = dilation = 2) run as the equivalent
  stride-1, undilated convs of the input subsampled by 2, which oneDNN computes about twice as fast in
  backward. Backward keeps a byte per element for the sign and the straight-through mask and the int8
  convs' ``ReLU(conv)`` (exact integer sums, fp32), which the architecture step's softmax-weight gradient
  needs and whose ReLU backward is the cheapest mask in weight steps (fp32 convs keep a byte mask); pools
  are recomputed. The packed int8 weights are reused while the latent weights are unchanged (version
  counters), so a weight step reuses its architecture step's packing. The softmax-weight
  gradient of a conv comes from the adjoint identity ``sum g * ReLU(conv(s, W)) = sum W * dW`` when ``dW``
  is computed anyway, else from the kept ``ReLU(conv)``: an architecture step (weights frozen)
  computes no weight-gradient convolution at all. (Folding ``p`` into the weights before the ReLU was
  tried and dropped: ties at 0 then round to +-1 ulp, which flips ReLU gradients.)
* **Fused elementwise passes.** On CPU in float32, the chains of elementwise ops around the convolutions run
  as single passes of a small C++ extension (:mod:`.kernels`, compiled once per machine): the sign and the
  straight-through mask of a state, the softmax-weighted sum of a bundle's convs and pools, each conv's ReLU
  backward together with the per-channel sums ``sum g * ReLU(conv)`` of the architecture gradient (in
  double precision), the pools' backward through their BN weights, the straight-through mask in backward.
  Where it cannot be built, and for other dtypes and devices, the same torch ops as before run instead.
* **Fallbacks.** ``BNAS_FAST_KERNELS=0``, eval mode with unequal BN statistics and activation quantizers
  other than ``ste_sign`` use the per-kernel-type path (:class:`_ConvReLUScale`, :class:`_BNWeighted`),
  which computes the same values with plain fp32 PyTorch ops. Node sums are accumulated as they come,
  never through ``torch.stack`` of all op outputs; the cell runs channels-last on CPU and returns its
  output in its caller's layout.
* **Zeroise costs nothing.** Its output is zero, so it is skipped; its logit still takes softmax mass and
  still gets its gradient through the softmax.

Ops the fast path does not recognise (custom ops, affine BNs, ...) run as in ``BinaryMixedCell`` and are
added with their softmax weight, so any op set works. Double backward is not supported (first-order
search only).

Use it as a mutation hook, ``FastBinaryMixedCell.mutate``, in place of ``BinaryMixedCell.mutate``.
Measured with ``bench/search_step.py`` and ``bench/search_epoch.py``; tested against ``BinaryMixedCell``
in ``tests/test_fast_cell.py`` and ``tests/test_fast_kernels.py``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from nni.nas.oneshot.pytorch.supermodule.sampling import preprocess_cell_inputs

from ...quant import BinaryConv2d, SignBinarizer, SteSign, XnorBinarizer
from ...ops import BNConvReLU, Zeroise
from . import kernels
from .kernels import profiler_scope as _scope
from ..mixed_cell import BinaryMixedCell

__all__ = ['FastBinaryMixedCell']


def _plain_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and not bn.affine


class _BNSignSTE(torch.autograd.Function):
    """Training-mode non-affine batch norm followed by ``sign`` with the clipped straight-through gradient
    (the ``ste_sign`` quantizer), fused so that only a boolean ``|BN(x)| < 1`` mask is kept for backward
    instead of the float ``BN(x)``. Returns ``(sign(BN(x)), batch mean, batch invstd)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float):  # type: ignore[override]
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        mask = xhat.abs() < 1
        ctx.save_for_backward(x, mean, invstd, mask)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return torch.sign(xhat), mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor, _gm, _gi):  # type: ignore[override]
        x, mean, invstd, mask = ctx.saved_tensors
        g = kernels.through_mask(g, mask)
        gx, _, _ = torch.ops.aten.native_batch_norm_backward(g, x, None, None, None, mean, invstd, True, ctx.eps,
                                                             [True, False, False])
        return gx, None


class _ConvReLUScale(torch.autograd.Function):
    """``ReLU(conv2d(s, W)) * p`` (``p`` a per-output-channel vector, here the ops' softmax weights).

    Computes exactly what ``p * ReLU(conv(s, W))`` computes (the ReLU mask is taken on the unscaled conv,
    as in the op) but keeps only a boolean mask of the conv output for backward, ``s`` as int8 when it is
    ternary (a sign; ``s_saved``), and uses the adjoint identity
    ``sum_bhw g * ReLU(conv(s, W)) = sum_ikl W * dW`` for the gradient of ``p`` (``dW`` being the weight
    gradient the backward computes anyway)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, w: torch.Tensor, p: torch.Tensor, stride, padding, dilation, groups,
                s_saved: Optional[torch.Tensor]):  # type: ignore[override]
        z = F.conv2d(s, w, None, stride, padding, dilation, groups)
        mask = z > 0
        out = z.clamp_min_(0).mul_(p.view(1, -1, 1, 1))
        ctx.conv = (stride, padding, dilation, groups)
        ctx.s_dtype = s.dtype
        # s_saved: a compact copy of s (int8 for a sign), shared by the convs reading the same state
        ctx.save_for_backward(s if s_saved is None else s_saved, w, p, mask)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        s, w, p, mask = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        s = s.to(ctx.s_dtype)
        need_s, need_w, need_p = ctx.needs_input_grad[:3]
        gm = kernels.through_mask(g, mask)  # through the ReLU; the gradient w.r.t. the conv output is gm * p
        gs = gw = gp = None
        if need_s:
            # conv^T(gm * p, W) == conv^T(gm, p * W): scale the small weight, not the activation
            gs = torch.ops.aten.convolution_backward(gm, s, w * p.view(-1, 1, 1, 1), None, stride, padding,
                                                     dilation, False, [0, 0], groups, [True, False, False])[0]
        if need_w or need_p:
            dw = torch.ops.aten.convolution_backward(gm, s, w, None, stride, padding, dilation, False, [0, 0],
                                                     groups, [False, True, False])[1]
            if need_p:
                gp = (w * dw).sum(dim=(1, 2, 3))
            if need_w:
                gw = dw * p.view(-1, 1, 1, 1)
        return gs, gw, gp, None, None, None, None, None


class _BNWeighted(torch.autograd.Function):
    """Training-mode non-affine batch norm of ``x`` times each of the scalars ``p[0..E-1]`` (one per edge):
    returns the E weighted copies and the batch mean and invstd. Only ``x`` (already kept by the pooling)
    is saved; the normalised tensor is recomputed in backward for the gradient of ``p``, instead of being
    kept once more for a multiplication."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor, eps: float):  # type: ignore[override]
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, p, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        outs = [xhat * p[e] for e in range(p.numel())]
        return (*outs, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        x, p, mean, invstd = ctx.saved_tensors
        gs = grads[:p.numel()]
        gx = gp = None
        live = [(e, g) for e, g in enumerate(gs) if g is not None]
        if ctx.needs_input_grad[1]:
            xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
            gp = torch.zeros_like(p)
            for e, g in live:
                gp[e] = (g * xhat).sum()
        if ctx.needs_input_grad[0] and live:
            gsum = None
            for e, g in live:
                gsum = g * p[e] if gsum is None else gsum.add_(g * p[e])
            gx = torch.ops.aten.native_batch_norm_backward(gsum, x, None, None, None, mean, invstd, True, ctx.eps,
                                                           [True, False, False])[0]
        return gx, gp, None


def _subsample(t: torch.Tensor, s: int) -> torch.Tensor:
    """``t[:, :, ::s, ::s]`` in ``t``'s memory format (the input of a :class:`_ConvSpec` with ``sub`` s)."""
    if s == 1:
        return t
    fmt = torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return t[:, :, ::s, ::s].contiguous(memory_format=fmt)


def _phases(t: torch.Tensor, d: int) -> torch.Tensor:
    """``[B, C, H, W] -> [d * d * B, C, H / d, W / d]``: the ``d * d`` polyphase components ``t[:, :, a::d, b::d]``
    stacked along the batch (phase-major), channels-last."""
    b, c, h, w = t.shape
    return t.unflatten(3, (w // d, d)).unflatten(2, (h // d, d)).permute(3, 5, 0, 1, 2, 4) \
        .reshape(d * d * b, c, h // d, w // d).contiguous(memory_format=torch.channels_last)


class _ConvSpec:
    """One merged convolution of a bundle: geometry, output channels per op, and the packed int8 weights of
    its last ternary call, reused while the weights are unchanged.

    ``source`` (set by the caller before each forward): the identity and version counters of the latent
    weights the binarized weight was made from. While it equals the key of the cached result, ``ternary``
    returns that result without looking at the weight (the weight step after an architecture step, evaluation
    batches); any in-place change of a latent weight (optimizer step, latent constraint, state-dict load)
    bumps its version. Only stateless binarizers (xnor, sign) are cached this way; for the others, and when
    the key changed, the signs are compared and the int8 weights repacked only if they differ."""

    __slots__ = ('stride', 'padding', 'dilation', 'groups', 'kernel_size', 'c_out', 'trusted', 'source', '_cpu',
                 '_q', '_packed', '_scale', '_source')

    def __init__(self, conv: BinaryConv2d, trusted: bool) -> None:
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.kernel_size = tuple(conv.kernel_size)
        # stride s == dilation s (the dilated convs of a reduction cell), padding a multiple of s: every tap
        # reads x at s * (o + t) - p, so the conv is the stride-1, dilation-1 conv with padding p / s of the
        # input subsampled by s (x[:, :, ::s, ::s]), the same sums. On CPU oneDNN runs the strided dilated
        # conv's backward about 2x slower than this equivalent one (other devices: not measured, unchanged).
        self._cpu = (1, self.stride, self.padding, self.dilation)
        stride, dilation, padding = tuple(conv.stride), tuple(conv.dilation), conv.padding
        if len(stride) == 2 and stride[0] == stride[1] > 1 and dilation == stride and isinstance(padding, tuple) \
                and all(isinstance(q, int) and q % stride[0] == 0 for q in padding):
            self._cpu = (stride[0], (1, 1), tuple(q // stride[0] for q in padding), (1, 1))
        self.c_out = conv.out_channels
        # binarizers whose output is sign * per-filter scale by construction (others are checked per call)
        self.trusted = trusted
        self.source: Optional[Tuple] = None
        self._q: Optional[torch.Tensor] = None
        self._packed: Optional[kernels.TernaryConv] = None
        self._scale: Optional[torch.Tensor] = None
        self._source: Optional[Tuple] = None

    def geometry(self, device: torch.device) -> Tuple[int, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        """``(s, stride, padding, dilation)`` of the conv as it runs on ``device``, on the input subsampled by
        ``s`` (see ``__init__``)."""
        return self._cpu if device.type == 'cpu' else (1, self.stride, self.padding, self.dilation)

    def phase_split(self, out: torch.Tensor) -> int:
        """``d`` when this conv's weight gradient should run over the ``d * d`` polyphase components, else 1.

        A stride-1 conv with dilation ``d`` and padding ``d * (k // 2)`` maps output phase ``(a, b)`` from
        input phase ``(a, b)`` only: it is the undilated conv (padding ``k // 2``) of each phase, and its
        weight gradient the undilated one over the phases stacked along the batch, the same products. Used
        where the dilated kernel spans the whole (even-sized) image, the case oneDNN's dilated
        weight-gradient kernel handles at about half its usual rate (a 5x5 kernel, dilation 2, at 8x8; CPU
        only, other devices not measured)."""
        d = self.dilation[0]
        if out.device.type != 'cpu':
            return 1
        h, w = out.shape[-2:]
        k = self.kernel_size
        if d < 2 or tuple(self.dilation) != (d, d) or tuple(self.stride) != (1, 1) or self.groups != 1 \
                or tuple(self.padding) != (d * (k[0] // 2), d * (k[1] // 2)) or k[0] % 2 == 0 or k[1] % 2 == 0 \
                or h % d or w % d or (k[0] - 1) * d < h or (k[1] - 1) * d < w:
            return 1
        return d

    def ternary(self, w: torch.Tensor) -> Optional[Tuple[kernels.TernaryConv, torch.Tensor]]:
        """The int8 convolution of ``w`` and its per-filter scale, or None if ``w`` is not ternary."""
        if self.source is not None and self.source == self._source:
            return self._packed, self._scale
        tw = kernels.ternary_weight(w, trusted=self.trusted)
        if tw is None:
            self._source = None
            return None
        q, scale = tw
        if self._packed is None or self._q.shape != q.shape or not torch.equal(self._q, q):
            self._packed = kernels.TernaryConv(q, *self._cpu[1:], self.groups)  # CPU only: the CPU geometry
            self._q = q
        self._scale = scale
        self._source = self.source if self.trusted else None
        return self._packed, scale


def _binary_state_forward(ctx, x: torch.Tensor, eps: float, bundles, probs: List[torch.Tensor],
                          weights: List[torch.Tensor], int8: bool, keep_masks: List[bool],
                          eval_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                          keep_relu: Optional[List[bool]] = None):
    """Shared body of :class:`_StateBinaryOps` (``ctx`` given) and of the no-grad forward (``ctx`` None):
    batch norm, sign, and per bundle the sum over its convs of ``p * ReLU(conv(sign, W))`` and over its
    pools of ``p * BN(pool(x))``. Returns the bundle outputs, the batch statistics of ``x`` and of each
    pooled tensor; with ``ctx``, stores on it what the backward needs. ``eval_stats``: normalise ``x`` with
    these running (mean, var) instead (no gradients; bundles then carry no pools). ``keep_relu[k]``: keep
    conv ``k``'s ``ReLU(conv)`` (the unscaled sums of an int8 conv) for backward instead of recomputing it."""
    if eval_stats is None:
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    else:
        xhat = F.batch_norm(x, eval_stats[0], eval_stats[1], None, None, False, 0.0, eps)
        mean = invstd = None
    if int8:
        sign, s_u8, mask_in = kernels.sign_and_mask(xhat, want_mask=ctx is not None)
    else:
        mask_in = (xhat.abs() < 1).view(torch.uint8) if ctx is not None else None
        sign, s_u8 = xhat.sign_(), None

    def sign_float() -> torch.Tensor:
        nonlocal sign
        if sign is None:  # the fused pass left xhat as it was
            sign = xhat.sign_()
        return sign

    subsampled: Dict[Tuple[int, int], torch.Tensor] = {}  # (id of the full tensor, s) -> its subsampling

    def conv_input(t: torch.Tensor, sub: int) -> torch.Tensor:
        if sub == 1:
            return t
        key = (id(t), sub)
        if key not in subsampled:
            subsampled[key] = _subsample(t, sub)
        return subsampled[key]

    outs, masks, tconvs, scales, pool_stats, relus = [], [], [], [], [], []
    k = 0
    for (conv_specs, pool_specs), p in zip(bundles, probs):
        y, zs, pcs = None, [], []  # zs, pcs: the ReLU(conv)s and weights summed in one fused pass below
        for t, spec in enumerate(conv_specs):
            w = weights[k]
            tern = spec.ternary(w) if int8 else None
            pc = p[t].repeat_interleave(spec.c_out)
            sub, stride, padding, dilation = spec.geometry(x.device)
            if tern is not None:
                # exact integer sums ReLU(sum s * sign(W)); the per-filter scale goes with the softmax weight
                z = tern[0](conv_input(s_u8, sub), relu=True)
                pc = pc * tern[1].to(pc.dtype)
            else:
                z = F.conv2d(conv_input(sign_float(), sub), w, None, stride, padding, dilation,
                             spec.groups).clamp_min_(0)
            kept = ctx is not None and keep_relu is not None and keep_relu[k] and tern is not None
            if ctx is not None:
                masks.append((z > 0).view(torch.uint8) if (keep_masks[k] and not kept) or tern is None else None)
                tconvs.append(tern[0] if tern is not None else None)
                scales.append(tern[1] if tern is not None else None)
                relus.append(z if kept else None)
            if kernels.fusable(z):
                zs.append(z)
                pcs.append(pc)
            elif y is None:
                y = z * pc.view(1, -1, 1, 1) if kept else z.mul_(pc.view(1, -1, 1, 1))
            else:
                y.addcmul_(z, pc.view(1, -1, 1, 1))
            k += 1
        if zs:
            y_fused = kernels.weighted_sum(zs, pcs)
            y = y_fused if y is None else y.add_(y_fused)
        del zs
        for q, pspec in enumerate(pool_specs):
            # pooled once, normalised once, added to every destination block with its weight; nothing kept
            xh, pmean, pinvstd = torch.native_batch_norm(pspec(x), None, None, None, None, True, 0.0, pspec.eps)
            kernels.add_blocks_(y, xh, p[len(conv_specs) + q])
            pool_stats.extend((pmean, pinvstd))
        outs.append(y)
    if ctx is not None:
        ctx.tconvs, ctx.n_masks = tconvs, [m is not None for m in masks]
        ctx.n_scales = [sc is not None for sc in scales]
        ctx.n_relus = [r is not None for r in relus]
        ctx.s_is_u8 = s_u8 is not None
        # the sign, compactly: uint8 s + 1 when the int8 path made it, else int8 s
        s_c = s_u8 if s_u8 is not None else sign.to(torch.int8)
        ctx.save_for_backward(x, mean, invstd, mask_in, s_c, *[m for m in masks if m is not None],
                              *[sc for sc in scales if sc is not None], *[r for r in relus if r is not None],
                              *pool_stats, *probs, *weights)
    return outs, mean, invstd, pool_stats


class _StateBinaryOps(torch.autograd.Function):
    """Every binary op (training-mode BN -> ``ste_sign`` -> binary conv -> ReLU) and pool (pool -> BN) leaving
    one state, times their softmax weights, in one autograd node.

    The state is normalised and signed once. Ops are grouped in *bundles*: ops whose outputs have the same
    shape and go to the same destination nodes in the same order; a bundle's merged convs (one per kernel
    type, output channels = the ops of that type on each destination edge) and pools (each pooled and
    normalised once, added to every destination block) are summed into one output, whose channel block
    ``e`` is the contribution of this state to the ``e``-th destination node. On CPU the convolutions run as
    exact int8 ternary convolutions (:mod:`.kernels`) when the weights are per-filter-scaled signs, else in
    fp32.

    Kept for backward: the ``|BN(x)| < 1`` mask and the sign, one byte per element each; the state itself
    (kept anyway by its other readers); the pools' batch statistics; the int8 convs' ``ReLU(conv)``
    (``recompute`` True: none, the backward recomputes it with the int8 kernel), uint8 ReLU masks of fp32
    convs. Pools are recomputed. The gradient of each conv's softmax weight comes from the adjoint identity
    ``sum g * ReLU(conv(s, W)) = sum W * dW`` when the weight gradient ``dW`` is computed anyway, else
    (architecture step, weights frozen) from ``ReLU(conv)``, cheaper than a weight-gradient convolution.
    Inputs: ``x, eps, bundles, n_bundles, int8, recompute, *probs, *weights``; ``bundles[b]`` is
    ``(conv specs, pool specs)`` and ``probs[b]`` has one row per conv then per pool, one column per edge.
    Outputs: the bundle outputs, then (not differentiable) the batch mean and invstd of the state and of
    each pooled tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, bundles, n_bundles: int, int8: bool, recompute: bool,
                *tensors: torch.Tensor):  # type: ignore[override]
        probs, weights = list(tensors[:n_bundles]), list(tensors[n_bundles:])
        need_w = ctx.needs_input_grad[6 + n_bundles:]
        keep_masks = [bool(nw) and not recompute for nw in need_w]
        # int8 convs keep ReLU(conv) itself: the architecture step's softmax-weight gradient needs it, and in
        # weight steps ReLU's own backward on it is faster than a byte mask (no mask pass in forward, no
        # mixed-dtype product in backward) for no more peak memory (the architecture step keeps as much)
        keep_relu = [not recompute] * len(need_w)
        outs, mean, invstd, pool_stats = _binary_state_forward(ctx, x, eps, bundles, probs, weights, int8,
                                                               keep_masks, keep_relu=keep_relu)
        ctx.eps, ctx.bundles, ctx.n_bundles = eps, bundles, n_bundles
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(mean, invstd, *pool_stats)
        return (*outs, mean, invstd, *pool_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        nb = ctx.n_bundles
        saved = list(ctx.saved_tensors)
        x, mean, invstd, mask_in, s_c = saved[:5]
        rest = iter(saved[5:])
        masks = [next(rest) if has else None for has in ctx.n_masks]
        scales = [next(rest) if has else None for has in ctx.n_scales]
        relus = [next(rest) if has else None for has in ctx.n_relus]
        pool_stats = [next(rest) for _, pools in ctx.bundles for _ in range(2 * len(pools))]
        probs = [next(rest) for _ in range(nb)]
        weights = list(rest)
        need_x = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[6:6 + nb]
        need_w = ctx.needs_input_grad[6 + nb:]
        made: Dict[Tuple[str, int], torch.Tensor] = {}  # forms of the sign, each made once if needed

        def once(key: Tuple[str, int], make) -> torch.Tensor:
            if key not in made:
                made[key] = make()
            return made[key]

        def sign_float(sub: int = 1) -> torch.Tensor:
            """The sign as a float tensor, subsampled by ``sub``."""
            if sub > 1:
                return once(('float', sub), lambda: _subsample(sign_float(), sub))
            return once(('float', 1), lambda: s_c.to(ctx.x_dtype).sub_(1) if ctx.s_is_u8 else s_c.to(ctx.x_dtype))

        def sign_compact(sub: int) -> torch.Tensor:
            """The sign as saved (uint8 s + 1 or int8 s), subsampled by ``sub``."""
            return s_c if sub == 1 else once(('compact', sub), lambda: _subsample(s_c, sub))

        def sign_phases(d: int) -> torch.Tensor:
            """The float sign's ``d * d`` polyphase components stacked along the batch."""
            return once(('phases', d), lambda: _phases(sign_float(), d))

        gx_sub: Dict[int, torch.Tensor] = {}  # s -> input gradient of the convs reading x[:, :, ::s, ::s]

        gx_sum = None    # gradient w.r.t. sign(BN(x)), summed over the convs
        gx_pools = None  # gradient w.r.t. x through the pools
        g_probs: List[Optional[torch.Tensor]] = [None] * nb
        g_weights: List[Optional[torch.Tensor]] = [None] * len(weights)
        k = kp = 0
        for b, (conv_specs, pool_specs) in enumerate(ctx.bundles):
            g = grads[b]
            if g is None:
                k += len(conv_specs)
                kp += 2 * len(pool_specs)
                continue
            if x.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous(
                    memory_format=torch.channels_last):
                g = g.contiguous(memory_format=torch.channels_last)
            p = probs[b]
            gp = torch.zeros_like(p) if need_p[b] else None
            for t, spec in enumerate(conv_specs):
                w, mask, tconv, scale = weights[k], masks[k], ctx.tconvs[k], scales[k]
                pc = p[t].repeat_interleave(spec.c_out).view(-1, 1, 1, 1)
                sub, stride, padding, dilation = spec.geometry(x.device)
                z = relus[k]  # ReLU(conv) (for int8 convs: the unscaled integer sums), when kept
                if z is None and mask is None:  # neither kept: recompute the int8 conv's exact sums
                    with _scope('bnas::recompute'):
                        z = tconv(sign_compact(sub), relu=True)
                relu_dots = None
                if z is not None:
                    # through the ReLU and, in an architecture step, the raw softmax-weight gradients sum g * z in
                    # the same pass over g and z (one conv at a time: one such gradient alive at once)
                    gm, relu_dots = kernels.relu_backward(g, z, want_dots=gp is not None and not need_w[k])
                else:
                    gm = kernels.through_mask(g, mask)  # through the ReLU; the conv output's gradient is gm * p
                conv_args = (stride, padding, dilation, False, [0, 0], spec.groups)
                if need_x:
                    # conv^T(gm * p, W) == conv^T(gm, p * W): scale the small weight, not the activation
                    with _scope('bnas::input_grad'):
                        gi = torch.ops.aten.convolution_backward(gm, x if sub == 1 else sign_float(sub), w * pc,
                                                                 None, *conv_args, [True, False, False])[0]
                    if sub == 1:
                        gx_sum = gi if gx_sum is None else gx_sum.add_(gi)
                    else:
                        gx_sub[sub] = gi if sub not in gx_sub else gx_sub[sub].add_(gi)
                if need_w[k]:
                    with _scope('bnas::weight_grad'):
                        d = spec.phase_split(gm)
                        if d > 1:  # the same products, as an undilated conv over the d * d phases
                            dw = torch.ops.aten.convolution_backward(
                                _phases(gm, d), sign_phases(d), w, None, [1, 1], [q // d for q in spec.padding],
                                [1, 1], False, [0, 0], spec.groups, [False, True, False])[1]
                        else:
                            dw = torch.ops.aten.convolution_backward(gm, sign_float(sub), w, None, *conv_args,
                                                                     [False, True, False])[1]
                    g_weights[k] = dw * pc
                    if gp is not None:
                        gp[t] = (w * dw).sum(dim=(1, 2, 3)).view(-1, spec.c_out).sum(1)
                elif gp is not None:
                    gz = relu_dots
                    if gz is None:  # a conv that kept only its ReLU mask: recompute ReLU(conv)
                        with _scope('bnas::recompute'):
                            z = tconv(sign_compact(sub), relu=True) if tconv is not None else F.conv2d(
                                sign_float(sub), w, None, stride, padding, dilation, spec.groups).clamp_min_(0)
                        gz = (g * z).sum(dim=(0, 2, 3))
                    if scale is not None:
                        gz = gz * scale.to(gz.dtype)
                    gp[t] = gz.view(-1, spec.c_out).sum(1)
                k += 1
            if pool_specs and (need_x or gp is not None):
                for q, pspec in enumerate(pool_specs):
                    row = len(conv_specs) + q
                    pmean, pinvstd = pool_stats[kp], pool_stats[kp + 1]
                    kp += 2
                    with _scope('bnas::recompute'):
                        pooled, idx = pspec(x, indices=True) if pspec.kind == 'max' else (pspec(x), None)
                    gxh, pool_dots = kernels.pool_backward(g, pooled, pmean, pinvstd, p[row], need_x, gp is not None)
                    if gp is not None:
                        gp[row] = pool_dots
                    if need_x:
                        gpooled = torch.ops.aten.native_batch_norm_backward(
                            gxh, pooled, None, None, None, pmean, pinvstd, True, pspec.eps, [True, False, False])[0]
                        gpx = pspec.backward(gpooled, x, idx)
                        gx_pools = gpx if gx_pools is None else gx_pools.add_(gpx)
            else:
                kp += 2 * len(pool_specs)
            g_probs[b] = gp
        for sub, gi in gx_sub.items():
            if gx_sum is None:
                gx_sum = torch.zeros_like(x)
            gx_sum[:, :, ::sub, ::sub].add_(gi)
        gx = None
        if need_x and gx_sum is not None:
            gx_sum = kernels.through_mask(gx_sum, mask_in)
            gx = torch.ops.aten.native_batch_norm_backward(gx_sum, x, None, None, None, mean, invstd, True,
                                                           ctx.eps, [True, False, False])[0]
        if need_x and gx_pools is not None:
            gx = gx_pools if gx is None else gx.add_(gx_pools)
        return (gx, None, None, None, None, None, *g_probs, *g_weights)


class _FromChannelsLast(torch.autograd.Function):
    """``x.contiguous()`` for a channels-last ``x`` whose gradient goes back in channels-last layout too (so
    the pooling backward also takes its fast NHWC path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):  # type: ignore[override]
        return x.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g.contiguous(memory_format=torch.channels_last)


def _per_channel(x: torch.Tensor, count: Optional[float]) -> float:
    """Values per channel a batch statistic was taken over: ``count`` (all ranks) or this batch's."""
    return count if count is not None else x.numel() // x.size(1)


class _BNGroup:
    """BatchNorm2d modules (non-affine, same eps) that all normalise the same tensor.

    ``sync`` (None: this process's batch): an object whose ``normalize(x, eps)`` returns ``(xhat, mean,
    invstd, count)`` with the statistics of the whole batch over all ranks of a data-parallel search
    (:class:`bnas_nni.search.distributed.BatchNormSync`); set by
    :meth:`FastBinaryMixedCell.set_batch_norm_sync`. Training-mode normalisation then goes through it
    (unfused: the same function, with a float copy kept for backward); eval mode is unchanged."""

    sync = None

    def __init__(self, bns: List[nn.BatchNorm2d]) -> None:
        self.bns = bns
        self.eps = bns[0].eps

    def _batch_stats(self, x: torch.Tensor):
        """``(xhat, mean, invstd, count)`` of a training batch (count None: this process's batch)."""
        if self.sync is not None:
            return self.sync.normalize(x, self.eps)
        xhat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, self.eps)
        return xhat, mean, invstd, None

    def normalize(self, x: torch.Tensor, training: bool) -> List[torch.Tensor]:
        """One normalised tensor per BN (the same object for BNs that normalise identically)."""
        bns = self.bns
        tracked = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
        if training or len(tracked) < len(bns):
            xhat, mean, invstd, count = self._batch_stats(x)
            if training and tracked:
                self._update_running_stats(_per_channel(x, count), mean, invstd, tracked)
            if len(tracked) == len(bns) or training:
                return [xhat] * len(bns)
            # eval mode with some BNs that keep no running stats: those use batch stats, others their own
            return [xhat if bn.running_mean is None else self._eval(x, bn) for bn in bns]
        # eval mode: share the normalisation between BNs with equal running statistics
        out: List[torch.Tensor] = []
        done: List[Tuple[nn.BatchNorm2d, torch.Tensor]] = []
        for bn in bns:
            for ref, t in done:
                if ref.eps == bn.eps and torch.equal(ref.running_mean, bn.running_mean) \
                        and torch.equal(ref.running_var, bn.running_var):
                    out.append(t)
                    break
            else:
                t = self._eval(x, bn)
                done.append((bn, t))
                out.append(t)
        return out

    def common_running_stats(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The running (mean, var) when every BN of the group keeps exactly the same ones, else None."""
        bns = self.bns
        ref = bns[0]
        if any(bn.running_mean is None or bn.eps != ref.eps for bn in bns):
            return None
        if all(torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
               for bn in bns[1:]):
            return ref.running_mean, ref.running_var
        return None

    def normalize_quantize(self, x: torch.Tensor, training: bool, quantize: nn.Module) -> List[torch.Tensor]:
        """``quantize(BN(x))`` per BN, shared where the normalisations are shared (fused for ``ste_sign``).

        ``quantize`` is the (stateless) quantizer module of one of the ops; they are interchangeable."""
        bns = self.bns
        if training and self.sync is not None:
            xhat, mean, invstd, count = self.sync.normalize(x, self.eps)
            tracked = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(_per_channel(x, count), mean, invstd, tracked)
            return [quantize(xhat)] * len(bns)
        if training and type(quantize) is SteSign:
            signed, mean, invstd = _BNSignSTE.apply(x, self.eps)
            tracked = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(x.numel() // x.size(1), mean, invstd, tracked)
            return [signed] * len(bns)
        done: Dict[int, torch.Tensor] = {}
        return [done[id(t)] if id(t) in done else done.setdefault(id(t), quantize(t))
                for t in self.normalize(x, training)]

    def normalize_weighted(self, x: torch.Tensor, training: bool, p: torch.Tensor) -> List[torch.Tensor]:
        """``BN_e(x) * p[e]`` for each BN ``e`` of the group."""
        if training and self.sync is not None:
            xhat, mean, invstd, count = self.sync.normalize(x, self.eps)
            tracked = [bn for bn in self.bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(_per_channel(x, count), mean, invstd, tracked)
            return [xhat * p[e] for e in range(p.numel())]
        if training:
            *outs, mean, invstd = _BNWeighted.apply(x, p, self.eps)
            tracked = [bn for bn in self.bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(x.numel() // x.size(1), mean, invstd, tracked)
            return outs
        return [t * p[e] for e, t in enumerate(self.normalize(x, training))]

    @staticmethod
    def _eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)

    @torch.no_grad()
    def _update_running_stats(self, n: int, mean: torch.Tensor, invstd: torch.Tensor,
                              bns: List[nn.BatchNorm2d]) -> None:
        """``n``: the number of values per channel that the batch statistics ``mean, invstd`` were taken over
        (over all ranks with a synced BN)."""
        # the batch statistics the BN kernel just used: mean, and the unbiased variance nn.BatchNorm2d tracks
        var = (invstd.pow(-2) - self.eps) * (n / max(n - 1, 1))
        counts = [bn.num_batches_tracked for bn in bns]
        torch._foreach_add_(counts, 1)
        # same factor as nn.BatchNorm2d.forward: momentum, or the cumulative average when momentum is None
        by_factor: Dict[float, List[nn.BatchNorm2d]] = {}
        for bn in bns:
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            by_factor.setdefault(f, []).append(bn)
        for f, group in by_factor.items():
            means = [bn.running_mean for bn in group]
            vars_ = [bn.running_var for bn in group]
            torch._foreach_mul_(means, 1.0 - f)
            torch._foreach_add_(means, [mean] * len(group), alpha=f)
            torch._foreach_mul_(vars_, 1.0 - f)
            torch._foreach_add_(vars_, [var] * len(group), alpha=f)


class _StatePlan:
    """What to compute from one cell state: shared binary-conv groups, shared pools, other ops."""

    def __init__(self) -> None:
        # binary ops: (quantizer share key, eps, C) -> list of (node, op_name, BNConvReLU); one BN group each
        self.binary: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
        # pools: pool signature -> (pool module, list of (node, op_name, bn))
        self.pools: Dict[Tuple, Tuple[nn.Module, List[Tuple[int, str, nn.BatchNorm2d]]]] = OrderedDict()
        self.generic: List[Tuple[int, str, nn.Module]] = []
        self.zero_nodes: List[int] = []
        self.bn_groups: Dict[Tuple, _BNGroup] = {}
        # per binary key: bundles of merged convs (and pools) whose outputs are summed; see _StateBinaryOps
        self.bundles: Dict[Tuple, List['_Bundle']] = {}
        # pool keys computed inside a bundle in training mode (else by the pool loop)
        self.fused_pools: Dict[Tuple, List[Tuple]] = {}


class _MergedConv:
    """The binary ops of one kernel type leaving a state (one per destination edge), run as one conv."""

    __slots__ = ('spec', 'items')

    def __init__(self, items: List[Tuple[int, str, BNConvReLU]]) -> None:
        self.items = items
        self.spec = _ConvSpec(items[0][2].op[0], trusted=all(_stateless_binarizer(op.op[0]) for _, _, op in items))

    def source_key(self) -> Optional[Tuple]:
        """What the binarized weight is made from, read now: each conv's latent weight (storage and version
        counter) and binarizer; None unless every binarizer is a stateless one."""
        key = []
        for _, _, op in self.items:
            conv = op.op[0]
            if not _stateless_binarizer(conv):
                return None
            key.append((conv.weight.data_ptr(), conv.weight._version, id(conv.weight_quantizer)))
        return tuple(key)


def _stateless_binarizer(conv: BinaryConv2d) -> bool:
    """Binarizers whose output is sign * per-filter scale by construction and depends on the weight only."""
    return type(conv.weight_quantizer) in (XnorBinarizer, SignBinarizer)


class _PoolSpec:
    """A max or average pool followed by a non-affine batch norm, as computed inside a bundle."""

    __slots__ = ('kind', 'kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode', 'count_include_pad',
                 'divisor_override', 'eps')

    def __init__(self, pool: nn.Module, bn: nn.BatchNorm2d) -> None:
        pair = torch.nn.modules.utils._pair
        self.kind = 'max' if type(pool) is nn.MaxPool2d else 'avg'
        self.kernel_size, self.padding = pair(pool.kernel_size), pair(pool.padding)
        self.stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.dilation = pair(getattr(pool, 'dilation', 1))
        self.ceil_mode = pool.ceil_mode
        self.count_include_pad = getattr(pool, 'count_include_pad', True)
        self.divisor_override = getattr(pool, 'divisor_override', None)
        self.eps = bn.eps

    def shape_key(self, channels: int) -> Optional[Tuple]:
        if self.ceil_mode:
            return None
        return (self.stride, channels, tuple(2 * p - d * (k - 1) for p, d, k in
                                             zip(self.padding, self.dilation, self.kernel_size)))

    def __call__(self, x: torch.Tensor, indices: bool = False):
        if self.kind == 'max':
            fn = torch.ops.aten.max_pool2d_with_indices if indices else torch.ops.aten.max_pool2d
            return fn(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return torch.ops.aten.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                         self.count_include_pad, self.divisor_override)

    def backward(self, g: torch.Tensor, x: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == 'max':
            return torch.ops.aten.max_pool2d_with_indices_backward(g, x, self.kernel_size, self.stride, self.padding,
                                                                   self.dilation, self.ceil_mode, indices)
        return torch.ops.aten.avg_pool2d_backward(g, x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                                  self.count_include_pad, self.divisor_override)


class _FusedPool:
    """The pool ops of one kind leaving a state (one per destination edge, each with its own BN)."""

    __slots__ = ('key', 'spec', 'items')

    def __init__(self, key: Tuple, pool: nn.Module, items: List[Tuple[int, str, nn.BatchNorm2d]]) -> None:
        self.key, self.items = key, items
        self.spec = _PoolSpec(pool, items[0][2])


class _Bundle:
    """Ops leaving one state whose outputs are summed: same destination nodes in the same order, same
    output shape. Channel block ``e`` of the bundle's output goes to node ``dests[e]``."""

    __slots__ = ('dests', 'convs', 'pools', 'shape_key')

    def __init__(self, dests: Tuple[int, ...], shape_key: Tuple) -> None:
        self.dests, self.shape_key = dests, shape_key
        self.convs: List[_MergedConv] = []
        self.pools: List[_FusedPool] = []


def _conv_shape_key(conv: BinaryConv2d) -> Tuple:
    # the output size is (H + 2p - d(k-1) - 1) // s + 1: equal for every H when s and 2p - d(k-1) are
    return (conv.stride, conv.out_channels,
            tuple(2 * p - d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)))


def _bundle(items: List[Tuple[int, str, BNConvReLU]]) -> List[_Bundle]:
    """Group the binary ops of one state by kernel type, then bundle the kernel types whose outputs can be
    summed: same destination nodes in the same order, same stride, channels and output size."""
    by_conv: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
    for item in items:
        by_conv.setdefault(_conv_key(item[2].op[0]), []).append(item)
    bundles: Dict[Tuple, _Bundle] = OrderedDict()
    for group in by_conv.values():
        dests = tuple(i for i, _, _ in group)
        shape_key = _conv_shape_key(group[0][2].op[0])
        bundles.setdefault((dests, shape_key), _Bundle(dests, shape_key)).convs.append(_MergedConv(group))
    return list(bundles.values())


def _attach_pools(plan: '_StatePlan') -> None:
    """Put each pool kind of the state into the bundle with the same destinations and output shape (so that
    training-mode pools are computed and summed inside the state's fused function)."""
    for key, (pool, items) in plan.pools.items():
        fp = _FusedPool(key, pool, items)
        dests = tuple(i for i, _, _ in items)
        shape_key = fp.spec.shape_key(items[0][2].num_features)
        for bkey, bundles in plan.bundles.items():
            target = next((b for b in bundles if b.dests == dests and b.shape_key == shape_key), None)
            if target is not None:
                target.pools.append(fp)
                plan.fused_pools.setdefault(bkey, []).append(key)
                break


def _conv_key(conv: BinaryConv2d) -> Tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.padding_mode)


def _pool_key(pool: nn.Module) -> Optional[Tuple]:
    if type(pool) is nn.MaxPool2d:
        return ('max', pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                pool.return_indices)
    if type(pool) is nn.AvgPool2d:
        return ('avg', pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
                pool.divisor_override)
    return None


def _classify(op: nn.Module):
    """('zero',) | ('binary', key) | ('pool', key, pool, bn) | ('generic',)"""
    if type(op) is Zeroise:
        return ('zero',)
    if type(op) is BNConvReLU and _plain_bn(op.bn) and len(op.op) == 2 and isinstance(op.op[0], BinaryConv2d) \
            and type(op.op[1]) is nn.ReLU and op.op[0].bias is None and op.op[0].padding_mode == 'zeros':
        share = op.quantizer.share_key()
        if share is not None:  # a stateful (e.g. learnable) quantizer runs per op, never shared
            return ('binary', (share, op.bn.eps, op.bn.num_features))
    if type(op) is nn.Sequential and len(op) == 2 and _pool_key(op[0]) is not None and _plain_bn(op[1]) \
            and not getattr(op[0], 'return_indices', False):
        return ('pool', _pool_key(op[0]) + (op[1].eps,), op[0], op[1])
    return ('generic',)


class FastBinaryMixedCell(BinaryMixedCell):
    """Same function, parameters, state dict and API as :class:`BinaryMixedCell`, computed per state.

    See the module docstring for what is shared and merged. A drop-in subclass: ``_arch_alpha`` sharing per
    label, :meth:`alpha_matrix`, :meth:`export`, :meth:`export_probs` and the ``mutate`` hook are inherited.

    Class attributes
    ----------------
    channels_last : bool or None
        Run the cell in channels-last memory format. ``None`` (default): on CPU when the fast kernels are on
        (the int8 ternary convolution wants NHWC, and PyTorch's NHWC dilated convs and pools are faster).
        The cell returns its output in the layout of its input either way; a model run channels-last end
        to end (``model.to(memory_format=torch.channels_last)`` and channels-last inputs) converts nothing.
    recompute_relu_masks : bool
        With int8 convs, recompute ``ReLU(conv)`` in backward instead of keeping it (fp32) for the
        architecture step's softmax-weight gradient and the weight step's ReLU backward. Off by default: on
        the paper supernet at batch 64 keeping it costs ~1.1 GiB of peak memory and saves ~10% of a full
        search iteration on CPU (README, Benchmarks).
    pool_channels_last : bool
        Pool in channels-last layout on CPU (on by default: PyTorch's NHWC max/avg pooling kernels are several
        times faster there; the result is the same).
    """

    channels_last: Optional[bool] = None
    pool_channels_last: bool = True
    recompute_relu_masks: bool = False

    def __init__(self, op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                 concat_dim, memo, mutate_kwargs, label):
        super().__init__(op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                         concat_dim, memo, mutate_kwargs, label)
        # plain (non-module) bookkeeping; the modules stay where BinaryMixedCell put them (same state dict)
        self._plans: List[_StatePlan] = self._build_plans()
        self._index_cache: Dict[Tuple, torch.Tensor] = {}

    def _build_plans(self) -> List[_StatePlan]:
        P = self.num_predecessors
        n_states = P + self.num_nodes
        plans = [_StatePlan() for _ in range(n_states)]
        for i in range(P, n_states):
            for j in range(i):
                plan = plans[j]
                for name, op in self.ops[i - P][j].items():
                    kind = _classify(op)
                    if kind[0] == 'zero':
                        plan.zero_nodes.append(i)
                    elif kind[0] == 'binary':
                        plan.binary.setdefault(kind[1], []).append((i, name, op))
                    elif kind[0] == 'pool':
                        plan.pools.setdefault(kind[1], (kind[2], []))[1].append((i, name, kind[3]))
                    else:
                        plan.generic.append((i, name, op))
        for plan in plans:
            for key, items in plan.binary.items():
                plan.bn_groups[('binary',) + key] = _BNGroup([op.bn for _, _, op in items])
                plan.bundles[key] = _bundle(items)
            for key, (_, items) in plan.pools.items():
                plan.bn_groups[('pool',) + key] = _BNGroup([bn for _, _, bn in items])
            _attach_pools(plan)
        return plans

    def forward(self, *inputs):
        processed_inputs: List[torch.Tensor] = preprocess_cell_inputs(self.num_predecessors, *inputs)
        states: List[torch.Tensor] = list(self.preprocessor(processed_inputs))
        cl = self.channels_last
        if cl is None:
            cl = kernels.fast_kernels_enabled() and states[0].device.type == 'cpu' and states[0].dim() == 4
        given = processed_inputs[-1]
        caller_cl = given.dim() == 4 and given.is_contiguous(memory_format=torch.channels_last) \
            and not given.is_contiguous()
        if cl:
            states = [s.contiguous(memory_format=torch.channels_last) for s in states]
        P, N = self.num_predecessors, self.num_nodes
        col = {name: k for k, name in enumerate(self.op_names)}
        # every edge's softmax at once (rows in edge order). Zeroise's column is never read: its logit takes
        # softmax mass and gets its gradient through the softmax, as in BinaryMixedCell.
        probs = self._softmax(torch.stack([self._arch_alpha[e] for e in self.edge_labels()]))
        n_ops = probs.size(1)
        row = {ij: r for r, ij in enumerate((i, j) for i in range(P, P + N) for j in range(i))}
        # contributions to each node, summed as they come (no stacking of op outputs)
        acc: Dict[int, Optional[torch.Tensor]] = {i: None for i in range(P, P + N)}
        owned = set()  # nodes whose sum is a tensor made here (added to in place; never a view of an op output)

        def add(i: int, t: torch.Tensor) -> None:
            if acc[i] is None:
                acc[i] = t
            elif i in owned:
                acc[i].add_(t)
            else:
                acc[i] = acc[i] + t
                owned.add(i)

        training = self.training
        for j in range(P + N - 1):  # the last node feeds no edge
            if j >= P:  # node j is complete: every edge into it comes from an earlier state
                states.append(acc[j] if acc[j] is not None else self._zero_state(states, j))
            x = states[j]
            plan = self._plans[j]
            # binary ops: one normalisation and sign per BN group, one conv per kernel type
            done_pools: set = set()
            for key, items in plan.binary.items():
                for i, part in self._binary_ops(plan, key, items, x, probs, row, col, j, done_pools):
                    add(i, part)
            # pools: pooled once, normalised once, weighted per edge
            # (on CPU in channels-last layout: PyTorch's NHWC pooling kernels are ~5x faster than NCHW ones)
            x_pool = x.contiguous(memory_format=torch.channels_last) if len(plan.pools) > len(done_pools) \
                and self.pool_channels_last \
                and x.device.type == 'cpu' and x.dim() == 4 else x
            for key, (pool, items) in plan.pools.items():
                if key in done_pools:
                    continue
                idx = self._index([row[(i, j)] * n_ops + col[name] for i, name, _ in items], x.device)
                pw = probs.reshape(-1).index_select(0, idx).to(x.dtype)
                pooled = pool(x_pool)
                if x_pool is not x:
                    pooled = _FromChannelsLast.apply(pooled)
                for (i, _, _), t in zip(items, plan.bn_groups[('pool',) + key].normalize_weighted(pooled, training,
                                                                                                 pw)):
                    add(i, t)
            # anything else runs as in BinaryMixedCell
            for i, name, op in plan.generic:
                y = op(x)
                add(i, y * probs[row[(i, j)], col[name]].to(y.dtype))
        last = P + N - 1
        states.append(acc[last] if acc[last] is not None else self._zero_state(states, last))

        this_cell = torch.cat(states[P:], self.concat_dim)
        if cl and not caller_cl:
            this_cell = this_cell.contiguous()
        return self.postprocessor(this_cell, processed_inputs)

    def set_batch_norm_sync(self, sync) -> List[nn.BatchNorm2d]:
        """Normalise training batches of this cell's shared BN groups with ``sync`` (see :class:`_BNGroup`;
        None restores per-process statistics). Returns the BN modules covered; BNs of ops the fast path
        does not recognise run as modules and are not covered."""
        covered: List[nn.BatchNorm2d] = []
        for plan in self._plans:
            for group in plan.bn_groups.values():
                group.sync = sync
                covered.extend(group.bns)
        return covered

    def _binary_ops_plain(self, plan: '_StatePlan', key: Tuple, items, x: torch.Tensor, probs: torch.Tensor,
                          row, col, j: int):
        """The binary ops of one BN group, per kernel type (eval mode with unequal BN statistics, quantizers
        other than ``ste_sign``, ``BNAS_FAST_KERNELS=0``): yields ``(node, contribution)``."""
        training = self.training
        n_ops = probs.size(1)
        quantizer = items[0][2].quantizer
        signed = plan.bn_groups[('binary',) + key].normalize_quantize(x, training, quantizer)
        convs: Dict[Tuple, List[Tuple[int, str, BNConvReLU]]] = OrderedDict()
        inputs: Dict[int, torch.Tensor] = {}
        for (i, name, op), sx in zip(items, signed):
            inputs[id(sx)] = sx
            convs.setdefault((id(sx), _conv_key(op.op[0])), []).append((i, name, op))
        # the sign is saved once per state as int8 for the weight gradients (exact: values -1, 0, 1)
        compact = {sid: sx.to(torch.int8) if type(quantizer) is SteSign and torch.is_grad_enabled() else None
                   for sid, sx in inputs.items()}
        for (sid, _), group in convs.items():
            conv0 = group[0][2].op[0]
            idx = self._index([row[(i, j)] * n_ops + col[name] for i, name, _ in group], x.device)
            pw = probs.reshape(-1).index_select(0, idx).to(x.dtype).repeat_interleave(conv0.out_channels)
            if torch.is_grad_enabled():
                y = _ConvReLUScale.apply(inputs[sid], self._merged_weight(group), pw, conv0.stride,
                                         conv0.padding, conv0.dilation, conv0.groups, compact[sid])
            else:  # evaluation: nothing to keep for backward
                y = F.conv2d(inputs[sid], self._merged_weight(group), None, conv0.stride, conv0.padding,
                             conv0.dilation, conv0.groups).clamp_min_(0).mul_(pw.view(1, -1, 1, 1))
            # split (one backward node concatenating the grads), not slicing (a zero-filled
            # full-size grad per slice)
            for (i, _, _), part in zip(group, y.split(conv0.out_channels, 1) if len(group) > 1 else [y]):
                yield i, part

    def _binary_ops(self, plan: '_StatePlan', key: Tuple, items, x: torch.Tensor, probs: torch.Tensor, row, col,
                    j: int, done_pools: set):
        """The binary ops of one BN group (all reading ``x``): yields ``(node, contribution)``.

        Fused (:class:`_StateBinaryOps`) when the BNs normalise alike (training mode, or eval mode with
        equal running statistics) and the quantizer is ``ste_sign``; else per kernel type. In training mode
        the fused function also computes the pools attached to its bundles; their keys go into
        ``done_pools``."""
        quantizer = items[0][2].quantizer
        group = plan.bn_groups[('binary',) + key]
        training = self.training
        # a synced BN normalises through its group (all ranks' statistics): the per-kernel-type path
        fused = kernels.fast_kernels_enabled() and type(quantizer) is SteSign and x.dim() == 4 and group.sync is None
        eval_stats = None
        if fused and not training:
            # eval: one normalisation only if every BN keeps the same running statistics; no gradients
            eval_stats = group.common_running_stats()
            fused = eval_stats is not None and not torch.is_grad_enabled()
        if not fused:
            yield from self._binary_ops_plain(plan, key, items, x, probs, row, col, j)
            return
        bundles = plan.bundles[key]
        with_pools = training  # eval-mode pools normalise with their own running statistics: the pool loop
        n_ops = probs.size(1)
        flat = probs.reshape(-1)
        p_list = []
        for bundle in bundles:
            rows = [c.items for c in bundle.convs] + ([fp.items for fp in bundle.pools] if with_pools else [])
            idx = self._index([row[(i, j)] * n_ops + col[name] for items_ in rows for i, name, _ in items_],
                              x.device)
            p_list.append(flat.index_select(0, idx).view(len(rows), -1).to(x.dtype))
        weights = []
        for bundle in bundles:
            for c in bundle.convs:
                c.spec.source = c.source_key()
                weights.append(self._merged_weight(c.items))
        specs = [([c.spec for c in bundle.convs], [fp.spec for fp in bundle.pools] if with_pools else [])
                 for bundle in bundles]
        int8 = x.dtype == torch.float32 and x.device.type == 'cpu' and kernels.ternary_conv_supported()
        if torch.is_grad_enabled():
            res = _StateBinaryOps.apply(x, group.eps, specs, len(bundles), int8, self.recompute_relu_masks,
                                        *p_list, *weights)
            nb = len(bundles)
            ys, mean, invstd, pool_stats = res[:nb], res[nb], res[nb + 1], res[nb + 2:]
        else:
            ys, mean, invstd, pool_stats = _binary_state_forward(None, x, group.eps, specs, p_list, weights, int8,
                                                                 [], eval_stats=eval_stats)
        if training:
            tracked = [bn for bn in group.bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                group._update_running_stats(x.numel() // x.size(1), mean, invstd, tracked)
            done_pools.update(fp.key for bundle in bundles for fp in bundle.pools)
            k = 0
            for bundle in bundles:
                for fp in bundle.pools:
                    pgroup = plan.bn_groups[('pool',) + fp.key]
                    tracked = [bn for bn in pgroup.bns if bn.track_running_stats and bn.running_mean is not None]
                    if tracked:
                        pgroup._update_running_stats(ys[0].numel() // ys[0].size(1), pool_stats[k], pool_stats[k + 1],
                                                     tracked)
                    k += 2
        for bundle, y in zip(bundles, ys):
            c_out = bundle.convs[0].spec.c_out
            for i, part in zip(bundle.dests, y.split(c_out, 1) if len(bundle.dests) > 1 else [y]):
                yield i, part

    def _index(self, values: List[int], device: torch.device) -> torch.Tensor:
        key = (tuple(values), device)
        t = self._index_cache.get(key)
        if t is None:
            t = self._index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return t

    def _merged_weight(self, group) -> torch.Tensor:
        """The binarized weights of the convs in ``group``, concatenated along output channels."""
        convs = [op.op[0] for _, _, op in group]
        if len(convs) == 1:
            return convs[0].effective_weight()
        q = convs[0].weight_quantizer
        key = q.share_key() if q is not None and q.per_filter else None
        if key is not None and all(c.weight_quantizer is not None and c.weight_quantizer.share_key() == key
                                   for c in convs):
            return q(torch.cat([c.weight for c in convs], 0))
        return torch.cat([c.effective_weight() for c in convs], 0)

    def _zero_state(self, states: List[torch.Tensor], i: int) -> torch.Tensor:
        """A node all of whose candidate ops are Zeroise: zeros of the node's shape."""
        op = next(iter(self.ops[i - self.num_predecessors][0].values()))
        with torch.no_grad():
            return op(states[0]) * 0
