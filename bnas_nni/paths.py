"""Where the declarative files live.

``search_spaces/`` (spaces, genotypes, model configs) is package data: the top-level folder of a checkout,
installed as ``bnas_nni/search_spaces`` by ``pip install .``. ``experiments/`` (run presets) stays a folder
of paths in a checkout. ``BNAS_SEARCH_SPACES`` and ``BNAS_EXPERIMENTS`` point elsewhere.

Named genotypes are looked up in the shipped folder and in ``./genotypes`` (where an installed package
saves ``--save NAME`` results, since site-packages is not a place to write); a checkout saves into its
own ``search_spaces/genotypes``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
_CHECKOUT = (REPO_ROOT / 'search_spaces').is_dir() and (REPO_ROOT / 'pyproject.toml').is_file()


def search_spaces_dir() -> Path:
    if os.environ.get('BNAS_SEARCH_SPACES'):
        return Path(os.environ['BNAS_SEARCH_SPACES'])
    return REPO_ROOT / 'search_spaces' if _CHECKOUT else PACKAGE_DIR / 'search_spaces'


def genotypes_dir() -> Path:
    """Where ``--save`` writes by default: the checkout's genotype folder, else ``./genotypes``."""
    if _CHECKOUT or os.environ.get('BNAS_SEARCH_SPACES'):
        return search_spaces_dir() / 'genotypes'
    return Path.cwd() / 'genotypes'


def genotype_folders() -> List[Path]:
    """Where genotype names are looked up, in order."""
    folders = [search_spaces_dir() / 'genotypes', genotypes_dir()]
    return list(dict.fromkeys(folders))


def experiments_dir() -> Path:
    return Path(os.environ.get('BNAS_EXPERIMENTS', REPO_ROOT / 'experiments'))


def resolve_named_file(name_or_path: str | os.PathLike, folder: Path | List[Path], kind: str) -> Path:
    """A path if it exists, else ``<folder>/<name>.yaml``; a one-line error lists what is available."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    folders = folder if isinstance(folder, list) else [folder]
    for f in folders:
        cand = f / f'{name_or_path}.yaml'
        if cand.is_file():
            return cand
    known = sorted({c.stem for f in folders if f.is_dir() for c in f.glob('*.yaml')})
    raise ConfigError(f'unknown {kind} {str(name_or_path)!r}: not a file and not one of {known}')
