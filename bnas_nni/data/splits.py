"""Datasets as the commands use them: the search's two halves of the training split, the trainers'
train / val / train-eval sets, and the record of a run's dataset. Every dataset is opened by name
through the registry (:func:`bnas_nni.data.registry.open_dataset`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..errors import DatasetError
from ..io import atomic_write_text, dump_yaml
from .registry import dataset_info, get_dataset_spec, open_dataset, traced

__all__ = ['DatasetView', 'search_splits', 'build_dataset', 'build_datasets', 'record_dataset', 'DATASET_FILE']

#: the file in a run directory that records the dataset the run read
DATASET_FILE = 'dataset.yaml'


class DatasetView:
    """Images ``[start, stop)`` of ``dataset``, optionally resized to ``image_size`` x ``image_size``.

    A view of an ``nni.trace``'d dataset is itself traceable (see :func:`search_splits`), so an NNI trial
    ships a few hundred bytes of constructor arguments instead of tensors. Resizing (bilinear,
    antialiased) lets quick searches run on 16x16 images.
    """

    def __init__(self, dataset: Any, start: int = 0, stop: Optional[int] = None,
                 image_size: Optional[int] = None) -> None:
        n = len(dataset)
        stop = n if stop is None else min(int(stop), n)
        if not 0 <= start < stop:
            raise DatasetError(f'dataset slice [{start}, {stop}) is empty (the dataset has {n} images)')
        self.dataset, self.start, self.stop = dataset, int(start), stop
        self.image_size = int(image_size) if image_size else None
        self.classes = getattr(dataset, 'classes', None)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        x, y = self.dataset[self.start + index]
        if self.image_size is not None and (x.shape[-1] != self.image_size or x.shape[-2] != self.image_size):
            import torch.nn.functional as F

            x = F.interpolate(x.unsqueeze(0), size=(self.image_size, self.image_size), mode='bilinear',
                              align_corners=False, antialias=True).squeeze(0)
        return x, y


def search_splits(cfg: Mapping[str, Any], *, trace: bool = False):
    """``(weight half, architecture half, architecture half without augmentation)`` of the training
    split (the official search never touches the test split): the first ``train_portion`` of the
    (``train_subset`` first) training images train the weights, the rest the architecture.
    ``trace=True`` builds them ``nni.trace``'d, for NNI trials. A dataset registered with
    ``searchable=False`` (ImageNet) is refused in one line."""
    spec = get_dataset_spec(str(cfg['dataset']))
    if not spec.searchable:
        raise DatasetError(f'dataset {spec.name} cannot be searched on'
                           + (f' ({spec.search_refusal})' if spec.search_refusal else ''))
    subset = cfg.get('train_subset')
    aug = open_dataset(cfg, 'train', augment=True, subset=subset, trace=trace)
    plain = open_dataset(cfg, 'train', augment=False, subset=subset, trace=trace)
    n = len(aug)
    split = int(np.floor(n * cfg['train_portion']))
    if split < 1 or split >= n:
        raise DatasetError(f'train_portion {cfg["train_portion"]} leaves an empty half of {n} images')
    view = traced(DatasetView) if trace else DatasetView
    size = cfg.get('image_size')
    return view(aug, 0, split, size), view(aug, split, n, size), view(plain, split, n, size)


def build_dataset(cfg: Mapping[str, Any], split: str, *, trace: bool = False):
    """The ``train`` or ``val`` dataset of a resolved trainer config (keys ``dataset``, ``data``,
    ``train_subset``/``val_subset``, image sizes); ``train-eval`` is the training images with the
    evaluation transform (BN re-estimation: the statistics of what the network sees when evaluated).
    ``trace=True`` returns an ``nni.trace``d instance. A config without ``download`` downloads."""
    if split not in ('train', 'val', 'train-eval'):
        raise ValueError(f'split must be train, val or train-eval, not {split!r}')
    train = split != 'val'
    augment = split == 'train'
    options = dict(cfg)
    options.setdefault('download', True)
    ds = open_dataset(options, 'train' if train else 'val', augment=augment,
                      subset=cfg.get('train_subset' if train else 'val_subset'), trace=trace)
    spec = get_dataset_spec(str(cfg['dataset']))
    size = cfg.get('image_size')
    if spec.image_size is not None and size and size != spec.image_size:     # a fixed-size set at another side
        return (traced(DatasetView) if trace else DatasetView)(ds, image_size=size)
    return ds


def build_datasets(cfg: Mapping[str, Any], *, trace: bool = False):
    """``(train, val)`` datasets for a resolved trainer config; the first problem found is one
    :class:`DatasetError` line."""
    return build_dataset(cfg, 'train', trace=trace), build_dataset(cfg, 'val', trace=trace)


def record_dataset(cfg: Mapping[str, Any], run_dir: str | Path) -> Dict[str, Any]:
    """Write what the run read (classes, channels, image side, mean/std; for a folder its layout and image
    counts) to ``run_dir/dataset.yaml``, atomically; returns it."""
    info = dataset_info(cfg).as_dict()
    atomic_write_text(Path(run_dir) / DATASET_FILE, dump_yaml(info))
    return info


def describe_dataset(cfg: Mapping[str, Any]) -> Optional[str]:
    """One log line about a dataset read from the data (a folder); None for the fixed built-in sets."""
    spec = get_dataset_spec(str(cfg['dataset']))
    if spec.info is None:
        return None
    info = dataset_info(cfg)
    size = f'{info.image_size}x{info.image_size}' if info.image_size else 'its own size'
    return (f'dataset {info.name}: {info.num_classes} classes, {info.channels} channel(s) (fed as 3), {size}, '
            f'mean {info.mean} std {info.std}' + ''.join(f', {k} {v}' for k, v in info.details.items()
                                                         if k in ('root', 'layout', 'train_images', 'val_images')))
