r"""The additive latency model of a derived BNAS network on one machine.

A :class:`LatencyModel` holds, for each cell type and each edge of the search cell, the milliseconds
per batch that each candidate op adds to the *derived* network (summed over every cell of that type,
any fitted correction already folded in), plus the fixed part that no architecture choice changes
(stem, preprocess convs, residual convs, head, classifier, concatenations). Two questions use it:

* :meth:`LatencyModel.predict` -- the latency of one genotype: ``fixed_ms`` plus the entry of every edge
  the genotype keeps;
* :meth:`LatencyModel.expected_ms` -- the differentiable expectation under the search's edge
  probabilities, the latency term of the architecture loss (see :mod:`bnas_nni.search.objective`).

Edge rows follow the search alpha matrices (:func:`bnas_nni.search.supernet.alpha_matrices`): node 0's
two inputs, then node 1's three, ... so a cell of ``n`` nodes has :math:`\sum_{i<n}(2+i)` rows. The model
is stored as JSON (:meth:`save` / :meth:`load`); measuring one is :mod:`bnas_nni.latency.profile`'s job.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..errors import ConfigError
from ..genotypes import CELL_TYPES, Genotype
from ..io import atomic_write_text
from ..ops import canonical_op

__all__ = ['LatencyModel', 'FORMAT_VERSION', 'num_edges', 'edge_nodes', 'edge_weights']

#: bumped when the JSON layout changes; :meth:`LatencyModel.load` refuses other versions
FORMAT_VERSION = 1


def num_edges(num_nodes: int) -> int:
    r""":math:`\sum_{i<n}(2+i)` -- the rows of one cell's alpha matrix."""
    return num_nodes * (num_nodes + 3) // 2


def edge_nodes(num_nodes: int) -> List[Tuple[int, int]]:
    """``(node, input)`` of every edge row, node 0-based: ``[(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), ...]``."""
    return [(i, j) for i in range(num_nodes) for j in range(i + 2)]


