"""The fast cell's autograd functions: a state's binary ops and pools in one node, and the plain fallbacks.

:class:`_StateBinaryOps` (the default path) computes, for one state, batch norm, the sign, every merged
binary conv (int8 on CPU where the weights are per-filter-scaled signs, else fp32) and every pool of its
bundles, weighted by the softmax, and keeps one byte per element for backward; its backward is split into
one step per concern (the saved tensors, the forms of the sign, one conv, the pools, the state's gradient).
:class:`_ConvReLUScale` is the per-kernel-type fallback, :class:`_FromChannelsLast` a layout change whose
gradient keeps the channels-last layout.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kernels
from .kernels import profiler_scope as _scope
from .plan import _ConvSpec, _PoolSpec

__all__ = ['_StateBinaryOps', '_binary_state_forward', '_ConvReLUScale', '_FromChannelsLast', '_subsample',
           '_phases']


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
        # the sign, compactly: uint8 s + 1 when the int8 path made it, else int8 s
        s_c = s_u8 if s_u8 is not None else sign.to(torch.int8)
        _save_for_backward(ctx, _Saved(x, mean, invstd, mask_in, s_c, masks, scales, relus, pool_stats, probs,
                                       weights), tconvs, s_is_u8=s_u8 is not None)
    return outs, mean, invstd, pool_stats


class _Saved(NamedTuple):
    """What :class:`_StateBinaryOps` keeps for backward. Per conv ``k`` (bundle by bundle), at most one of
    ``masks[k]`` and ``relus[k]`` is kept; with neither, the backward recomputes the int8 conv."""

    x: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    mask_in: torch.Tensor                  # |BN(x)| < 1 (uint8): the straight-through mask of the sign
    sign: torch.Tensor                     # uint8 s + 1 (int8 path) or int8 s
    masks: List[Optional[torch.Tensor]]    # uint8 ReLU mask of conv k
    scales: List[Optional[torch.Tensor]]   # per-filter scale of int8 conv k
    relus: List[Optional[torch.Tensor]]    # ReLU(conv) of int8 conv k (the unscaled integer sums)
    pool_stats: List[torch.Tensor]         # batch mean and invstd of each pooled tensor, bundle by bundle
    probs: List[torch.Tensor]              # softmax weights, one tensor per bundle
    weights: List[torch.Tensor]            # binarized weights, one per conv


def _save_for_backward(ctx, saved: _Saved, tconvs: List[Optional[kernels.TernaryConv]], s_is_u8: bool) -> None:
    """Store ``saved`` on ``ctx``: the tensors through ``save_for_backward`` (which catches in-place changes
    before backward), the optional ones only where present, with flags saying which (see :func:`_load_saved`)."""
    ctx.tconvs, ctx.s_is_u8 = tconvs, s_is_u8
    ctx.has_mask = [m is not None for m in saved.masks]
    ctx.has_scale = [sc is not None for sc in saved.scales]
    ctx.has_relu = [r is not None for r in saved.relus]
    ctx.save_for_backward(saved.x, saved.mean, saved.invstd, saved.mask_in, saved.sign,
                          *[m for m in saved.masks if m is not None], *[sc for sc in saved.scales if sc is not None],
                          *[r for r in saved.relus if r is not None], *saved.pool_stats, *saved.probs, *saved.weights)


def _load_saved(ctx) -> _Saved:
    """The :class:`_Saved` that :func:`_save_for_backward` stored on ``ctx``."""
    x, mean, invstd, mask_in, s_c, *tail = ctx.saved_tensors
    rest = iter(tail)
    masks = [next(rest) if has else None for has in ctx.has_mask]
    scales = [next(rest) if has else None for has in ctx.has_scale]
    relus = [next(rest) if has else None for has in ctx.has_relu]
    pool_stats = [next(rest) for _, pools in ctx.bundles for _ in range(2 * len(pools))]
    probs = [next(rest) for _ in range(ctx.n_bundles)]
    return _Saved(x, mean, invstd, mask_in, s_c, masks, scales, relus, pool_stats, probs, list(rest))


class _SignForms:
    """The state's sign in the forms the backward convolutions read, each made at most once: as saved
    (uint8 ``s + 1`` or int8 ``s``; the int8 recomputation reads it), as a float tensor (input and weight
    gradients), subsampled by ``sub`` (convs run on the subsampled input, see ``_ConvSpec.geometry``) and as
    ``d * d`` polyphase components stacked along the batch (see ``_ConvSpec.phase_split``)."""

    def __init__(self, saved: torch.Tensor, is_u8: bool, dtype: torch.dtype) -> None:
        self._saved, self._is_u8, self._dtype = saved, is_u8, dtype
        self._made: Dict[Tuple[str, int], torch.Tensor] = {}

    def _once(self, key: Tuple[str, int], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def floating(self, sub: int = 1) -> torch.Tensor:
        """The sign as a float tensor, subsampled by ``sub``."""
        if sub > 1:
            return self._once(('float', sub), lambda: _subsample(self.floating(), sub))
        return self._once(('float', 1), lambda: self._saved.to(self._dtype).sub_(1) if self._is_u8
                          else self._saved.to(self._dtype))

    def compact(self, sub: int) -> torch.Tensor:
        """The sign as saved, subsampled by ``sub``."""
        return self._saved if sub == 1 else self._once(('compact', sub), lambda: _subsample(self._saved, sub))

    def phases(self, d: int) -> torch.Tensor:
        """The float sign's ``d * d`` polyphase components stacked along the batch."""
        return self._once(('phases', d), lambda: _phases(self.floating(), d))


