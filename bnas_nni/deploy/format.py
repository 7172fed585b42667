"""The packed file: safetensors tensors plus a JSON header, loadable without pickle.

A ``.bnp`` file is a `safetensors <https://github.com/huggingface/safetensors>`_ file. Its metadata
entry ``bnas_nni`` holds a JSON header::

    {"format": "bnas-nni-packed", "version": 1,
     "architecture": {...},   # bnas_nni.checkpoints.describe_model: genotype, family, C, L, classes, binarizers
     "network": {...}}        # the packed description (bnas_nni.deploy.export), tensors as {"$tensor": NAME}

and the tensors are named after the module they come from (``cells.3.ops.1.conv.bits``). Binary conv
weights are ``uint8`` bits, one filter per row in [KH][KW][C] order, little-endian within a byte (1 =
negative weight), with a float32 ``alpha`` per filter; the BN before each sign is a float32 ``[2, C]``
pair of thresholds and a bit per channel (``negate``); everything full precision is float32.
Reading never unpickles anything, and a truncated or foreign file gives a one-line
:class:`~bnas_nni.errors.CheckpointError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ..errors import CheckpointError
from ..io import atomic_path

__all__ = ['FORMAT', 'VERSION', 'METADATA_KEY', 'write_packed', 'save_packed', 'load_packed', 'flatten', 'unflatten']

FORMAT = 'bnas-nni-packed'
VERSION = 1
METADATA_KEY = 'bnas_nni'
_REF = '$tensor'


def flatten(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with every tensor moved into ``tensors`` under its dotted path."""
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise ValueError(f'duplicate tensor name {prefix}')
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {_REF: prefix}
    if isinstance(obj, dict):
        return {str(k): flatten(v, f'{prefix}.{k}' if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f'{prefix}.{i}', tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f'cannot store {type(obj).__name__} at {prefix} in a packed file')


def unflatten(obj: Any, tensors: Dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            name = obj[_REF]
            if name not in tensors:
                raise CheckpointError(f'{source}: header names tensor {name!r} that the file does not hold; re-export it')
            return tensors[name]
        return {k: unflatten(v, tensors, source) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors, source) for v in obj]
    return obj


def write_packed(packed: Dict[str, Any], path: str | os.PathLike) -> None:
    """Write a packed description (:func:`bnas_nni.deploy.export.packed_description`) to ``path`` as it is."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    header = {'format': FORMAT, 'version': VERSION, 'architecture': packed['architecture'],
              'network': flatten(packed['network'], '', tensors)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header, allow_nan=False)})


def save_packed(packed: Dict[str, Any], path: str | os.PathLike) -> Path:
    """:func:`write_packed` through a temporary file renamed into place (no half-written file on failure)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_packed(packed, tmp)
    return path


def _read(path: Path) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f'cannot read packed model {path}: not a complete safetensors file ({first}); '
                              're-export it with bnas-nni export') from None
    return metadata, tensors


def load_packed(path: str | os.PathLike) -> Dict[str, Any]:
    """``{'format', 'version', 'architecture', 'network'}`` with tensors in place; one-line errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'packed model not found: {path}; check the path')
    metadata, tensors = _read(path)
    if METADATA_KEY not in metadata:
        raise CheckpointError(f'{path} is a safetensors file but not a bnas-nni packed model (no {METADATA_KEY!r} '
                              'header); create one with bnas-nni export --format packed')
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f'{path}: malformed packed-model header ({exc.msg}); re-export it') from None
    if not isinstance(header, dict) or header.get('format') != FORMAT:
        raise CheckpointError(f'{path}: header format is not {FORMAT!r}; re-export it')
    version = header.get('version')
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(f'{path} has packed format version {version!r}; this bnas-nni reads version {VERSION}; '
                              'upgrade bnas-nni or re-export the model')
    if not isinstance(header.get('network'), dict):
        raise CheckpointError(f'{path}: header has no network description; re-export it')
    header['network'] = unflatten(header['network'], tensors, str(path))
    return header
