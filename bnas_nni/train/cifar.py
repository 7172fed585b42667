"""The CIFAR-10 recipe of BNAS-A (official ``src/train.py`` run with ``--learning_rate 0.05``).

600 epochs, batch 256, SGD (momentum 0.9, weight decay 3e-6), lr 0.05 under the official one-cycle
schedule stepped every iteration with cycling momentum (epoch 0 at lr 2.5e-3, epoch 1 at
2.675926e-3), drop path 0.2 * epoch / epochs applied out of place, random crop 32 / pad 4 + flip +
CIFAR normalisation, validation on the test set every epoch, no gradient clipping, plain cross
entropy. ``experiments/train_cifar10_bnas_a.yaml`` spells it out; the same trainer runs the
offline Fashion-MNIST-32x3 default (``dataset: fashion-mnist``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

__all__ = ['TASK', 'recipe', 'train', 'main']

TASK = 'cifar'


def recipe() -> Dict[str, Any]:
    """The default config of this trainer (the paper recipe)."""
    from .config import default_config

    return default_config(TASK)


def train(config: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
          resume: Any = None) -> Dict[str, Any]:
    """Run the CIFAR trainer in this process (every torchrun rank calls it); see
    :func:`bnas_nni.train.engine.run_training`."""
    from .engine import run_training

    return run_training(config, overrides, task=TASK, resume=resume)


def main(argv: Optional[List[str]] = None) -> int:
    """``trainers/train_cifar10.py``."""
    from .cli import train_main

    return train_main(TASK, argv)
