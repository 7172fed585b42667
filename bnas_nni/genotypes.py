"""Genotypes: the discrete description of a BNAS cell pair, as data.

A genotype lists, for each of the normal and reduction cells, two ``(op, input)`` entries per
intermediate node (inputs 0 and 1 are the cell inputs c_{k-2} and c_{k-1}; node ``i`` is state
``i + 2``). It converts losslessly to and from NNI's architecture dict
(``normal/op_2_0``, ``normal/input_2_0`` ...), lives in ``search_spaces/genotypes/*.yaml`` and is
derived from architecture weights by :func:`derive_genotype` (the BNAS rule: Zeroise counts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .errors import ConfigError
from .io import load_yaml, save_yaml
from .ops import PRIMITIVES, canonical_op
from .paths import genotype_folders, resolve_named_file

__all__ = ['Genotype', 'CELL_TYPES', 'load_genotype', 'save_genotype', 'derive_genotype', 'list_genotypes']

CELL_TYPES = ('normal', 'reduce')
Entry = Tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    normal: Tuple[Entry, ...]
    reduce: Tuple[Entry, ...]
    normal_concat: Tuple[int, ...] = ()
    reduce_concat: Tuple[int, ...] = ()
    name: str = field(default='', compare=False)

    def __post_init__(self) -> None:
        for cell in CELL_TYPES:
            entries = tuple((canonical_op(op, where=f'genotype {self.name or "<unnamed>"} ({cell} cell)'), int(j))
                            for op, j in getattr(self, cell))
            object.__setattr__(self, cell, entries)
            if len(entries) % 2:
                raise ConfigError(f'{cell} cell of genotype {self.name!r} has {len(entries)} entries; '
                                  'expected two (op, input) entries per node')
            for i, (_, j) in enumerate(entries):
                node = i // 2 + 2
                if not 0 <= j < node:
                    raise ConfigError(f'{cell} cell of genotype {self.name!r}: node {node} takes input {j}; '
                                      f'inputs must be in 0..{node - 1}')
            concat = tuple(getattr(self, f'{cell}_concat') or range(2, 2 + self.num_nodes))
            for c in concat:
                if not _is_index(c) or not 0 <= c < 2 + self.num_nodes:
                    raise ConfigError(f'{cell}_concat of genotype {self.name!r} names state {c!r}; a cell with '
                                      f'{self.num_nodes} nodes has states 0..{1 + self.num_nodes} (the nodes are '
                                      f'{2}..{1 + self.num_nodes})')
            object.__setattr__(self, f'{cell}_concat', tuple(int(c) for c in concat))
        if len(self.normal) != len(self.reduce):
            raise ConfigError(f'genotype {self.name!r}: normal and reduce cells have different node counts')

    @property
    def num_nodes(self) -> int:
        return len(self.normal) // 2

    def cell(self, cell_type: str) -> Tuple[Entry, ...]:
        return getattr(self, cell_type)

    def ops_used(self) -> set:
        return {op for cell in CELL_TYPES for op, _ in self.cell(cell)}

    # ----------------------------------------------------------------- NNI architecture dict

    def to_arch_dict(self, labels: Sequence[str] = CELL_TYPES) -> Dict[str, Any]:
        """``{'normal/op_2_0': 'bin_conv_3x3', 'normal/input_2_0': [1], ...}`` (NNI ``Cell`` labels)."""
        arch: Dict[str, Any] = {}
        for label, cell in zip(labels, CELL_TYPES):
            for idx, (op, j) in enumerate(self.cell(cell)):
                node, k = idx // 2 + 2, idx % 2
                arch[f'{label}/op_{node}_{k}'] = op
                arch[f'{label}/input_{node}_{k}'] = [j]
        return arch

    @classmethod
    def from_arch_dict(cls, arch: Mapping[str, Any], labels: Sequence[str] = CELL_TYPES, name: str = '') -> 'Genotype':
        cells: Dict[str, List[Entry]] = {}
        for label, cell in zip(labels, CELL_TYPES):
            entries: List[Entry] = []
            node = 2
            while f'{label}/op_{node}_0' in arch:
                for k in (0, 1):
                    try:
                        op = arch[f'{label}/op_{node}_{k}']
                        inp = arch[f'{label}/input_{node}_{k}']
                    except KeyError as exc:
                        raise ConfigError(f'architecture dict lacks {exc.args[0]!r}') from None
                    if isinstance(inp, (list, tuple)):
                        if len(inp) != 1:
                            raise ConfigError(f'{label}/input_{node}_{k} must choose one input, got {inp}')
                        inp = inp[0]
                    entries.append((op, int(inp)))
                node += 1
            if not entries:
                raise ConfigError(f'architecture dict has no {label!r} cell (expected keys like {label}/op_2_0)')
            cells[cell] = entries
        return cls(normal=tuple(cells['normal']), reduce=tuple(cells['reduce']), name=name)

    # ----------------------------------------------------------------- YAML

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {'name': self.name} if self.name else {}
        for cell in CELL_TYPES:
            out[cell] = [[op, j] for op, j in self.cell(cell)]
            out[f'{cell}_concat'] = list(getattr(self, f'{cell}_concat'))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = '') -> 'Genotype':
        if not isinstance(data, Mapping) or 'normal' not in data or 'reduce' not in data:
            raise ConfigError(f'genotype {name!r} must be a mapping with "normal" and "reduce" lists')
        cells: Dict[str, Tuple[Entry, ...]] = {}
        for c in CELL_TYPES:
            if not isinstance(data[c], (list, tuple)):
                raise ConfigError(f'genotype {name!r}: {c} must be a list of [op, input] entries')
            entries = []
            for k, e in enumerate(data[c]):
                if not (isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and _is_index(e[1])):
                    raise ConfigError(f'genotype {name!r}: {c} entry {k} (node {k // 2}) is {e!r}; each entry must be '
                                      '[op, input] with an integer input, e.g. [bin_conv_3x3, 1]')
                entries.append((e[0], e[1]))
            cells[c] = tuple(entries)
        concats = {}
        for key in ('normal_concat', 'reduce_concat'):
            value = data.get(key)
            if value is not None and (not isinstance(value, (list, tuple)) or not value
                                      or not all(_is_index(v) for v in value)):
                raise ConfigError(f'genotype {name!r}: {key} is {value!r}; list the states to concatenate as '
                                  'integers, e.g. [2, 3, 4, 5], or leave the key out for all nodes')
            concats[key] = tuple(value or ())
        return cls(normal=cells['normal'], reduce=cells['reduce'], **concats, name=str(data.get('name') or name))

    def __str__(self) -> str:
        fmt = lambda cell: ', '.join(f'{op}<-{j}' for op, j in self.cell(cell))
        return f'Genotype({self.name or "?"}: normal=[{fmt("normal")}], reduce=[{fmt("reduce")}])'


def _is_index(value: Any) -> bool:
    """An integer as YAML writes it: ``'0'`` and ``1.5`` are not (``True`` neither)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def list_genotypes() -> List[str]:
    return sorted({p.stem for folder in genotype_folders() for p in folder.glob('*.yaml')})


