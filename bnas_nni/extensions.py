"""Building and loading the project's C++ extensions (the packed deploy engine, the fused search ops).

Both are compiled with :func:`torch.utils.cpp_extension.load` the first time they are needed and cached by
torch (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); a source change triggers a
rebuild. Building needs a C++ compiler and ``ninja``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import ExtensionBuildError

__all__ = ['ExtensionBuildError', 'load_extension', 'is_built']

_log = logging.getLogger(__name__)


def _cpp():
    # importing cpp_extension on a CPU-only torch logs a warning about CUDA_HOME that does not concern us
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    import torch.utils.cpp_extension as cpp

    return cpp


def _build_dir(cpp, name: str) -> Optional[Path]:
    try:
        return Path(cpp._get_build_directory(name, False))
    except (AttributeError, OSError, TypeError):  # private torch helper moved
        return None


def is_built(name: str) -> bool:
    """Whether torch's cache holds a built copy of extension ``name`` (it may still be rebuilt if stale)."""
    return _built(_build_dir(_cpp(), name), name)


def _built(build_dir: Optional[Path], name: str) -> bool:
    return build_dir is not None and (build_dir / f'{name}.so').exists()


def load_extension(name: str, sources: Sequence[Path], include_dirs: Sequence[Path] = (),
                   extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = (), what: str = '') -> object:
    """Compile (once) and import extension ``name``; raises :class:`ExtensionBuildError` with the first
    compiler error line. ``what``: a few words for the log line printed when it is compiled."""
    cpp = _cpp()
    build_dir = _build_dir(cpp, name)
    _clear_stale_lock(build_dir)
    fresh = not _built(build_dir, name)
    if fresh:
        _log.warning('compiling %s (C++, once per machine and source version)...', what or name)
    start = time.perf_counter()
    try:
        module = cpp.load(name=name, sources=[str(s) for s in sources],
                          extra_include_paths=[str(d) for d in include_dirs],
                          extra_cflags=['-O3', *extra_cflags], extra_ldflags=list(extra_ldflags), verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        errors = [ln for ln in lines if 'error' in ln.lower()]
        raise ExtensionBuildError((errors or lines or [type(exc).__name__])[0][:300]) from None
    if fresh:
        _log.warning('compiled %s in %.0f s', what or name, time.perf_counter() - start)
    return module


def _clear_stale_lock(build_dir: Optional[Path], max_age_s: float = 900.0) -> None:
    """Remove a build lock left by a killed build (torch would wait on it forever); a live build is younger."""
    try:
        lock = build_dir / 'lock' if build_dir is not None else None
        if lock is not None and lock.exists() and time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except OSError:  # a race with another process
        pass
