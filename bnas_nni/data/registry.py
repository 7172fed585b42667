"""The dataset registry: every dataset bnas-nni can read, by name, in one table.

Search, training, evaluation, search trials and benches all open their data through
:func:`open_dataset`, so a name registered here works everywhere a config says ``dataset: NAME``.
A builder is called as ``builder(options, split, augment=..., subset=...)``:

* ``options``: the data keys of the resolved config (:data:`DATA_KEYS`: ``data``, ``download``,
  ``image_size``, ``val_fraction``, ``mean``, ``std`` ...) as a plain dict;
* ``split``: ``'train'`` or ``'val'``; ``augment``: apply the training augmentation;
  ``subset``: keep only the first N images (None: all);

and returns a map-style dataset of ``(3xHxW float tensor, int label)``. A builder that also takes
``wrap=`` receives ``nni.trace`` (NNI trials) or the identity, and should construct its dataset class
through it so that a trial ships the constructor arguments; any other builder is traced as a whole.
Registering a dataset is one call::

    from bnas_nni.data import register_dataset
    register_dataset('my-set', lambda options, split, augment, subset: MySet(...), num_classes=7)

after which ``bnas-nni search --set imports=[my_module] --set dataset=my-set`` (and ``train``) read it.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError, DatasetError
from ..registry import Registry

__all__ = ['DatasetSpec', 'DatasetInfo', 'DATASETS', 'DATA_KEYS', 'register_dataset', 'get_dataset_spec',
           'dataset_names', 'data_options', 'open_dataset', 'dataset_info', 'traced', 'FAMILIES']

#: network families: ``cifar`` (3x3 stem, small images) or ``imagenet`` (the strided DARTS ImageNet stem)
FAMILIES = ('cifar', 'imagenet')

#: the config keys a dataset builder sees (``options``); everything else of a config stays out of NNI payloads
DATA_KEYS = ('dataset', 'data', 'download', 'image_size', 'val_resize', 'color_jitter', 'val_fraction', 'val_seed',
             'mean', 'std', 'imports')

Builder = Callable[..., Any]


def traced(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``nni.trace(factory)``: instances remember their constructor arguments, so NNI ships those
    instead of pickled tensors. Imports NNI only when called."""
    import nni

    return nni.trace(factory)


@dataclass(frozen=True)
class DatasetInfo:
    """What a network needs to know about a dataset: its classes, the channels of its files, the side
    the network sees, the normalisation; ``details`` holds builder-specific facts (image counts, the
    folder layout) for the run directory's ``dataset.yaml``."""

    name: str
    num_classes: Optional[int]                  # None: the model config's (ImageNet: 1000)
    channels: int = 3                           # of the stored images; the network always gets 3
    image_size: Optional[int] = None            # side the network sees; None: the transform's (ImageNet)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    classes: Optional[List[str]] = None
    details: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        out = {'dataset': self.name, 'num_classes': self.num_classes, 'channels': self.channels,
               'image_size': self.image_size, 'mean': self.mean, 'std': self.std, 'classes': self.classes}
        out.update(self.details)
        return out


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder, network family, whether the search may use it, and either fixed
    facts (``num_classes``, ``image_size``) or an ``info(options) -> DatasetInfo`` that reads them from
    the data. ``image_size`` set: the images have that fixed side and other sizes are a resize view;
    None: the builder applies ``options['image_size']`` itself."""

    name: str
    builder: Builder
    family: str = 'cifar'
    num_classes: Optional[int] = None
    image_size: Optional[int] = 32
    searchable: bool = True
    description: str = ''
    info: Optional[Callable[[Mapping[str, Any]], DatasetInfo]] = None
    search_refusal: str = ''
    channels: int = 3
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    @property
    def takes_wrap(self) -> bool:
        return 'wrap' in inspect.signature(self.builder).parameters


#: name -> DatasetSpec
DATASETS: Registry = Registry('dataset')


def register_dataset(name: str, builder: Builder, *, num_classes: Optional[int] = None, family: str = 'cifar',
                     image_size: Optional[int] = 32, searchable: bool = True, description: str = '',
                     info: Optional[Callable[[Mapping[str, Any]], DatasetInfo]] = None, search_refusal: str = '',
                     channels: int = 3, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     replace: bool = False) -> DatasetSpec:
    """Make ``builder(options, split, augment=, subset=)`` readable as ``dataset: name`` (see the module
    docstring). ``num_classes`` None and no ``info``: counted from the training set's ``classes``.
    ``channels``, ``mean``, ``std``: what the run directory's ``dataset.yaml`` records about fixed sets."""
    if family not in FAMILIES:
        raise ConfigError(f'dataset {name!r}: family must be one of {", ".join(FAMILIES)}, got {family!r}')
    if not callable(builder):
        raise ConfigError(f'dataset {name!r}: the builder must be callable, got {type(builder).__name__}')
    spec = DatasetSpec(name=DATASETS._normalize(name), builder=builder, family=family, num_classes=num_classes,
                       image_size=image_size, searchable=searchable, description=description, info=info,
                       search_refusal=search_refusal, channels=int(channels),
                       mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None)
    DATASETS.register(name, spec, replace=replace)
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset ``name``; an unknown name is one line listing the registered ones."""
    return DATASETS.get(name)


def dataset_names() -> List[str]:
    return DATASETS.names()


def data_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The data keys of a config (:data:`DATA_KEYS`) as a plain dict, the dataset name canonical."""
    options = {k: cfg.get(k) for k in DATA_KEYS}
    options['dataset'] = get_dataset_spec(str(cfg['dataset'])).name
    return options


