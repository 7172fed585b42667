"""Standalone training of derived BNAS architectures (issue 4).

* :mod:`.cifar` / :mod:`.imagenet`: the two paper recipes (``trainers/train_*.py``, ``bnas-nni train``);
* :mod:`.engine`: the shared driver (:func:`run_training`, :func:`run_evaluation`);
* :mod:`.config`: flat configs, resolved defaults <- YAML <- CLI <- NNI;
* :mod:`.schedules`, :mod:`.loops`, :mod:`.checkpoint`, :mod:`.distributed`, :mod:`.rundir`: parts.

Importing this package is cheap; torch-heavy modules load when used.
"""
from __future__ import annotations

from typing import Any

__all__ = ['run_training', 'run_evaluation', 'resolve_config']


def run_training(*args: Any, **kwargs: Any):
    """See :func:`bnas_nni.train.engine.run_training`."""
    from .engine import run_training as _run

    return _run(*args, **kwargs)


def run_evaluation(*args: Any, **kwargs: Any):
    """See :func:`bnas_nni.train.engine.run_evaluation`."""
    from .engine import run_evaluation as _run

    return _run(*args, **kwargs)


def resolve_config(*args: Any, **kwargs: Any):
    """See :func:`bnas_nni.train.config.resolve_config`."""
    from .config import resolve_config as _resolve

    return _resolve(*args, **kwargs)