class _StateGradient:
    """The gradient w.r.t. the state ``x``, gathered over its convs (w.r.t. the sign, then through the
    straight-through mask and the batch norm) and its pools (w.r.t. ``x`` directly). Terms are added in the
    order they come, in place into the first one."""

    def __init__(self) -> None:
        self.through_sign: Optional[torch.Tensor] = None  # w.r.t. sign(BN(x)), convs on the whole input
        self.through_sign_sub: Dict[int, torch.Tensor] = {}  # s -> w.r.t. sign(BN(x))[:, :, ::s, ::s]
        self.through_pools: Optional[torch.Tensor] = None

    def add_conv(self, gi: torch.Tensor, sub: int) -> None:
        if sub == 1:
            self.through_sign = gi if self.through_sign is None else self.through_sign.add_(gi)
        else:
            self.through_sign_sub[sub] = gi if sub not in self.through_sign_sub \
                else self.through_sign_sub[sub].add_(gi)

    def add_pool(self, gx: torch.Tensor) -> None:
        self.through_pools = gx if self.through_pools is None else self.through_pools.add_(gx)

    def total(self, saved: _Saved, eps: float) -> Optional[torch.Tensor]:
        """The sum, through the sign's straight-through mask and the batch norm where it went through them."""
        g_sign = self.through_sign
        for sub, gi in self.through_sign_sub.items():
            if g_sign is None:
                g_sign = torch.zeros_like(saved.x)
            g_sign[:, :, ::sub, ::sub].add_(gi)
        gx = None
        if g_sign is not None:
            g_sign = kernels.through_mask(g_sign, saved.mask_in)
            gx = torch.ops.aten.native_batch_norm_backward(g_sign, saved.x, None, None, None, saved.mean,
                                                           saved.invstd, True, eps, [True, False, False])[0]
        if self.through_pools is not None:
            gx = self.through_pools if gx is None else gx.add_(self.through_pools)
        return gx


