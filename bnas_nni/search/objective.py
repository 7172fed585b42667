r"""The BNAS search objective and the weight learning rate of ``search.py``.

The architecture step minimises the paper's diversity objective

.. math::

   L_\alpha = \mathrm{CE}_{val} - \lambda\,\bar H(\alpha)\,e^{-\mathrm{epoch}/\tau},\qquad
   \bar H = \frac{1}{|E|}\sum_{e \in E} H(\mathrm{softmax}(\alpha_e))

with :math:`E` all edges of *both* cell types (28 in the paper space), :math:`\lambda = 1`,
:math:`\tau = 7.7` and the integer epoch index. The released ``architect.py`` indexes the reduce cell
with the stale loop variable of the normal loop, so its reduce term is :math:`14\,H(\alpha_{reduce}[13])`;
that slip is documented here and deliberately **not** reproduced.

Latency-aware search
--------------------

With a latency target :math:`T` (``latency_target_ms``) and a :class:`~bnas_nni.latency.LatencyModel`
of the derived network on the packed engine, the architecture loss gains the expected latency under the
current :math:`\alpha`, shaped exactly as NNI's ``ExpectationProfilerPenalty`` (``baseline`` :math:`= T`,
``scale`` :math:`= \mu`, ``aggregate='add'``, ``nonlinear`` = ``latency_penalty``):

.. math::

   L_\alpha = \mathrm{CE}_{val} - \lambda\,\bar H(\alpha)\,e^{-\mathrm{epoch}/\tau}
              + \mu\,\phi\!\left(\frac{\mathbb{E}[\mathrm{lat}](\alpha)}{T} - 1\right),\qquad
   \mathbb{E}[\mathrm{lat}](\alpha) = T_{fixed} + \sum_{t}\sum_{e} w_e \sum_k
       \mathrm{softmax}(\alpha^t_e)_k\, T^t_{e,k}

over both cell types :math:`t`, with :math:`w_e = 2/(2+i)` for an edge into node :math:`i` (the share
of a node's inputs that derivation keeps) and :math:`T^t_{e,k}` the milliseconds op :math:`k` on edge
:math:`e` adds to the network (:meth:`bnas_nni.latency.LatencyModel.expected_ms`). :math:`\phi` is
``positive`` :math:`\max(0, x)` (the default: only a network slower than the target pays),
``absolute`` :math:`|x|` (pulls towards the target from both sides, as TuNAS) or ``linear`` :math:`x`.
The term is differentiable in :math:`\alpha` and touches no weight. With no target the term is not
computed at all, so the loss is the paper's bit for bit.

``latency_estimate: derived`` keeps that gradient but gives the penalty the *derived* network's latency
as its value (a straight-through estimate, :math:`\hat L = \mathbb{E}[\mathrm{lat}] -
\mathrm{sg}(\mathbb{E}[\mathrm{lat}]) + \mathrm{lat}(\mathrm{derive}(\alpha))`, :math:`\mathrm{sg}` = stop
gradient). Why: BNAS's diversity term holds :math:`\mathrm{softmax}(\alpha)` near uniform, so in a short
search the expectation barely moves while the argmax derivation flips edge after edge; with the
expectation as the value, every target below the uniform expectation keeps pushing until the derived
network is almost all Zeroise and pooling, whatever the target. With the derived value, the push stops
once the network the search would return meets the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch

from ..errors import ConfigError
from ..genotypes import derive_genotype
from ..latency.model import LatencyModel

__all__ = ['LAMDA', 'TAU', 'GAMMA', 'SELECT_RULES', 'LATENCY_PENALTIES', 'LATENCY_ESTIMATES', 'diversity_weight',
           'mean_edge_entropy',
           'search_lr', 'expected_latency', 'latency_penalty', 'LatencyTerm']

LAMDA = 1.0
TAU = 7.7
GAMMA = 3.0
SELECT_RULES = ('best', 'official', 'last')
#: NNI ``ProfilerPenalty`` nonlinearities the latency term offers (``positive`` is the default)
LATENCY_PENALTIES = ('positive', 'absolute', 'linear')
#: what the penalty's value is: NNI's expectation, or the derived network's latency (gradient of the expectation)
LATENCY_ESTIMATES = ('expected', 'derived')


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


def expected_latency(alphas: Mapping[str, torch.Tensor], model: LatencyModel) -> torch.Tensor:
    r""":math:`\mathbb{E}[\mathrm{lat}](\alpha)` in ms: ``model.expected_ms`` of :math:`\mathrm{softmax}(\alpha)`
    of both cell types (``{'normal': [E, K], 'reduce': [E, K]}`` logits). Differentiable."""
    return model.expected_ms({t: torch.softmax(a, dim=-1) for t, a in alphas.items()})


def latency_penalty(expected_ms: torch.Tensor, target_ms: float, nonlinear: str = 'positive') -> torch.Tensor:
    r""":math:`\phi(\mathbb{E}[\mathrm{lat}] / T - 1)`: NNI's ``ProfilerPenalty`` normalised penalty with
    ``baseline`` :math:`T`."""
    ratio = expected_ms / float(target_ms) - 1
    if nonlinear == 'positive':
        return torch.relu(ratio)
    if nonlinear == 'absolute':
        return ratio.abs()
    if nonlinear == 'linear':
        return ratio
    raise ConfigError(f'unknown latency_penalty {nonlinear!r}; choose one of {", ".join(LATENCY_PENALTIES)}')


@dataclass(frozen=True)
class LatencyTerm:
    """The latency part of the architecture loss: a model, and (optionally) a target and its weight.

    Without ``target_ms`` the term only measures (:meth:`expected_ms` for the logs) and adds nothing to
    the loss (:attr:`active` is False)."""

    model: LatencyModel
    target_ms: Optional[float] = None
    weight: float = 1.0
    penalty: str = 'positive'
    estimate: str = 'expected'

    def __post_init__(self) -> None:
        if self.target_ms is not None and not (math.isfinite(self.target_ms) and self.target_ms > 0):
            raise ConfigError(f'latency_target_ms must be a positive number of milliseconds, got {self.target_ms!r}')
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f'latency_weight must be a finite number >= 0, got {self.weight!r}')
        if self.penalty not in LATENCY_PENALTIES:
            raise ConfigError(f'unknown latency_penalty {self.penalty!r}; choose one of '
                              f'{", ".join(LATENCY_PENALTIES)}')
        if self.estimate not in LATENCY_ESTIMATES:
            raise ConfigError(f'unknown latency_estimate {self.estimate!r}; choose one of '
                              f'{", ".join(LATENCY_ESTIMATES)}')

    @property
    def active(self) -> bool:
        """True when the term enters the loss (a target is set)."""
        return self.target_ms is not None

    def expected_ms(self, alphas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return expected_latency(alphas, self.model)

    def penalised_ms(self, alphas: Mapping[str, torch.Tensor], expected: torch.Tensor) -> torch.Tensor:
        """The latency the penalty sees: ``expected`` itself, or (``estimate='derived'``) the derived network's
        predicted latency carrying ``expected``'s gradient."""
        if self.estimate == 'expected':
            return expected
        genotype = derive_genotype(alphas['normal'].detach(), alphas['reduce'].detach(), self.model.ops)
        return expected - expected.detach() + self.model.predict(genotype)

    def __call__(self, expected_ms: torch.Tensor) -> torch.Tensor:
        r""":math:`\mu\,\phi(\mathbb{E}[\mathrm{lat}]/T - 1)` -- what the architecture loss adds."""
        if self.target_ms is None:
            raise ConfigError('the latency term has no target (latency_target_ms); it only measures')
        return self.weight * latency_penalty(expected_ms, self.target_ms, self.penalty)
