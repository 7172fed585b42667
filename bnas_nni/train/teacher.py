"""Teachers for distillation: a network the project can build, frozen, from a checkpoint or torchvision.

``teacher`` in a config is either

* a bnas-nni checkpoint or run directory: its stored architecture (``BNASNetwork.config``) rebuilds the
  network and its weights load strictly (a full-precision teacher of the same genotype is a run with
  ``binarizer: none`` and ``activation: identity``);
* ``torchvision:NAME=WEIGHTS_FILE``: ``torchvision.models.NAME(num_classes=K)`` with weights read from a
  local file (nothing is downloaded).

A teacher whose classifier does not match the student's number of classes, or whose weights do not fit
the network its checkpoint (or name) describes, is refused in one line naming the teacher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError

__all__ = ['load_teacher']


def _last_linear_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _classes_of(model: nn.Module) -> int | None:
    for m in reversed(list(model.modules())):
        if isinstance(m, nn.Linear):
            return int(m.out_features)
    return None


def load_teacher(spec: str, *, num_classes: int, family: str = 'cifar') -> nn.Module:
    """The frozen teacher described by ``spec`` (see the module docstring), in eval mode."""
    # checkpoints and torchvision on use: `bnas-nni --help` imports this module through the recipes
    from ..checkpoints import load_checkpoint_file, model_from_checkpoint, read_checkpoint

    spec = str(spec)
    if spec.startswith('torchvision:'):
        import torchvision

        name, sep, weights = spec[len('torchvision:'):].partition('=')
        if not sep or not weights:
            raise ConfigError(f'teacher {spec!r}: write torchvision:NAME=WEIGHTS_FILE (weights from a local file)')
        factory = getattr(torchvision.models, name, None)
        if not callable(factory):
            raise ConfigError(f'teacher {spec!r}: torchvision.models has no {name!r}')
        model = factory(weights=None, num_classes=num_classes)
        state = load_checkpoint_file(Path(weights))
        state = state.get('state_dict', state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise CheckpointError(f'teacher weights {weights}: not a state dict ({type(state).__name__})')
        head = _last_linear_name(model)
        got = state.get(f'{head}.weight') if head else None
        if isinstance(got, torch.Tensor) and got.dim() == 2 and got.shape[0] != num_classes:
            raise ConfigError(f'teacher {spec} predicts {got.shape[0]} classes but the student has {num_classes}; '
                              'use a teacher trained on the same classes')
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise CheckpointError(f'teacher weights {weights} do not fit torchvision {name} with {num_classes} '
                                  f'classes: {str(exc).strip().splitlines()[0]}') from None
    else:
        obj = read_checkpoint(spec)
        config = (obj.get('model') or {}).get('config') if isinstance(obj, dict) else None
        classes = config.get('num_classes') if isinstance(config, dict) else None
        if isinstance(classes, int) and classes != num_classes:
            raise ConfigError(f'teacher {spec} predicts {classes} classes but the student has {num_classes}; '
                              'use a teacher trained on the same classes')
        try:
            model = model_from_checkpoint(obj)
        except CheckpointError as exc:
            raise CheckpointError(f'teacher {spec}: {exc}') from None
        except (ConfigError, TypeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f'teacher {spec}: its stored architecture does not build a network '
                                  f'({reason})') from None
    got = _classes_of(model)
    if got is not None and got != num_classes:
        raise ConfigError(f'teacher {spec} predicts {got} classes but the student has {num_classes}; '
                          'use a teacher trained on the same classes')
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
