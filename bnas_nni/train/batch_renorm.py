"""Batch Renormalization (Ioffe, NeurIPS 2017) for training binary networks with the function they are evaluated with.

A BatchNorm in training mode normalises with the batch's statistics, in eval mode with running ones. A
binary network puts a sign right after most BNs, so the small difference between the two flips bits, and
on images with constant regions (Fashion-MNIST's background: in the first cells most of a channel's values
are one value) a whole channel's background can flip at once. Batch Renormalization trains with

    x̂ = (x − μ_B) / σ_B · r + d,   r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)

with r and d treated as constants (no gradient) and μ, σ the running statistics. Where the clips do not
bite, x̂ = (x − μ) / σ: the forward is the eval-mode forward, while the gradient still flows through the
batch statistics as in BN (∂x̂/∂x is r times BN's), which keeps the optimisation BN's. The running
statistics are updated exactly as ``nn.BatchNorm2d`` updates them, so parameters, buffers and state dicts
stay those of a plain BN: checkpoints, export and evaluation do not know it was used.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, List

import torch
import torch.nn as nn

__all__ = ['batch_renorm', 'batch_renormalization', 'R_MAX', 'D_MAX']

#: the clips of Ioffe's ImageNet runs after their warm-up
R_MAX: float = 3.0
D_MAX: float = 5.0


def batch_renorm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, r_max: float = R_MAX,
                 d_max: float = D_MAX) -> torch.Tensor:
    """``bn``'s training-mode forward with Batch Renormalization (see the module docstring); updates the
    running statistics as ``bn`` itself would (momentum, or the cumulative average when it is None)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()     # AMP: statistics in fp32
    var_b, mean_b = torch.var_mean(xf, dim=dims, unbiased=False)
    std_b = (var_b + bn.eps).sqrt()
    with torch.no_grad():
        std = (bn.running_var.to(xf.dtype) + bn.eps).sqrt()
        r = (std_b / std).clamp(1.0 / r_max, r_max)
        d = ((mean_b - bn.running_mean.to(xf.dtype)) / std).clamp(-d_max, d_max)
        n = xf.numel() // xf.size(1)
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean_b.detach().to(bn.running_mean.dtype), momentum)
        unbiased = var_b.detach() * (n / max(n - 1, 1))
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    scale = r / std_b                               # r constant, σ_B with gradient
    shift = d - mean_b * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def _renorm_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if self.training and self.running_mean is not None:
        return batch_renorm(self, x, self._renorm_r_max, self._renorm_d_max)
    return type(self).forward(self, x)


@contextlib.contextmanager
def batch_renormalization(model: nn.Module, r_max: float = R_MAX, d_max: float = D_MAX) -> Iterator[List[nn.Module]]:
    """Every BatchNorm of ``model`` with running statistics trains with Batch Renormalization inside the
    block (eval mode is unchanged); yields those BNs. The modules keep their class and state dict."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in bns:
            m._renorm_r_max, m._renorm_d_max = float(r_max), float(d_max)
            m.forward = types.MethodType(_renorm_forward, m)
        yield bns
    finally:
        for m in bns:
            for attr in ('forward', '_renorm_r_max', '_renorm_d_max'):
                m.__dict__.pop(attr, None)
