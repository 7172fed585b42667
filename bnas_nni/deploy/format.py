"""The packed file: safetensors tensors plus a JSON header, loadable without pickle.

A ``.bnp`` file is a `safetensors <https://github.com/huggingface/safetensors>`_ file. Its metadata
entry ``bnas_nni`` holds a JSON header::

    {"format": "bnas-nni-packed", "version": 2 or 3,
     "architecture": {...},   # bnas_nni.checkpoints.describe_model: genotype, family, C, L, classes, binarizers
     "network": {...}}        # the packed description (bnas_nni.deploy.export), tensors as {"$tensor": NAME}

and the tensors are named after the module they come from (``cells.3.ops.1.conv.bits``). Binary conv
weights are ``uint8`` bits, one filter per row in [KH][KW][C] order, little-endian within a byte (1 =
negative weight), with a float32 ``alpha`` per filter; the BN before each sign is a float32 ``[2, C]``
pair of thresholds and a bit per channel (``negate``); everything full precision is float32.

Version 3 adds the react block's fields to a unit: ``prelu`` (``slope`` and, for RPReLU, the shifts
``gamma`` and ``zeta``, float32 per output channel) and ``shortcut`` (``identity`` or ``avg_pool``); RSign's
threshold is folded into the thresholds. A file is written as version 2 when it uses none of them (a
paper-block network: the same bytes as before, readable by older bnas-nni), else as version 3, which older
bnas-nni refuse instead of running it without the new parts.

The metadata entry ``bnas_nni_sha256`` is the SHA-256 of the header text and of every tensor (name,
dtype, shape, bytes; in name order), checked on reading: a damaged or edited file is refused before
anything is built from it. Version 1 files (no checksum) are refused with a request to re-export; the
engine then checks every field of the header (:mod:`.validate`), which also covers a file whose
checksum was recomputed after an edit. Reading never unpickles anything, and a truncated, damaged or
foreign file gives a one-line :class:`~bnas_nni.errors.CheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..errors import CheckpointError
from ..io import atomic_path

__all__ = ['FORMAT', 'VERSION', 'BASE_VERSION', 'needed_version',
           'METADATA_KEY', 'CHECKSUM_KEY', 'write_packed', 'save_packed', 'load_packed',
           'checksum', 'flatten', 'unflatten']

FORMAT = 'bnas-nni-packed'
#: the newest version this bnas-nni reads and writes. 3: the react block's unit fields (``prelu``, ``shortcut``);
#: 2: a checksum of the header and the tensors (``CHECKSUM_KEY``); 1: none (refused: re-export)
VERSION = 3
#: the oldest version read; also what a network without react fields is written as
BASE_VERSION = 2
METADATA_KEY = 'bnas_nni'
CHECKSUM_KEY = 'bnas_nni_sha256'
_REEXPORT = 're-export it with bnas-nni export'
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


def unflatten(obj: Any, tensors: Dict[str, torch.Tensor], source: str, where: str = '') -> Any:
    """``obj`` with every ``{"$tensor": NAME}`` replaced by that tensor (``where``: its field, for errors)."""
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            name = obj[_REF]
            if not isinstance(name, str) or name not in tensors:
                shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + '...'
                raise CheckpointError(f'{source}: {where or "header"} names tensor {shown} that the file does not '
                                      f'hold; {_REEXPORT}')
            return tensors[name]
        return {k: unflatten(v, tensors, source, f'{where}.{k}' if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors, source, f'{where}[{i}]') for i, v in enumerate(obj)]
    return obj


def checksum(header_text: str, tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the header text and of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(header_text.encode('utf-8'))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b''
        h.update(f'\0{name}\0{t.dtype}\0{list(t.shape)}\0{t.numel() * t.element_size()}\0'.encode('utf-8'))
        h.update(data)
    return h.hexdigest()


def _units(obj: Any):
    if isinstance(obj, dict):
        if obj.get('type') == 'unit':
            yield obj
        for v in obj.values():
            yield from _units(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _units(v)


def needed_version(network: Dict[str, Any]) -> int:
    """The oldest format version that holds ``network``: 3 if a unit has react fields, else 2."""
    react = any(u.get('prelu') is not None or u.get('shortcut') is not None for u in _units(network))
    return VERSION if react else BASE_VERSION


def write_packed(packed: Dict[str, Any], path: str | os.PathLike) -> None:
    """Write a packed description (:func:`bnas_nni.deploy.export.packed_description`) to ``path`` as it is
    (created with the usual permissions, 0666 less the umask, as every other output)."""
    tensors: Dict[str, torch.Tensor] = {}
    header = {'format': FORMAT, 'version': needed_version(packed['network']), 'architecture': packed['architecture'],
              'network': flatten(packed['network'], '', tensors)}
    text = json.dumps(header, allow_nan=False)
    data = save(tensors, metadata={METADATA_KEY: text, CHECKSUM_KEY: checksum(text, tensors)})
    Path(path).write_bytes(data)   # safetensors' own save_file creates the file 0600


def save_packed(packed: Dict[str, Any], path: str | os.PathLike) -> Path:
    """:func:`write_packed` through a temporary file renamed into place (no half-written file on failure)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_packed(packed, tmp)
    return path


def _read(path: Path) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
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
    text = metadata[METADATA_KEY]
    try:
        header = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:   # JSONDecodeError, NaN/Infinity, absurd nesting
        reason = (exc.msg if isinstance(exc, json.JSONDecodeError) else
                  str(exc) if isinstance(exc, ValueError) else 'nested too deeply')
        raise CheckpointError(f'{path}: malformed packed-model header ({reason}); {_REEXPORT}') from None
    if not isinstance(header, dict) or header.get('format') != FORMAT:
        raise CheckpointError(f'{path}: header format is not {FORMAT!r}; {_REEXPORT}')
    version = header.get('version')
    if type(version) is int and 1 <= version < BASE_VERSION:
        raise CheckpointError(f'{path} has packed format version {version}, written by an older bnas-nni without '
                              f'a checksum; {_REEXPORT} (this bnas-nni reads versions {BASE_VERSION} to {VERSION})')
    if type(version) is not int or not BASE_VERSION <= version <= VERSION:
        raise CheckpointError(f'{path} has packed format version {version!r}; this bnas-nni reads versions '
                              f'{BASE_VERSION} to {VERSION}; upgrade bnas-nni or re-export the model')
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        raise CheckpointError(f'{path}: packed model without a checksum ({CHECKSUM_KEY!r}); {_REEXPORT}')
    if stored != checksum(text, tensors):
        raise CheckpointError(f'{path}: checksum mismatch: the file was damaged or changed after export; '
                              f'{_REEXPORT}')
    if not isinstance(header.get('network'), dict):
        raise CheckpointError(f'{path}: header has no network description; {_REEXPORT}')
    try:
        header['network'] = unflatten(header['network'], tensors, str(path))
    except RecursionError:
        raise CheckpointError(f'{path}: malformed packed-model header (nested too deeply); {_REEXPORT}') from None
    return header


def _no_constant(name: str) -> Any:
    raise ValueError(f'{name} is not a number the header may hold')
