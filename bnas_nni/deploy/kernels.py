"""Building, loading and choosing the packed engine's C++ kernels.

The extension (``csrc/*.cpp``) is compiled the first time it is needed and cached (see
:mod:`bnas_nni.extensions`); it needs a C++ compiler and ``ninja``.

Three instruction-set paths are compiled into it and one is picked per call: ``avx512`` (AVX512F/BW/DQ/VL
+ AVX512_VPOPCNTDQ), ``avx2`` (popcount by nibble lookup) and ``portable`` (plain C++). The default is
the best one the CPU supports; ``BNAS_DEPLOY_ISA=avx512|avx2|portable`` (or ``auto``) overrides it, and so
does the ``isa`` argument of :func:`bnas_nni.deploy.load`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Tuple

from ..errors import ConfigError
from ..extensions import ExtensionBuildError, load_extension

__all__ = ['ISAS', 'ISA_ENV', 'EngineBuildError', 'extension', 'supported_isas', 'resolve_isa', 'isa_id',
           'conv_output_size']

ISAS = ('portable', 'avx2', 'avx512')
ISA_ENV = 'BNAS_DEPLOY_ISA'
_SOURCES = ('engine.cpp', 'cell.cpp', 'kernels_portable.cpp', 'kernels_avx2.cpp', 'kernels_avx512.cpp',
            'kernels_vnni.cpp')
_EXTENSION_NAME = 'bnas_nni_deploy'


class EngineBuildError(ExtensionBuildError):
    """The C++ extension could not be compiled or loaded (compiler, ninja or headers missing)."""


def _csrc() -> Path:
    return Path(__file__).resolve().parent / 'csrc'


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module (built once per source version, then loaded from torch's cache)."""
    src = _csrc()
    try:
        # -ffp-contract=off: no fused multiply-adds that the float model does not do
        return load_extension(_EXTENSION_NAME, [src / s for s in _SOURCES], include_dirs=[src],
                              extra_cflags=['-fopenmp', '-ffp-contract=off'], extra_ldflags=['-fopenmp'],
                              what='the packed engine')
    except ExtensionBuildError as exc:
        raise EngineBuildError(f'cannot build the packed engine (C++ extension in {src}): {exc}; it needs g++ '
                               'and ninja (pip install ninja)') from None


@functools.lru_cache(maxsize=None)
def supported_isas() -> Tuple[str, ...]:
    """The instruction-set paths this CPU can run, slowest first."""
    return tuple(name for name in ISAS if name in set(extension().supported_isas()))


def resolve_isa(isa: Optional[str] = None) -> str:
    """``isa``, else ``$BNAS_DEPLOY_ISA``, else the fastest supported path; a one-line error if unusable."""
    requested = (isa or os.environ.get(ISA_ENV) or 'auto').strip().lower()
    if requested == 'auto':
        return supported_isas()[-1]
    if requested not in ISAS:
        raise ConfigError(f'unknown instruction set {requested!r} (from {"isa=" if isa else ISA_ENV}); '
                          f'choose auto, {", ".join(ISAS)}')
    if requested not in supported_isas():
        raise ConfigError(f'this CPU cannot run the {requested} path; it supports {", ".join(supported_isas())}')
    return requested


def isa_id(name: str) -> int:
    return ISAS.index(name)


def conv_output_size(n: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution over ``n`` input pixels (PyTorch's rule, which the kernels follow)."""
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
