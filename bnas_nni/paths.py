"""Where the declarative files live: ``search_spaces/`` and ``experiments/`` beside the package."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def search_spaces_dir() -> Path:
    return Path(os.environ.get('BNAS_SEARCH_SPACES', REPO_ROOT / 'search_spaces'))


def genotypes_dir() -> Path:
    return search_spaces_dir() / 'genotypes'


def experiments_dir() -> Path:
    return Path(os.environ.get('BNAS_EXPERIMENTS', REPO_ROOT / 'experiments'))


def resolve_named_file(name_or_path: str | os.PathLike, folder: Path, kind: str) -> Path:
    """A path if it exists, else ``folder/<name>.yaml``; a one-line error lists what is available."""
    from .errors import ConfigError

    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = folder / f'{name_or_path}.yaml'
    if cand.is_file():
        return cand
    known = sorted(f.stem for f in folder.glob('*.yaml')) if folder.is_dir() else []
    raise ConfigError(f'unknown {kind} {str(name_or_path)!r}: not a file and not one of {known}')
