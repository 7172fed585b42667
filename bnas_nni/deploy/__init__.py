"""Deploying searched binary networks: a packed 1-bit file, a CPU engine for it, and ONNX export.

* :func:`export_packed` / ``bnas-nni export --format packed`` -- a pickle-free ``.bnp`` file (safetensors +
  JSON header): binary conv weights as bits with one scale per filter, the BN before each sign folded into
  exact thresholds, full-precision parts in fp32, the architecture description and a version;
* :func:`load` -- that file as a :class:`PackedNetwork` module (images -> logits) running on the packed
  C++ kernels (AVX-512 VPOPCNTDQ, AVX2 or portable, picked at run time; ``BNAS_DEPLOY_ISA`` forces one);
* :func:`export_onnx` / ``--format onnx`` -- the binarized network as ONNX (Sign before each binary conv,
  ±alpha weights).

Modules: :mod:`.export` (network -> description, the only code that looks inside bnas-nni modules),
:mod:`.fold` (thresholds and bits), :mod:`.format` (the file, its checksum), :mod:`.validate` (every field
of a packed description checked before the engine uses it), :mod:`.runtime` (the runtime module),
:mod:`.kernels` (building the extension, instruction sets), :mod:`.onnx_export`, :mod:`.cli`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..io import atomic_path
from ..networks import build_model
from .runtime import PackedNetwork

__all__ = ['load', 'export_packed', 'export_onnx', 'network_from_checkpoint', 'state_dict_bytes', 'PackedNetwork']


def load(path: str | os.PathLike, isa: Optional[str] = None) -> PackedNetwork:
    """A packed file as a module mapping a float image batch (N x 3 x H x W) to logits."""
    # the writers, readers and checkpoints are imported on use: `bnas-nni --help` imports this package
    from .format import load_packed

    return PackedNetwork(load_packed(path), isa=isa, source=str(path))


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: the fp32 file a packed file is compared with."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def export_packed(model: nn.Module, path: str | os.PathLike) -> Dict[str, Any]:
    """Write ``model`` (a fixed BNAS network, eval semantics) as a packed file, atomically; returns sizes."""
    from .export import binary_part_sizes, describe_network, packed_description
    from .format import save_packed

    desc = describe_network(model)
    packed = packed_description(desc)
    path = save_packed(packed, path)
    return {'path': str(path), 'file_bytes': path.stat().st_size, 'fp32_state_dict_bytes': state_dict_bytes(model),
            **binary_part_sizes(desc, packed)}


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = 17,
                image_size: Optional[int] = None) -> Dict[str, Any]:
    """Write ``model`` as a checked ONNX file (see :mod:`.onnx_export`), atomically; returns its size."""
    from .export import describe_network
    from .onnx_export import network_to_onnx

    proto = network_to_onnx(describe_network(model), opset=opset, image_size=image_size)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return {'path': str(path), 'file_bytes': path.stat().st_size, 'fp32_state_dict_bytes': state_dict_bytes(model)}


def network_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], *, model: Optional[str] = None,
                            official: bool = False, **overrides: Any) -> nn.Module:
    """The network a checkpoint holds, in eval mode, built the way ``bnas-nni eval`` builds it.

    ``checkpoint`` is a file, a run directory (its ``checkpoint.pt``) or a loaded checkpoint. A bnas-nni
    checkpoint alone is enough (:func:`bnas_nni.checkpoints.model_from_checkpoint`). With ``model`` (a name in
    ``search_spaces/models.yaml``) and ``overrides`` (``genotype``, ``layers``, ``init_channels``,
    ``num_classes``, ``precision_rule``, ``dataset``) the network is built from that config and the
    checkpoint loaded strictly into it; ``official=True`` reads the official code's layout and defaults to
    the ``official-2020-08`` precision rule, as ``bnas-nni eval --official`` does.
    """
    from ..checkpoints import detect_layout, load_checkpoint_into, model_from_checkpoint, read_checkpoint
    source = 'checkpoint'
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        obj = read_checkpoint(checkpoint)
    else:
        obj = checkpoint
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if model is None:
        if official:
            raise ConfigError('--official needs --model (bnas-a, bnas-d .. bnas-h) to know which network the file '
                              'holds')
        if overrides:
            raise ConfigError(f'{", ".join(sorted(overrides))} need --model; a bnas-nni checkpoint alone rebuilds '
                              'its own network')
        if detect_layout(obj) != 'bnas-nni':
            raise ConfigError(f'{source} is not a bnas-nni checkpoint; pass --model (and --official for a file of '
                              'the official code)')
        try:
            return model_from_checkpoint(obj)
        except CheckpointError as exc:
            raise CheckpointError(f'{source}: {exc}') from None
    if official:
        overrides.setdefault('precision_rule', 'official-2020-08')
    net = build_model(model, **overrides)
    try:
        load_checkpoint_into(net, obj, layout='official' if official else 'auto')
    except CheckpointError as exc:
        raise CheckpointError(f'{source}: {exc}') from None
    return net.eval()
