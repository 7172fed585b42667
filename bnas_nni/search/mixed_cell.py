"""The differentiable BNAS cell used by one-shot search.

NNI's ``DifferentiableMixedCell`` appends a hidden zero logit to every edge and skips it at export;
BNAS instead has Zeroise as a real, named candidate that can win. :class:`BinaryMixedCell` therefore
keeps exactly ``len(ops)`` logits per edge (softmax over the seven ops, Zeroise included) and exports
with the BNAS rule (:func:`bnas_nni.genotypes.derive_genotype`).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedCell

from ..genotypes import _parse_cell

__all__ = ['BinaryMixedCell', 'edge_labels']


def edge_labels(label: str, num_predecessors: int, num_nodes: int) -> List[str]:
    """Edge keys in the official alpha row order: node by node, inputs ascending."""
    return [f'{label}/{i}_{j}' for i in range(num_predecessors, num_predecessors + num_nodes) for j in range(i)]


class BinaryMixedCell(DifferentiableMixedCell):
    """Mixed cell with no implicit zero; cells sharing a label share their alphas."""

    def __init__(self, op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                 concat_dim, memo, mutate_kwargs, label):
        super().__init__(op_factory, num_nodes, num_ops_per_node, num_predecessors, preprocessor, postprocessor,
                         concat_dim, memo, mutate_kwargs, label)
        for edge in list(self._arch_alpha.keys()):
            key = edge + '/bnas_alpha'
            if key not in memo:
                memo[key] = nn.Parameter(torch.randn(len(self.op_names)) * 1e-3)
            self._arch_alpha[edge] = memo[key]

    def edge_labels(self) -> List[str]:
        return edge_labels(self.label, self.num_predecessors, self.num_nodes)

    def alpha_matrix(self) -> torch.Tensor:
        """Logits as a [num_edges, num_ops] tensor (differentiable), rows in official order."""
        return torch.stack([self._arch_alpha[e] for e in self.edge_labels()])

    def export(self, memo) -> Dict[str, object]:
        """BNAS derivation: top-2 incoming edges by max softmax weight incl. Zeroise, argmax op incl. Zeroise."""
        if all(f'{self.label}/op_{i}_0' in memo
               for i in range(self.num_predecessors, self.num_predecessors + self.num_nodes)):
            return {}
        probs = torch.softmax(self.alpha_matrix().detach().double(), -1).cpu().numpy()
        gene = _parse_cell(probs, self.op_names, self.num_nodes)
        out: Dict[str, object] = {}
        for idx, (op, j) in enumerate(gene):
            node, k = idx // 2 + self.num_predecessors, idx % 2
            out[f'{self.label}/op_{node}_{k}'] = op
            out[f'{self.label}/input_{node}_{k}'] = [j]
        return out
