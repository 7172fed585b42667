"""The ``int8`` option for the packed engine's full-precision convs (``fp_parts='int8'``; off by default).

The residual convs of reduction cells (BN -> 2x2 stride-2 conv on the float cell state) hold almost all
of the engine's full-precision MACs (BNAS-A: 8.5e7 of 8.8e7 per image) and run as PyTorch fp32 convs by
default, so that the engine gives the float model's bits. With ``fp_parts='int8'`` they run on int8
instead (``csrc/kernels_vnni.cpp``, AVX-512 VNNI where the CPU has it): the unit's BN output is
quantized symmetrically with one scale per image (max |value| / 127; no calibration data, and an image's
result does not depend on the rest of its batch), the weights with one scale per filter; the product is
exact in int32 and scaled back to float once. This changes bits -- by about the quantization step -- so
it is an option, with its accuracy effect measured by ``bench/inference.py --fp-parts int8``; every
instruction-set path computes the same integers and so the same bits. The stem stays float: quantizing
it too moved ~9 % of a trained quick-preset network's top-1 decisions (residual convs alone: ~2.4 %),
for 3 % of the full-precision MACs.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import kernels

__all__ = ['FP_PARTS', 'Int8Conv']

#: values of the ``fp_parts`` option: how the engine runs its full-precision convs
FP_PARTS = ('float', 'int8')


class Int8Conv:
    """The int8 form of a float-input unit: BN folded to one scale and shift per input channel, weights in
    VPDPBUSD order with per-filter scales (see ``csrc/kernels.h``, ``Int8ConvArgs``)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], bn: Dict[str, Optional[torch.Tensor]],
                 eps: float, stride: int, padding: int, dilation: int, relu: bool) -> None:
        O, C, KH, KW = weight.shape
        self.out_ch, self.kernel = O, (KH, KW)
        self.stride, self.padding, self.dilation, self.relu = stride, padding, dilation, relu
        inv = torch.rsqrt(bn['var'] + eps)
        self.bn_a = (inv if bn['weight'] is None else bn['weight'] * inv).float().contiguous()
        shift = torch.zeros(C) if bn['bias'] is None else bn['bias']
        self.bn_b = (shift - bn['mean'] * self.bn_a).float().contiguous()
        Opad, K = (O + 15) // 16 * 16, KH * KW * C
        K4 = (K + 3) // 4
        w = weight.permute(0, 2, 3, 1).reshape(O, K).double()        # tap-major, channel inner: the gather order
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int32)
        qpad = torch.zeros(Opad, K4 * 4, dtype=torch.int32)
        qpad[:O, :K] = q
        self.weight = qpad.view(Opad // 16, 16, K4, 4).permute(0, 2, 1, 3).to(torch.int8).contiguous()
        self.wsum128 = (128 * qpad.sum(1)).to(torch.int32).contiguous()
        self.wscale = torch.zeros(Opad, dtype=torch.float32)
        self.wscale[:O] = scale.float()
        self.bias = torch.zeros(Opad, dtype=torch.float32)
        if bias is not None:
            self.bias[:O] = bias

    def __call__(self, x: torch.Tensor, isa: int) -> torch.Tensor:
        KH, KW = self.kernel
        oh, ow = (kernels.conv_output_size(n, k, self.stride, self.padding, self.dilation)
                  for n, k in ((x.shape[2], KH), (x.shape[3], KW)))
        out = torch.empty((x.shape[0], self.out_ch, oh, ow), memory_format=torch.channels_last)
        kernels.extension().int8_conv(x, self.bn_a, self.bn_b, self.weight, self.wsum128, self.wscale, self.bias, out,
                                      KH, KW, self.stride, self.padding, self.dilation, self.relu, isa)
        return out


def int8_for(unit: Any) -> Optional[Int8Conv]:
    """The int8 form of a packed-engine unit that takes a float input through BN, else None."""
    if unit.sign or getattr(unit, 'epilogue', False) or not hasattr(unit, 'bn'):
        return None
    return Int8Conv(unit.weight, unit.bias, unit.bn, unit.eps, unit.stride, unit.padding, unit.dilation, unit.relu)
