"""Batch-norm statistics of the fast cell: one normalisation per state, every BN module's running statistics
kept as its own forward would keep them.

Every binary op reading a state starts with a non-affine ``BatchNorm2d``, and every pool op ends with one.
In training mode the BNs of one state's ops all normalise with the same batch statistics, so the fast cell
normalises once per :class:`_BNGroup` and then updates each module's running mean, unbiased running
variance and ``num_batches_tracked`` (momentum or cumulative average) with a few ``_foreach`` ops. In eval
mode BNs with equal running statistics share one normalisation and the others get their own, so eval mode
is exact too. :class:`_BNSignSTE` and :class:`_BNWeighted` are the two fused training-mode forms (BN then
``ste_sign``; BN times the edges' softmax weights) that keep less for backward than the modules would.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...quant import SteSign
from . import kernels

__all__ = ['_BNGroup', '_BNSignSTE', '_BNWeighted']


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


def _per_channel(x: torch.Tensor, count: Optional[float]) -> float:
    """Values per channel a batch statistic was taken over: ``count`` (all ranks) or this batch's."""
    return count if count is not None else x.numel() // x.size(1)


class _BNGroup:
    """BatchNorm2d modules (non-affine, same eps) that all normalise the same tensor.

    ``sync`` (None: this process's batch): an object whose ``normalize(x, eps)`` returns ``(xhat, mean,
    invstd, count)`` with the statistics of the whole batch over all ranks of a data-parallel search
    (:class:`bnas_nni.search.data_parallel.BatchNormSync`); set by
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