def _import_plugins(options: Mapping[str, Any]) -> None:
    for module in options.get('imports') or ():
        try:
            importlib.import_module(str(module))
        except ImportError as exc:
            raise ConfigError(f'imports: cannot import {module!r} ({exc}); put it on PYTHONPATH or fix the name') \
                from None


def _build_registered(options: Dict[str, Any], split: str, augment: bool, subset: Optional[int]):
    """A registered dataset by its name in ``options``; module level (and importing ``imports`` first), so
    that an ``nni.trace``d call re-runs in an NNI trial process."""
    _import_plugins(options)
    spec = get_dataset_spec(options['dataset'])
    return spec.builder(options, split, augment=augment, subset=subset)


def open_dataset(cfg: Mapping[str, Any], split: str, *, augment: bool, subset: Optional[int] = None,
                 trace: bool = False):
    """The ``split`` (``train`` or ``val``) of the dataset ``cfg['dataset']`` names, built by its registered
    builder; ``trace=True``: ``nni.trace``d, for NNI trials. Missing or bad data is one
    :class:`~bnas_nni.errors.DatasetError` line."""
    if split not in ('train', 'val'):
        raise ValueError(f'split must be train or val, not {split!r}')
    options = data_options(cfg)
    spec = get_dataset_spec(options['dataset'])
    if spec.takes_wrap:
        wrap = traced if trace else (lambda f: f)
        return spec.builder(options, split, augment=augment, subset=subset, wrap=wrap)
    build = traced(_build_registered) if trace else _build_registered
    return build(options, split, augment, subset)


_INFO_CACHE: Dict[Any, DatasetInfo] = {}


def dataset_info(cfg: Mapping[str, Any]) -> DatasetInfo:
    """Classes, channels, image side and normalisation of the dataset a config names, from the registry
    (fixed facts), the dataset's ``info`` (read from the data: a folder is scanned and checked here,
    so bad data stops a run before its run directory exists), or the training set's ``classes``."""
    options = data_options(cfg)
    spec = get_dataset_spec(options['dataset'])
    if spec.info is not None:
        return spec.info(options)
    fixed = dict(channels=spec.channels, image_size=options.get('image_size') or spec.image_size,
                 mean=list(spec.mean) if spec.mean else None, std=list(spec.std) if spec.std else None)
    if spec.num_classes is not None or spec.family == 'imagenet':
        return DatasetInfo(spec.name, spec.num_classes, **fixed)
    key = repr(sorted(options.items()))
    if key not in _INFO_CACHE:
        train = open_dataset(options, 'train', augment=False)
        classes = getattr(getattr(train, 'dataset', train), 'classes', None)
        if classes is None:
            raise DatasetError(f'dataset {spec.name!r}: its training set has no classes attribute; register it '
                               'with num_classes=K')
        _INFO_CACHE[key] = DatasetInfo(spec.name, len(classes), classes=[str(c) for c in classes], **fixed)
    return _INFO_CACHE[key]
