"""Seeds and generator states: one way to seed a run and to save and restore every generator.

The saved form holds only tensors, lists and numbers, so it travels inside checkpoints that load with
``torch.load(weights_only=True)``; restoring it makes a resumed run draw exactly the numbers an
uninterrupted one would have drawn.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import numpy as np
import torch

__all__ = ['seed_everything', 'capture_rng', 'restore_rng']


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


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
