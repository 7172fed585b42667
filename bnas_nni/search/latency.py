"""The latency term of a search, from its config: a saved latency model, or one measured on this machine.

:func:`latency_term` reads the ``latency_*`` keys (:class:`bnas_nni.config.Search`):

* neither ``latency_target_ms`` nor ``latency_table``: None, the paper's search (nothing measured);
* ``latency_table: PATH``: that :class:`~bnas_nni.latency.LatencyModel` (its columns put in the space's op
  order); expected and predicted latency are recorded every epoch, and enter the loss only with a target;
* a target without a table: the model of the derived network the ``latency_*`` keys describe (the network
  ``bnas-nni train`` builds from the searched cell, not the supernet), measured on the packed engine by
  :func:`bnas_nni.latency.profile.measure_latency_model` and cached per machine; its classifier has the
  dataset's classes and its input the dataset's own side unless ``latency_image_size`` says otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..config import SearchConfig, family_of
from ..console import log as console_log
from ..data import dataset_info
from ..errors import ConfigError
from ..latency.model import LatencyModel
from ..space import load_space_config
from .objective import LatencyTerm

__all__ = ['latency_term', 'fit_to_space', 'space_cell']


def space_cell(cfg: SearchConfig) -> tuple:
    """``(ops, num_nodes)`` of the searched space after the config's overrides."""
    overrides = {k: cfg[k] for k in ('num_nodes', 'ops') if cfg.get(k) is not None}
    space = load_space_config(cfg.space, **overrides)
    return tuple(space['ops']), int(space['num_nodes'])


def fit_to_space(model: LatencyModel, ops: Sequence[str], num_nodes: int, source: str) -> LatencyModel:
    """``model`` with its columns in ``ops``' order (the alpha columns); one line when it does not cover the
    space."""
    if model.num_nodes != num_nodes:
        raise ConfigError(f'latency table {source} describes cells of {model.num_nodes} nodes; the search space has '
                          f'{num_nodes}; profile this space (bnas-nni latency profile) or drop latency_table')
    missing = [op for op in ops if op not in model.ops]
    if missing:
        raise ConfigError(f'latency table {source} has no column for {", ".join(missing)}; profile this space '
                          '(bnas-nni latency profile) or drop latency_table')
    if tuple(ops) == model.ops:
        return model
    cols = torch.tensor([model.ops.index(op) for op in ops])
    return LatencyModel.from_tables(ops, num_nodes, {t: m[:, cols] for t, m in model.edge_ms.items()},
                                    model.fixed_ms, model.meta)


def latency_term(cfg: SearchConfig, log: Callable[[str], None] = console_log) -> Optional[LatencyTerm]:
    """The search's :class:`~bnas_nni.search.objective.LatencyTerm`, or None when it asks for no latency."""
    target, table = cfg.get('latency_target_ms'), cfg.get('latency_table')
    if target is None and table is None:
        return None
    ops, num_nodes = space_cell(cfg)
    if table is not None:
        model = fit_to_space(LatencyModel.load(table), ops, num_nodes, str(table))
        where = f'table {table}'
    else:
        # measurement needs the packed engine (a C++ build on first use): only a search with a target pays
        from ..latency.profile import measure_latency_model

        info = dataset_info({**dict(cfg), 'image_size': None})      # the dataset's own side, not the search's
        side = int(cfg.latency_image_size or info.image_size or 32)
        model = measure_latency_model(ops=ops, num_nodes=num_nodes, init_channels=int(cfg.latency_init_channels),
                                      layers=int(cfg.latency_layers), image_size=side,
                                      num_classes=int(info.num_classes or 10), family=family_of(cfg.dataset),
                                      batch=int(cfg.latency_batch), threads=int(cfg.latency_threads))
        where = (f'measured for C={cfg.latency_init_channels} L={cfg.latency_layers} {side}x{side}, '
                 f'batch {cfg.latency_batch}, {cfg.latency_threads} thread(s)')
    term = LatencyTerm(model, target_ms=target, weight=float(cfg.latency_weight), penalty=cfg.latency_penalty,
                       estimate=cfg.latency_estimate)
    goal = (f'target {target:g} ms, weight {term.weight:g}, penalty {term.penalty} of the {term.estimate} latency'
            if term.active
            else 'no target: logged only')
    log(f'latency model ({where}): fixed {model.fixed_ms:.3f} ms, uniform-alpha expectation '
        f'{model.uniform_ms():.3f} ms; {goal}')
    return term