def load_genotype(name_or_path: str | os.PathLike) -> Genotype:
    """Load a genotype by name (``search_spaces/genotypes/NAME.yaml``) or from a YAML path."""
    if isinstance(name_or_path, Genotype):
        return name_or_path
    path = resolve_named_file(name_or_path, genotype_folders(), 'genotype')
    data = load_yaml(path)
    try:
        return Genotype.from_dict(data, name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f'{path}: {exc}') from None


def save_genotype(genotype: Genotype, path: str | os.PathLike, **meta: Any) -> Path:
    """Write a genotype YAML atomically (never into Python sources)."""
    path = Path(path)
    data = genotype.to_dict()
    data['name'] = genotype.name or path.stem
    if meta:
        data['meta'] = meta
    save_yaml(data, path)
    return path


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _parse_cell(probs: np.ndarray, ops: Sequence[str], num_nodes: int) -> List[Entry]:
    gene: List[Entry] = []
    start = 0
    for i in range(num_nodes):
        rows = probs[start:start + i + 2]
        # stable sort: ties keep the lower input index first, as in the official code
        strongest = sorted(range(i + 2), key=lambda j: -rows[j].max())[:2]
        for j in strongest:
            gene.append((ops[int(np.argmax(rows[j]))], j))
        start += i + 2
    return gene


def derive_genotype(alpha_normal: Any, alpha_reduce: Any, ops: Sequence[str] = PRIMITIVES, *, gamma: float = 1.0,
                    gamma_rule: str = 'zeroise', name: str = '') -> Genotype:
    """The BNAS derivation: per node, keep the two incoming edges with the largest softmax weight
    *including* Zeroise, and on each take the argmax op, Zeroise included.

    ``alpha_*`` are logits of shape [num_edges, len(ops)] (edges ordered node by node, inputs
    ascending). ``gamma`` > 1 makes Zeroise less likely (the ImageNet transfer rule): with
    ``gamma_rule='zeroise'`` (default, the intended rule) Zeroise's probability is divided by gamma on
    every edge; ``gamma_rule='official'`` reproduces the released code, which divides edge 0's row
    and so changes nothing but the order of node 0's entries.
    """
    ops = tuple(canonical_op(o) for o in ops)
    cells = {}
    for cell, alpha in zip(CELL_TYPES, (alpha_normal, alpha_reduce)):
        a = np.asarray(getattr(alpha, 'detach', lambda: alpha)().cpu() if hasattr(alpha, 'cpu') else alpha,
                       dtype=np.float64)
        num_edges = a.shape[0]
        num_nodes = int((np.sqrt(9 + 8 * num_edges) - 3) / 2)
        if num_nodes * (num_nodes + 3) // 2 != num_edges or a.shape[1] != len(ops):
            raise ConfigError(f'alpha of shape {tuple(a.shape)} does not fit a cell with {len(ops)} ops')
        probs = _softmax(a)
        if gamma != 1.0:
            if gamma_rule == 'zeroise':
                if 'zeroise' in ops:
                    probs[:, ops.index('zeroise')] /= gamma
            elif gamma_rule == 'official':
                probs[0, :] /= gamma
            else:
                raise ConfigError(f'unknown gamma_rule {gamma_rule!r}; choose zeroise or official')
        cells[cell] = _parse_cell(probs, ops, num_nodes)
    return Genotype(normal=tuple(cells['normal']), reduce=tuple(cells['reduce']), name=name)
