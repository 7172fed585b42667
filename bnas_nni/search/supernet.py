"""Reading a BNAS supernet: its mixed cells, their alpha matrices and the genotype they derive.

Kept apart from the strategy (:mod:`bnas_nni.search.binary_darts`) so that what records a search (the run
directory, pictures, the distributed driver) reads the supernet without importing the algorithm.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError
from ..genotypes import Genotype, derive_genotype
from .mixed_cell import BinaryMixedCell

__all__ = ['binary_cells', 'alpha_matrices', 'arch_parameters', 'cell_ops', 'derive_from_model', 'edge_probabilities']


def binary_cells(model: nn.Module) -> Dict[str, BinaryMixedCell]:
    """The first mixed cell of each label (cells sharing a label share their alphas), in model order."""
    cells: Dict[str, BinaryMixedCell] = {}
    for m in model.modules():
        if isinstance(m, BinaryMixedCell) and str(m.label) not in cells:
            cells[str(m.label)] = m   # NNI labels are a str subclass; keep plain str keys
    return cells


def alpha_matrices(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{'normal': [E, K], 'reduce': [E, K]}`` logits (differentiable), rows in official order."""
    return {label: cell.alpha_matrix() for label, cell in binary_cells(model).items()}


def arch_parameters(model: nn.Module) -> List[nn.Parameter]:
    """All architecture parameters of the BNAS cells, in a fixed order (label, then edge)."""
    out: List[nn.Parameter] = []
    for cell in binary_cells(model).values():
        out.extend(cell._arch_alpha[e] for e in cell.edge_labels())
    return out


def cell_ops(model: nn.Module) -> Tuple[str, ...]:
    """The candidate op names of the supernet's mixed cells (the columns of its alpha matrices)."""
    cells = binary_cells(model)
    if not cells:
        raise ConfigError('no BinaryMixedCell in the model; mutate the space with BinaryDARTS first')
    return tuple(next(iter(cells.values())).op_names)


def derive_from_model(model: nn.Module, *, gamma: float = 1.0, gamma_rule: str = 'zeroise', name: str = '',
                      alphas: Optional[Mapping[str, Any]] = None) -> Genotype:
    """The BNAS genotype of the current (or given) alphas; ``gamma`` > 1 for the ImageNet variant."""
    a = alphas if alphas is not None else {k: v.detach() for k, v in alpha_matrices(model).items()}
    return derive_genotype(torch.as_tensor(np.asarray(a['normal'])), torch.as_tensor(np.asarray(a['reduce'])),
                           cell_ops(model), gamma=gamma, gamma_rule=gamma_rule, name=name)


def edge_probabilities(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """``{'normal/2_0': {'zeroise': p, ...}, ...}`` softmax weights of every edge."""
    out: Dict[str, Dict[str, float]] = {}
    for label, cell in binary_cells(model).items():
        probs = torch.softmax(cell.alpha_matrix().detach().double(), -1).tolist()
        for edge, row in zip(cell.edge_labels(), probs):
            out[edge] = dict(zip(cell.op_names, row))
    return out
