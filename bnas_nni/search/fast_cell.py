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
* **ReLU, softmax weight and memory.** :class:`_ConvReLUScale` computes ``p * ReLU(conv(s, W))`` with the
  ReLU mask on the *unscaled* conv, exactly as the op does, but keeps only a boolean mask, the state's sign
  as int8 (shared by the state's convs) and the weights for backward; the gradient of ``p`` comes from the
  adjoint identity ``sum g * ReLU(conv(s, W)) = sum W * dW`` (``dW`` is computed for the weights anyway).
  (Folding ``p`` into the weights, ``ReLU(conv(s, p W))``, was tried and dropped: conv outputs of a binary
  op are exact multiples of the XNOR scale and often exactly 0, and the scaled sum rounds those ties to
  +-1 ulp, which flips ReLU gradients.)
* **Pools once per state.** Max/avg pooling of a state is shared by the edges leaving it, then one
  normalisation whose per-edge weighting keeps only the pooled tensor for backward (:class:`_BNWeighted`).
  Node sums are accumulated as they come, never through ``torch.stack`` of all op outputs.
* **Zeroise costs nothing.** Its output is zero, so it is skipped; its logit still takes softmax mass and
  still gets its gradient through the softmax.

Ops the fast path does not recognise (custom ops, affine BNs, ...) run as in ``BinaryMixedCell`` and are
added with their softmax weight, so any op set works. Double backward is not supported (first-order
search only).

Use it as a mutation hook, ``FastBinaryMixedCell.mutate``, in place of ``BinaryMixedCell.mutate``.
Measured with ``bench/search_step.py``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from nni.nas.oneshot.pytorch.supermodule.sampling import preprocess_cell_inputs

from ..quant import BinaryConv2d, SteSign
from ..ops import BNConvReLU, Zeroise
from .mixed_cell import BinaryMixedCell

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
        g = g * mask
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
        gm = g * mask  # through the ReLU; the gradient w.r.t. the conv output is gm * p
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
                self._update_running_stats(x, mean, invstd, tracked, count)
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

    def normalize_quantize(self, x: torch.Tensor, training: bool, quantize: nn.Module) -> List[torch.Tensor]:
        """``quantize(BN(x))`` per BN, shared where the normalisations are shared (fused for ``ste_sign``).

        ``quantize`` is the (stateless) quantizer module of one of the ops; they are interchangeable."""
        bns = self.bns
        if training and self.sync is not None:
            xhat, mean, invstd, count = self.sync.normalize(x, self.eps)
            tracked = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(x, mean, invstd, tracked, count)
            return [quantize(xhat)] * len(bns)
        if training and type(quantize) is SteSign:
            signed, mean, invstd = _BNSignSTE.apply(x, self.eps)
            tracked = [bn for bn in bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(x, mean, invstd, tracked)
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
                self._update_running_stats(x, mean, invstd, tracked, count)
            return [xhat * p[e] for e in range(p.numel())]
        if training:
            *outs, mean, invstd = _BNWeighted.apply(x, p, self.eps)
            tracked = [bn for bn in self.bns if bn.track_running_stats and bn.running_mean is not None]
            if tracked:
                self._update_running_stats(x, mean, invstd, tracked)
            return outs
        return [t * p[e] for e, t in enumerate(self.normalize(x, training))]

    @staticmethod
    def _eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, bn.eps)

    @torch.no_grad()
    def _update_running_stats(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                              bns: List[nn.BatchNorm2d], count: Optional[float] = None) -> None:
        # the batch statistics the BN kernel just used: mean, and the unbiased variance nn.BatchNorm2d tracks
        n = count if count is not None else x.numel() // x.size(1)
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
    channels_last : bool
        Run the cell in channels-last memory format (off by default: it was slower on CPU; see
        ``bench/search_step.py --cells fast-cl``).
    pool_channels_last : bool
        Pool in channels-last layout on CPU (on by default: PyTorch's NHWC max/avg pooling kernels are several
        times faster there; the result is the same).
    """

    channels_last: bool = False
    pool_channels_last: bool = True

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
            for key, (_, items) in plan.pools.items():
                plan.bn_groups[('pool',) + key] = _BNGroup([bn for _, _, bn in items])
        return plans

    def forward(self, *inputs):
        processed_inputs: List[torch.Tensor] = preprocess_cell_inputs(self.num_predecessors, *inputs)
        states: List[torch.Tensor] = list(self.preprocessor(processed_inputs))
        if self.channels_last:
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

        def add(i: int, t: torch.Tensor) -> None:
            acc[i] = t if acc[i] is None else acc[i] + t

        training = self.training
        for j in range(P + N - 1):  # the last node feeds no edge
            if j >= P:  # node j is complete: every edge into it comes from an earlier state
                states.append(acc[j] if acc[j] is not None else self._zero_state(states, j))
            x = states[j]
            plan = self._plans[j]
            # binary ops: one normalisation and sign per BN group, one conv per kernel type
            for key, items in plan.binary.items():
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
                        add(i, part)
            # pools: pooled once, normalised once, weighted per edge
            # (on CPU in channels-last layout: PyTorch's NHWC pooling kernels are ~5x faster than NCHW ones)
            x_pool = x.contiguous(memory_format=torch.channels_last) if plan.pools and self.pool_channels_last \
                and x.device.type == 'cpu' and x.dim() == 4 else x
            for key, (pool, items) in plan.pools.items():
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
        if self.channels_last:
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
