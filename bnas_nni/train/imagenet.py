"""The ImageNet recipe of BNAS-D..H (official ``src/train_imagenet.py``), for ``torchrun``.

250 epochs, SGD lr 0.05 (momentum 0.9, weight decay 3e-5), batch 256 per process, label smoothing
0.1 for training (plain cross entropy for validation), gradient-norm clipping at 5 measured on the
binary-weight gradient as the official code did, ``CosineAnnealingWarmRestarts(T_0=50)`` stepped
every iteration with the fractional epoch, RandomResizedCrop/flip/ColorJitter(0.4, 0.4, 0.4, 0.2),
Resize(256)/CenterCrop(224) for validation, no drop path. Fixes over the original:
``DistributedSampler.set_epoch`` is called every epoch; native DDP (NCCL on GPU, gloo on CPU)
replaces apex; optional AMP (bf16/fp16) and channels-last. Top-1/top-5 are exact over all ranks.

Data: ``ROOT/train/<label>/*`` and ``ROOT/val/<label>/*`` (``bnas-nni data prepare-imagenet ROOT``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

__all__ = ['TASK', 'MODEL_CONFIGS', 'recipe', 'train', 'main']

TASK = 'imagenet'
MODEL_CONFIGS = ('bnas-d', 'bnas-e', 'bnas-f', 'bnas-g', 'bnas-h')


def recipe() -> Dict[str, Any]:
    """The default config of this trainer (the paper recipe)."""
    from .config import default_config

    return default_config(TASK)


def train(config: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
          resume: Any = None) -> Dict[str, Any]:
    """Run the ImageNet trainer in this process (every torchrun rank calls it)."""
    from .engine import run_training

    return run_training(config, overrides, task=TASK, resume=resume)


def main(argv: Optional[List[str]] = None) -> int:
    """``trainers/train_imagenet.py`` (``torchrun --nproc_per_node N trainers/train_imagenet.py ...``)."""
    from .cli import train_main

    return train_main(TASK, argv)
