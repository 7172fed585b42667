r"""The BNAS search objective and the weight learning rate of ``search.py``.

The architecture step minimises the paper's diversity objective

.. math::

   L_\alpha = \mathrm{CE}_{val} - \lambda\,\bar H(\alpha)\,e^{-\mathrm{epoch}/\tau},\qquad
   \bar H = \frac{1}{|E|}\sum_{e \in E} H(\mathrm{softmax}(\alpha_e))

with :math:`E` all edges of *both* cell types (28 in the paper space), :math:`\lambda = 1`,
:math:`\tau = 7.7` and the integer epoch index. The released ``architect.py`` indexes the reduce cell
with the stale loop variable of the normal loop, so its reduce term is :math:`14\,H(\alpha_{reduce}[13])`;
that slip is documented here and deliberately **not** reproduced.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ['LAMDA', 'TAU', 'GAMMA', 'SELECT_RULES', 'diversity_weight', 'mean_edge_entropy', 'search_lr']

LAMDA = 1.0
TAU = 7.7
GAMMA = 3.0
SELECT_RULES = ('best', 'official', 'last')


def diversity_weight(epoch: int, lamda: float = LAMDA, tau: float = TAU) -> float:
    r""":math:`\lambda e^{-\mathrm{epoch}/\tau}` (epoch is the 0-based integer epoch index)."""
    return float(lamda) * math.exp(-float(epoch) / float(tau))


def mean_edge_entropy(alphas: Iterable[torch.Tensor]) -> torch.Tensor:
    r"""Mean over every edge (row) of every ``[edges, ops]`` logit matrix of
    :math:`H(p) = -\sum_k p_k \log p_k`, :math:`p = \mathrm{softmax}(\alpha_e)`. Differentiable."""
    rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in alphas], 0)
    logp = torch.log_softmax(rows, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def search_lr(epoch: int, epochs: int, lr: float = 0.025, lr_min: float = 0.001) -> float:
    """The weight learning rate of ``search.py`` for 0-based ``epoch``: cosine from ``lr`` to ``lr_min``
    over ``epochs``, evaluated at ``epoch + 1`` because the official scheduler steps before each epoch."""
    t = min(epoch + 1, epochs)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / epochs)) / 2