def _conv_backward(g: torch.Tensor, spec: _ConvSpec, k: int, p_row: torch.Tensor, saved: _Saved,
                   tconv: Optional[kernels.TernaryConv], signs: _SignForms, need_x: bool, need_w: bool,
                   want_gp: bool) -> Tuple[Optional[torch.Tensor], int, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of merged conv ``k`` of a bundle, whose output (one block per merged op) is
    ``p * ReLU(conv(sign, W))`` (``p_row``: the softmax weight of each op, ``g``: the bundle's gradient).

    Returns ``(gi, sub, gw, gp)``: the input gradient w.r.t. the sign subsampled by ``sub`` (None without
    ``need_x``), the weight gradient (None without ``need_w``) and the gradient of ``p_row`` (None without
    ``want_gp``): from the adjoint identity ``sum g * ReLU(conv(s, W)) = sum W * dW`` when ``dW`` is computed
    anyway, else from ``ReLU(conv)`` (kept, or recomputed)."""
    w, mask, scale = saved.weights[k], saved.masks[k], saved.scales[k]
    pc = p_row.repeat_interleave(spec.c_out).view(-1, 1, 1, 1)
    sub, stride, padding, dilation = spec.geometry(saved.x.device)
    z = saved.relus[k]  # ReLU(conv) (for int8 convs: the unscaled integer sums), when kept
    if z is None and mask is None:  # neither kept: recompute the int8 conv's exact sums
        with _scope('bnas::recompute'):
            z = tconv(signs.compact(sub), relu=True)
    relu_dots = None
    if z is not None:
        # through the ReLU and, in an architecture step, the raw softmax-weight gradients sum g * z in the
        # same pass over g and z (one conv at a time: one such gradient alive at once)
        gm, relu_dots = kernels.relu_backward(g, z, want_dots=want_gp and not need_w)
    else:
        gm = kernels.through_mask(g, mask)  # through the ReLU; the conv output's gradient is gm * p
    conv_args = (stride, padding, dilation, False, [0, 0], spec.groups)
    gi = gw = gp = None
    if need_x:
        # conv^T(gm * p, W) == conv^T(gm, p * W): scale the small weight, not the activation
        with _scope('bnas::input_grad'):
            gi = torch.ops.aten.convolution_backward(gm, saved.x if sub == 1 else signs.floating(sub), w * pc,
                                                     None, *conv_args, [True, False, False])[0]
    if need_w:
        with _scope('bnas::weight_grad'):
            d = spec.phase_split(gm)
            if d > 1:  # the same products, as an undilated conv over the d * d phases
                dw = torch.ops.aten.convolution_backward(
                    _phases(gm, d), signs.phases(d), w, None, [1, 1], [q // d for q in spec.padding],
                    [1, 1], False, [0, 0], spec.groups, [False, True, False])[1]
            else:
                dw = torch.ops.aten.convolution_backward(gm, signs.floating(sub), w, None, *conv_args,
                                                         [False, True, False])[1]
        gw = dw * pc
        if want_gp:
            gp = (w * dw).sum(dim=(1, 2, 3)).view(-1, spec.c_out).sum(1)
    elif want_gp:
        gz = relu_dots
        if gz is None:  # a conv that kept only its ReLU mask: recompute ReLU(conv)
            with _scope('bnas::recompute'):
                z = tconv(signs.compact(sub), relu=True) if tconv is not None else F.conv2d(
                    signs.floating(sub), w, None, stride, padding, dilation, spec.groups).clamp_min_(0)
            gz = (g * z).sum(dim=(0, 2, 3))
        if scale is not None:
            gz = gz * scale.to(gz.dtype)
        gp = gz.view(-1, spec.c_out).sum(1)
    return gi, sub, gw, gp


def _pools_backward(g: torch.Tensor, x: torch.Tensor, pool_specs: Sequence[_PoolSpec], pool_stats: List[torch.Tensor],
                    p: torch.Tensor, first_row: int, gp: Optional[torch.Tensor],
                    grad_x: Optional[_StateGradient]) -> None:
    """Backward of a bundle's pools, each added to every destination block as ``p[row, e] * BN(pool(x))``
    (``row`` from ``first_row``; the pool is recomputed): the pools' rows of ``gp`` when given, and the
    gradient w.r.t. ``x`` into ``grad_x`` when given. ``pool_stats``: the bundle's (mean, invstd) pairs."""
    for q, pspec in enumerate(pool_specs):
        row = first_row + q
        pmean, pinvstd = pool_stats[2 * q], pool_stats[2 * q + 1]
        with _scope('bnas::recompute'):
            pooled, idx = pspec(x, indices=True) if pspec.kind == 'max' else (pspec(x), None)
        gxh, pool_dots = kernels.pool_backward(g, pooled, pmean, pinvstd, p[row], grad_x is not None,
                                               gp is not None)
        if gp is not None:
            gp[row] = pool_dots
        if grad_x is not None:
            gpooled = torch.ops.aten.native_batch_norm_backward(
                gxh, pooled, None, None, None, pmean, pinvstd, True, pspec.eps, [True, False, False])[0]
            grad_x.add_pool(pspec.backward(gpooled, x, idx))


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
        saved = _load_saved(ctx)
        need_x = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[6:6 + nb]
        need_w = ctx.needs_input_grad[6 + nb:]
        channels_last = saved.x.is_contiguous(memory_format=torch.channels_last)
        signs = _SignForms(saved.sign, ctx.s_is_u8, ctx.x_dtype)
        grad_x = _StateGradient() if need_x else None
        g_probs: List[Optional[torch.Tensor]] = [None] * nb
        g_weights: List[Optional[torch.Tensor]] = [None] * len(saved.weights)
        k = kp = 0  # the bundle's first conv and first pool statistic
        for b, (conv_specs, pool_specs) in enumerate(ctx.bundles):
            g = grads[b]
            n_convs, n_stats = len(conv_specs), 2 * len(pool_specs)
            if g is not None:
                if channels_last and not g.is_contiguous(memory_format=torch.channels_last):
                    g = g.contiguous(memory_format=torch.channels_last)
                p = saved.probs[b]
                gp = torch.zeros_like(p) if need_p[b] else None
                for t, spec in enumerate(conv_specs):
                    gi, sub, g_weights[k + t], gp_t = _conv_backward(
                        g, spec, k + t, p[t], saved, ctx.tconvs[k + t], signs, need_x, need_w[k + t], gp is not None)
                    if gi is not None:
                        grad_x.add_conv(gi, sub)
                    if gp_t is not None:
                        gp[t] = gp_t
                if pool_specs and (need_x or gp is not None):
                    _pools_backward(g, saved.x, pool_specs, saved.pool_stats[kp:kp + n_stats], p, n_convs, gp, grad_x)
                g_probs[b] = gp
            k += n_convs
            kp += n_stats
        gx = grad_x.total(saved, ctx.eps) if need_x else None
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
