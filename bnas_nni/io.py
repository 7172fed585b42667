"""Atomic file output and YAML input with precise error messages.

Everything that matters (genotypes, checkpoints, resolved configs, metrics) is written to a
temporary file in the destination folder and renamed into place, so a killed job never leaves a
half-written file behind.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import yaml

from .errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def save_yaml(data: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, dump_yaml(data))


def parse_yaml(text: str, source: str = '<string>') -> Any:
    """Parse YAML safely; a syntax error names the source and the line."""
    try:
        return yaml.safe_load(io.StringIO(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f'{source}:{mark.line + 1}' if mark is not None else source
        problem = getattr(exc, 'problem', None) or str(exc).splitlines()[0]
        raise ConfigError(f'malformed YAML at {where}: {problem}; fix the file and retry') from None


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'file not found: {path}; check the path')
    return parse_yaml(path.read_text(), str(path))


def parse_set_items(items: Optional[list]) -> Dict[str, Any]:
    """``--set key=value`` pairs; values are parsed as YAML scalars (``0.1``, ``true``, ``[1, 2]``)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if '=' not in item:
            raise ConfigError(f'--set {item!r}: expected KEY=VALUE')
        key, value = item.split('=', 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out
