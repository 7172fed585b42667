"""Per-epoch training checkpoints: atomic, ``weights_only``-loadable, tied to one architecture.

A training checkpoint is a bnas-nni checkpoint (:func:`bnas_nni.checkpoints.save_checkpoint`: the
model's state dict plus a description of its architecture) with the training state added as plain
entries:

``kind='train'``, ``epoch`` (finished epochs = the epoch to resume at), ``optimizer``,
``scheduler``, ``scaler``, ``rng`` (torch, CUDA, numpy and Python generator states as tensors and
lists), ``config`` (the resolved trainer config), ``metrics`` (last epoch) and ``best_top1``.

Everything is tensors or Python scalars/containers, so ``torch.load(..., weights_only=True)`` reads it.
It is written to a temporary file and renamed into place, so a run killed while saving keeps the
previous checkpoint. Loading it into a network of another architecture fails with one line naming
both (:func:`bnas_nni.checkpoints.load_checkpoint_into`).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError

__all__ = ['CHECKPOINT_NAME', 'unwrap', 'capture_rng', 'restore_rng', 'save_training_checkpoint',
           'read_checkpoint', 'load_training_checkpoint', 'is_training_checkpoint', 'resolve_checkpoint_path']

CHECKPOINT_NAME = 'checkpoint.pt'
KIND = 'train'


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def capture_rng() -> Dict[str, Any]:
    """All generator states as tensors and lists (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'gauss': float(np_state[4])},
        'python': _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put every generator back where :func:`capture_rng` found it."""
    torch.set_rng_state(state['torch'].cpu())
    npst = state['numpy']
    np.random.set_state(('MT19937', npst['keys'].numpy().astype(np.uint32), int(npst['pos']), int(npst['has_gauss']),
                         float(npst['gauss'])))
    random.setstate(_to_tuples(state['python']))
    cuda = state.get('cuda')
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_training_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler_state: Mapping[str, Any], epoch: int, config: Mapping[str, Any],
                             scaler: Any = None, metrics: Optional[Mapping[str, Any]] = None,
                             best_top1: float = 0.0) -> Path:
    """Atomically write everything needed to continue at ``epoch`` (the count of finished epochs)."""
    from ..checkpoints import save_checkpoint

    return save_checkpoint(
        unwrap(model), path, kind=KIND, epoch=int(epoch), optimizer=optimizer.state_dict(),
        scheduler=dict(scheduler_state), scaler=scaler.state_dict() if scaler is not None else None,
        rng=capture_rng(), config=dict(config), metrics=dict(metrics or {}), best_top1=float(best_top1))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` of a file or run directory; one-line error if unreadable."""
    from ..checkpoints import load_checkpoint_file

    return load_checkpoint_file(resolve_checkpoint_path(path))


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get('kind') == KIND and 'optimizer' in obj


def load_training_checkpoint(path: str | os.PathLike, model: nn.Module) -> Dict[str, Any]:
    """Load the weights of a training checkpoint into ``model`` (refusing another architecture) and
    return the rest (``epoch``, ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``config`` ...)."""
    from ..checkpoints import load_checkpoint_into

    path = resolve_checkpoint_path(path)
    obj = read_checkpoint(path)
    if not is_training_checkpoint(obj):
        raise CheckpointError(f'{path} is not a bnas-nni training checkpoint (no optimizer/epoch state); '
                              'use it with `bnas-nni eval` instead of --resume')
    try:
        return load_checkpoint_into(unwrap(model), obj, layout='bnas-nni')
    except CheckpointError as exc:
        raise CheckpointError(f'{path}: {exc}') from None
