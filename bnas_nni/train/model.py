"""The network a training config describes: the named model config (search_spaces/models.yaml) with the
config's model keys applied. Recipes check it before anything is written; the engine builds it."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch.nn as nn

from ..config import family_of
from ..data import dataset_info
from ..networks import build_model, model_config

__all__ = ['MODEL_KEYS', 'resolve_model_config', 'build_network']

#: training-config keys that override the model config's
MODEL_KEYS = ('genotype', 'init_channels', 'layers', 'num_classes', 'precision_rule', 'binarizer', 'activation',
              'op_set', 'nonlinearity', 'shortcut')


def resolve_model_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The network settings: the named model config with the trainer's overrides applied. Without
    ``num_classes`` the classifier has the dataset's classes (the registry's, or those read from a folder,
    which checks the folder here, before anything is written); ImageNet keeps the model config's."""
    overrides = {k: cfg.get(k) for k in MODEL_KEYS}
    overrides['dataset'] = 'imagenet' if family_of(cfg.dataset) == 'imagenet' else 'cifar10'
    mc = model_config(cfg.model, **overrides)
    if cfg.num_classes is None:
        classes = dataset_info(cfg).num_classes
        if classes is not None:
            mc['num_classes'] = classes
        elif overrides['dataset'] == 'cifar10':
            mc['num_classes'] = 10
    return mc


def build_network(model_cfg: Mapping[str, Any]) -> nn.Module:
    return build_model(dict(model_cfg))
