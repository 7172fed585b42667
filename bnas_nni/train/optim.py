"""The optimizer factory: parameter groups, the optimizer, and the binarizers' latent-weight step.

Every weight optimizer of bnas-nni (trainers, search, evaluators) is built here, so the latent step of
each binary conv (:func:`bnas_nni.quant.attach_latent_constraint`) is attached in one place.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..quant import attach_latent_constraint, binary_convs

__all__ = ['OPTIMIZERS', 'parameter_groups', 'build_optimizer', 'optimizer_from_config']

OPTIMIZERS = ('sgd', 'adam', 'adamw')


def parameter_groups(model: nn.Module, weight_decay: float, weight_decay_binary: Optional[float] = None,
                     params: Optional[Iterable[nn.Parameter]] = None,
                     weight_decay_other: Optional[float] = None) -> List[Dict[str, Any]]:
    """One group (every parameter, ``weight_decay``), or more when some parameters get their own decay:

    * ``binary``: binary convs' latent weights (``weight_decay_binary``, e.g. 0 so the decay never pulls
      them towards a sign flip);
    * ``other``: everything that is not a conv weight -- BN, biases, the classifier, learnable thresholds
      and slopes (``weight_decay_other``; ReActNet decays conv weights only);
    * ``real``: the rest (``weight_decay``).

    ``None`` means ``weight_decay``. ``params`` restricts the groups to these parameters (e.g. the weights
    of a supernet, not its alphas).
    """
    chosen = list(model.parameters()) if params is None else list(params)
    wd_binary = weight_decay if weight_decay_binary is None else weight_decay_binary
    wd_other = weight_decay if weight_decay_other is None else weight_decay_other
    if wd_binary == weight_decay and wd_other == weight_decay:
        return [{'params': chosen, 'weight_decay': weight_decay}]
    latent = {id(m.weight) for m in binary_convs(model)} if wd_binary != weight_decay else set()
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    split_other = wd_other != weight_decay
    binary = [p for p in chosen if id(p) in latent]
    other = [p for p in chosen if split_other and id(p) not in latent and id(p) not in conv_weights]
    taken = {id(p) for p in binary + other}
    groups = [{'params': [p for p in chosen if id(p) not in taken], 'weight_decay': weight_decay, 'group': 'real'}]
    if binary:
        groups.append({'params': binary, 'weight_decay': wd_binary, 'group': 'binary'})
    if other:
        groups.append({'params': other, 'weight_decay': wd_other, 'group': 'other'})
    return groups


def build_optimizer(model: nn.Module, *, optimizer: str = 'sgd', lr: float = 0.025, momentum: float = 0.9,
                    betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0,
                    weight_decay_binary: Optional[float] = None,
                    params: Optional[Iterable[nn.Parameter]] = None,
                    weight_decay_other: Optional[float] = None) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW over :func:`parameter_groups`, with the latent-weight step attached."""
    name = str(optimizer).lower()
    groups = parameter_groups(model, weight_decay, weight_decay_binary, params, weight_decay_other)
    if name == 'sgd':
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    elif name == 'adam':
        opt = torch.optim.Adam(groups, lr=lr, betas=tuple(betas))
    elif name == 'adamw':
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    else:
        raise ConfigError(f'unknown optimizer {optimizer!r}; choose one of {", ".join(OPTIMIZERS)}')
    attach_latent_constraint(opt, model)
    return opt


def optimizer_from_config(model: nn.Module, cfg: Dict[str, Any],
                          params: Optional[Iterable[nn.Parameter]] = None) -> torch.optim.Optimizer:
    """:func:`build_optimizer` with the config's ``optimizer``, ``lr``, ``momentum``, ``betas``,
    ``weight_decay`` and (when the schema has them) ``weight_decay_binary`` and ``weight_decay_other``."""
    return build_optimizer(model, optimizer=cfg['optimizer'], lr=cfg['lr'], momentum=cfg['momentum'],
                           betas=cfg.get('betas', (0.9, 0.999)), weight_decay=cfg['weight_decay'],
                           weight_decay_binary=cfg.get('weight_decay_binary'), params=params,
                           weight_decay_other=cfg.get('weight_decay_other'))