def edge_weights(num_nodes: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r""":math:`w_e = 2 / (2 + i)` for an edge into node :math:`i`: the share of a node's incoming edges that
    derivation keeps (two of them)."""
    return torch.tensor([2.0 / (2 + i) for i, _ in edge_nodes(num_nodes)], dtype=dtype)


@dataclass(frozen=True)
class LatencyModel:
    """Additive latency of a derived BNAS network on one machine (ms per batch).

    ``edge_ms[t][e, k]`` is what op ``k`` on edge ``e`` of every cell of type ``t`` adds to the network;
    ``fixed_ms`` is the rest. ``meta`` records the machine key (cpu model, isa, threads, batch), the
    network (init_channels, layers, image_size, num_classes, family), the engine version and the fit.
    """

    ops: Tuple[str, ...]
    num_nodes: int
    edge_ms: Mapping[str, torch.Tensor]
    fixed_ms: float
    meta: Mapping[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tables(cls, ops: Sequence[str], num_nodes: int, edge_ms: Mapping[str, Any], fixed_ms: float,
                    meta: Mapping[str, Any] | None = None) -> 'LatencyModel':
        """Validate and freeze tables: ``edge_ms`` maps ``'normal'`` and ``'reduce'`` to array-likes of shape
        ``[num_edges(num_nodes), len(ops)]`` (stored as float64)."""
        ops = tuple(canonical_op(o, where='latency model') for o in ops)
        if len(set(ops)) != len(ops) or not ops:
            raise ConfigError(f'latency model ops {list(ops)} must be a non-empty list without repeats')
        if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1:
            raise ConfigError(f'latency model num_nodes is {num_nodes!r}; it must be a positive integer')
        if set(edge_ms) != set(CELL_TYPES):
            raise ConfigError(f'latency model edge_ms has cell types {sorted(edge_ms)}; expected {list(CELL_TYPES)}')
        shape = (num_edges(num_nodes), len(ops))
        tables: Dict[str, torch.Tensor] = {}
        for t in CELL_TYPES:
            try:
                table = torch.as_tensor(edge_ms[t], dtype=torch.float64).detach().clone()
            except (TypeError, ValueError) as exc:
                raise ConfigError(f'latency model edge_ms[{t!r}] is not a numeric table ({exc})') from None
            if tuple(table.shape) != shape:
                raise ConfigError(f'latency model edge_ms[{t!r}] has shape {tuple(table.shape)}; a cell of '
                                  f'{num_nodes} nodes with {len(ops)} ops needs {shape}')
            if not torch.isfinite(table).all():
                raise ConfigError(f'latency model edge_ms[{t!r}] holds a non-finite entry')
            tables[t] = table
        if isinstance(fixed_ms, bool) or not isinstance(fixed_ms, (int, float)) or not math.isfinite(fixed_ms):
            raise ConfigError(f'latency model fixed_ms is {fixed_ms!r}; it must be a finite number')
        return cls(ops=ops, num_nodes=num_nodes, edge_ms=tables, fixed_ms=float(fixed_ms), meta=dict(meta or {}))

    # ------------------------------------------------------------------ queries

    def predict(self, genotype: Genotype) -> float:
        """Latency (ms per batch) of the network derived from ``genotype``: ``fixed_ms`` plus the entry of
        every kept ``(op, input)`` edge of both cell types."""
        if genotype.num_nodes != self.num_nodes:
            raise ConfigError(f'genotype {genotype.name or "<unnamed>"} has {genotype.num_nodes} nodes per cell; '
                              f'the latency model was built for {self.num_nodes}')
        total = self.fixed_ms
        rows = {pair: r for r, pair in enumerate(edge_nodes(self.num_nodes))}
        for t in CELL_TYPES:
            for idx, (op, j) in enumerate(genotype.cell(t)):
                if op not in self.ops:
                    raise ConfigError(f'genotype {genotype.name or "<unnamed>"} uses op {op!r}, which the latency '
                                      f'model does not cover (its ops: {", ".join(self.ops)}); profile this space')
                total += float(self.edge_ms[t][rows[(idx // 2, j)], self.ops.index(op)])
        return total

    def expected_ms(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r"""Expected latency under edge probabilities, differentiable in ``probs``:

        .. math::

           \mathbb{E}[\mathrm{lat}] = T_{fixed} + \sum_{t \in \{normal, reduce\}} \sum_{e} w_e
               \sum_k p^{t}_{e,k}\, T^{t}_{e,k},\qquad w_e = \frac{2}{2 + i(e)}

        where :math:`p^t_{e} = \mathrm{softmax}(\alpha^t_e)` is edge :math:`e`'s row of ``probs[t]``
        (``[num_edges, len(ops)]``), :math:`T^t` is ``edge_ms[t]`` and :math:`i(e)` the 0-based node the
        edge enters. :math:`w_e` is the chance that derivation keeps the edge (two of the node's
        :math:`2+i` inputs), which is also NNI's expectation for a ``Cell`` node's two ``InputChoice``
        slots under uniform input probabilities. The result is a 0-d tensor in ``probs``' dtype and device.
        """
        missing = [t for t in CELL_TYPES if t not in probs]
        if missing:
            raise ConfigError(f'expected_ms needs probabilities for cell types {missing}')
        ref = probs[CELL_TYPES[0]]
        w = edge_weights(self.num_nodes, ref.dtype).to(ref.device)
        total = torch.zeros((), dtype=ref.dtype, device=ref.device)
        for t in CELL_TYPES:
            p = probs[t]
            table = self.edge_ms[t].to(dtype=p.dtype, device=p.device)
            if tuple(p.shape) != tuple(table.shape):
                raise ConfigError(f'{t} probabilities have shape {tuple(p.shape)}; the latency model expects '
                                  f'{tuple(table.shape)} ({self.num_nodes} nodes, ops {", ".join(self.ops)})')
            total = total + (w * (p * table).sum(-1)).sum()
        return total + self.fixed_ms

    def uniform_ms(self) -> float:
        """Expected latency with every op equally likely (the search's starting point)."""
        k = len(self.ops)
        probs = {t: torch.full_like(self.edge_ms[t], 1.0 / k) for t in CELL_TYPES}
        return float(self.expected_ms(probs))

    # ------------------------------------------------------------------ files

    def to_dict(self) -> Dict[str, Any]:
        return {'format': 'bnas-nni-latency-model', 'version': FORMAT_VERSION, 'ops': list(self.ops),
                'num_nodes': self.num_nodes, 'fixed_ms': self.fixed_ms,
                'edge_ms': {t: self.edge_ms[t].tolist() for t in CELL_TYPES}, 'meta': dict(self.meta)}

    def save(self, path: str | os.PathLike) -> None:
        """Write the model as JSON, atomically (a killed write leaves the previous file intact)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True, default=str) + '\n')

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'LatencyModel':
        """Read a model written by :meth:`save`; a missing or malformed file is one :class:`ConfigError` line
        naming the file and the fix."""
        fix = 're-create it with `bnas-nni latency profile` or point latency_table elsewhere'
        try:
            with open(path, encoding='utf-8') as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f'latency table {path} does not exist; {fix}') from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f'latency table {path} cannot be read ({exc}); {fix}') from None
        if not isinstance(data, dict) or data.get('format') != 'bnas-nni-latency-model':
            raise ConfigError(f'latency table {path} is not a bnas-nni latency model; {fix}')
        if data.get('version') != FORMAT_VERSION:
            raise ConfigError(f'latency table {path} has format version {data.get("version")!r}; this bnas-nni '
                              f'reads version {FORMAT_VERSION}; {fix}')
        try:
            meta = data.get('meta') or {}
            if not isinstance(meta, dict):
                raise ConfigError('meta must be a mapping')
            return cls.from_tables(data['ops'], data['num_nodes'], data['edge_ms'], data['fixed_ms'], meta)
        except KeyError as exc:
            raise ConfigError(f'latency table {path} lacks key {exc.args[0]!r}; {fix}') from None
        except (ConfigError, TypeError, AttributeError) as exc:
            raise ConfigError(f'latency table {path}: {exc}; {fix}') from None
