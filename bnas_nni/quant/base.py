"""What every quantizer is: an ``nn.Module`` owned by its layer that knows its precision.

Quantizers are looked up by name, by class or given as configured instances, larq style:

* ``'ste_sign'`` -- a name in :data:`ACTIVATIONS` or :data:`WEIGHT_BINARIZERS`;
* ``{'name': 'rsign', 'init': 0.0}`` -- a name plus constructor options (from YAML or ``--set``);
* a :class:`Quantizer` subclass, or an instance (copied, so that two layers never share state).

:func:`make_quantizer` turns any of these into a fresh module for one layer. Each module declares
``precision`` (bits of its output; 32 means full precision, which the summary counts as FLOPs) and
``stateless`` (no parameters or buffers and no per-layer configuration beyond its options, so the fast
search cell may share one result between the layers reading the same tensor).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry

__all__ = ['Quantizer', 'QuantizerSpec', 'make_quantizer', 'quantizer_spec', 'snake_name', 'class_registrar']

QuantizerSpec = Union[None, str, Mapping[str, Any], Type['Quantizer'], 'Quantizer']


def snake_name(name: str) -> str:
    """Quantizer names are snake case; ``ste-sign`` and ``STE_Sign`` both mean ``ste_sign``."""
    return str(name).strip().lower().replace('-', '_')


def class_registrar(registry: Registry):
    """``register(name)``: a class decorator that names a quantizer class and adds it to ``registry``."""
    def register(name: str):
        def deco(cls):
            cls.name = name
            registry.register(name, cls)
            return cls
        return deco
    return register


class Quantizer(nn.Module):
    """Base class. Subclasses set ``name``, ``precision`` and ``stateless`` and store their options as
    attributes named like their constructor arguments (so :meth:`options` can report them)."""

    name: ClassVar[str] = ''
    precision: ClassVar[int] = 32
    stateless: ClassVar[bool] = True
    #: constructor options (besides ``channels``) that describe this instance
    option_names: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, channels: Optional[int] = None) -> None:
        super().__init__()
        self.channels = channels

    def options(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.option_names}

    def spec(self) -> Dict[str, Any]:
        """A plain mapping that rebuilds this quantizer with :func:`make_quantizer` (for configs and checkpoints)."""
        return {'name': self.name, **self.options()}

    def share_key(self) -> Optional[Tuple]:
        """Equal keys mean interchangeable modules (same class and options, no state); None if stateful."""
        if not self.stateless:
            return None
        return (type(self), tuple(sorted(self.options().items())))

    def extra_repr(self) -> str:
        return ', '.join(f'{k}={v!r}' for k, v in self.options().items())


def _parse(spec: Any, where: str) -> Tuple[Any, Dict[str, Any]]:
    if isinstance(spec, Mapping):
        if 'name' not in spec:
            raise ConfigError(f'{where}: a quantizer mapping needs a name, e.g. {{name: rsign, init: 0.0}}')
        return spec['name'], {str(k): v for k, v in spec.items() if k != 'name'}
    return spec, {}


def make_quantizer(spec: QuantizerSpec, registry: Registry, *, channels: Optional[int] = None,
                   where: str = 'quantizer') -> Optional[Quantizer]:
    """A new quantizer module for one layer; ``None`` (or ``'none'``) means full precision."""
    if spec is None or (isinstance(spec, str) and snake_name(spec) == 'none'):
        return None
    if isinstance(spec, Quantizer):
        q = copy.deepcopy(spec)
        if q.channels is None:
            q.channels = channels
        return q
    target, options = _parse(spec, where)
    cls = registry.get(target) if isinstance(target, str) else target
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise ConfigError(f'{where}: {target!r} is not a {registry.kind} (a name, a Quantizer class or instance)')
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params) - {'self', 'channels'})
        if unknown:
            raise ConfigError(f'{where}: {cls.name or cls.__name__} does not take {", ".join(unknown)} '
                              f'(options: {", ".join(cls.option_names) or "none"})')
    return cls(channels=channels, **options)


def quantizer_spec(q: Optional[Quantizer]) -> Any:
    """The YAML form of a layer's quantizer: its name when its options are the defaults, else a mapping."""
    if q is None:
        return None
    try:
        default = type(q)(channels=q.channels).options()
    except TypeError:  # options without defaults
        default = None
    return q.name if q.options() == default else q.spec()
