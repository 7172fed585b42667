"""``BinaryConv2d``: an ``nn.Conv2d`` that owns its weight binarizer."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .base import QuantizerSpec, make_quantizer
from .weights import WEIGHT_BINARIZERS, WeightBinarizer

__all__ = ['BinaryConv2d']


class BinaryConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weights go through ``weight_quantizer`` (a :class:`WeightBinarizer` submodule).

    ``binarizer`` is the quantizer's name (``None`` = full precision); assigning a name, mapping, class
    or instance to it builds a new quantizer module, so the stem, residual convs and the official
    precision rules switch a conv between binary and full precision without changing its parameters
    or its state dict (stateless binarizers own no tensors).
    """

    weight_quantizer: Optional[WeightBinarizer]

    def __init__(self, *args: Any, binarizer: QuantizerSpec = 'xnor', **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.binarizer = binarizer

    @property
    def binarizer(self) -> Optional[str]:
        return self.weight_quantizer.name if self.weight_quantizer is not None else None

    @binarizer.setter
    def binarizer(self, spec: QuantizerSpec) -> None:
        self.weight_quantizer = make_quantizer(spec, WEIGHT_BINARIZERS, channels=self.out_channels,
                                               where='binarizer')

    def effective_weight(self) -> torch.Tensor:
        """The weights the convolution uses: binarized latent weights, or the latent ones in full precision."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', binarizer={self.binarizer}'
