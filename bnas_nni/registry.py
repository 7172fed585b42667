"""A registry for named things (quantizers, strategies, recipes), timm/larq style.

Each registry maps a name to an object (usually a class or a factory). A name not found is a one-line
:class:`~bnas_nni.errors.ConfigError` that lists what is registered, so a typo in a YAML file or a
``--set`` flag tells the user what to write instead.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import ConfigError

__all__ = ['Registry', 'canonical_name']

T = TypeVar('T')


def canonical_name(name: str) -> str:
    """Names are case-insensitive and ``_`` equals ``-`` (``binary_darts`` is ``binary-darts``)."""
    return str(name).strip().lower().replace('_', '-')


class Registry(Generic[T]):
    """``name -> object`` with one-line errors; ``kind`` names the things in messages."""

    def __init__(self, kind: str, *, normalize: Callable[[str], str] = canonical_name) -> None:
        self.kind = kind
        self._normalize = normalize
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: Optional[T] = None, *, replace: bool = False):
        """``registry.register('name', obj)``, or as a decorator ``@registry.register('name')``."""
        key = self._normalize(name)

        def add(value: T) -> T:
            if key in self._items and not replace and self._items[key] is not value:
                raise ConfigError(f'{self.kind} {key!r} is already registered; pass replace=True to override it')
            self._items[key] = value
            return value

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = self._normalize(name)
        try:
            return self._items[key]
        except KeyError:
            raise ConfigError(f'unknown {self.kind} {name!r}; choose one of {", ".join(self.names())}') from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
