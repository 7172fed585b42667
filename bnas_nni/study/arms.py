"""What each arm costs and which cells it contributes: the declared search budgets, their equality check,
and the random baseline's cells.

Contract: :func:`declared_cost` states, before anything runs, what one search of an arm costs in the
unit every search shares, *image-epochs* (one image through one network's training step, forward and
backward): a one-shot search costs its supernet epochs x the images it reads per epoch (the weight half
and the architecture half), a multi-trial search its trained candidates x their epochs x their training
images; the random baseline costs nothing (no search). :func:`check_equal_budgets` refuses, in one line
naming every search arm and its cost, search arms whose costs differ by more than the tolerance.
:func:`random_cells` samples genotypes uniformly from a space: per node, two distinct inputs among its
predecessors (as every derived BNAS cell has) and an op for each, uniformly; duplicates are redrawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from ..config import SearchConfig
from ..data import search_splits
from ..errors import ConfigError
from ..genotypes import CELL_TYPES, Genotype
from ..ops import PRIMITIVES
from ..search.strategies import get_strategy_spec
from ..space import load_space_config
from .config import Arm, StudyConfig

__all__ = ['Cost', 'declared_cost', 'arm_costs', 'check_equal_budgets', 'random_cells', 'format_costs']


@dataclass(frozen=True)
class Cost:
    """One search's declared cost: ``image_epochs`` and how it was counted (``detail``)."""

    arm: str
    image_epochs: int
    detail: str

    def to_dict(self) -> Dict[str, Any]:
        return {'arm': self.arm, 'image_epochs': self.image_epochs, 'detail': self.detail}


def _search_images(cfg: SearchConfig) -> int:
    """Images one supernet epoch reads: both halves of the (subset of the) training split."""
    if cfg.train_subset is not None and cfg.max_train_batches is None:
        return int(cfg.train_subset)
    weights, arch, _ = search_splits(cfg)
    images = len(weights) + len(arch)
    if cfg.max_train_batches is not None:
        images = min(images, 2 * int(cfg.max_train_batches) * int(cfg.batch_size))
    return images


def declared_cost(arm: Arm, cfg: SearchConfig | None) -> Cost:
    """The cost of one search of ``arm`` (``cfg``: its resolved search config; None for random cells)."""
    if arm.is_random:
        return Cost(arm.name, 0, f'no search ({arm.cells} cells sampled uniformly)')
    spec = get_strategy_spec(arm.strategy)
    if spec.kind == 'one-shot':
        images = _search_images(cfg)
        return Cost(arm.name, int(cfg.epochs) * images, f'{cfg.epochs} supernet epochs x {images:,} images')
    images = cfg.final_train_subset
    if images is None:
        raise ConfigError(f'arm {arm.name!r}: set final_train_subset so that its candidates\' cost can be stated')
    trials, epochs = int(cfg.max_trial_number), int(cfg.final_epochs)
    return Cost(arm.name, trials * epochs * int(images),
                f'{trials} candidates x {epochs} epochs x {int(images):,} images')


def arm_costs(study: StudyConfig) -> List[Cost]:
    """The declared cost of one search of every arm, in the study's order."""
    return [declared_cost(a, None if a.is_random else study.search_config_for(a, a.seeds[0])) for a in study.arms]


def format_costs(costs: Sequence[Cost]) -> str:
    return ', '.join(f'{c.arm} {c.image_epochs:,} image-epochs ({c.detail})' for c in costs)


def check_equal_budgets(costs: Sequence[Cost], tolerance: float) -> None:
    """Refuse search arms whose declared costs differ by more than ``tolerance`` (relative to the largest)."""
    searched = [c for c in costs if c.image_epochs > 0]
    if len(searched) < 2:
        return
    high = max(c.image_epochs for c in searched)
    low = min(c.image_epochs for c in searched)
    if (high - low) / high > tolerance + 1e-12:
        raise ConfigError(f'unequal search budgets: {format_costs(searched)}; differ by {(high - low) / high:.0%} '
                          f'(budget_tolerance {tolerance:g}); give the arms the same budget (epochs, '
                          'max_trial_number, final_epochs, train_subset)')


def random_cells(space: str, count: int, seed: int, *, prefix: str = 'random') -> List[Genotype]:
    """``count`` distinct genotypes drawn uniformly from ``space`` with ``default_rng(seed)`` (see the
    module docstring); named ``<prefix>-c00``, ``<prefix>-c01`` ..."""
    cfg = load_space_config(space)
    ops = list(cfg.get('ops') or PRIMITIVES)
    num_nodes = int(cfg.get('num_nodes') or 4)
    possible = 1
    for i in range(num_nodes):
        possible *= ((i + 2) * (i + 1) // 2) * len(ops) ** 2
    possible = possible ** len(CELL_TYPES)
    if count > possible:
        raise ConfigError(f'random arm: {count} distinct cells asked, the space has only {possible}')
    rng = np.random.default_rng(seed)
    seen, cells = set(), []
    while len(cells) < count:
        drawn: Dict[str, List[tuple]] = {}
        for cell in CELL_TYPES:
            entries = []
            for i in range(num_nodes):
                inputs = sorted(rng.choice(i + 2, size=2, replace=False).tolist())
                entries += [(ops[int(rng.integers(len(ops)))], int(j)) for j in inputs]
            drawn[cell] = entries
        key = (tuple(drawn['normal']), tuple(drawn['reduce']))
        if key in seen:
            continue
        seen.add(key)
        cells.append(Genotype(normal=key[0], reduce=key[1], name=f'{prefix}-c{len(cells):02d}'))
    return cells
