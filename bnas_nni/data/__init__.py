"""Datasets by name, for search, training, evaluation, NNI trials and benches alike.

One registry (:mod:`.registry`) maps a name to a builder; ``dataset: NAME`` in any config reads it:

* built in (:mod:`.builtin`): ``cifar10``, ``cifar100``, ``svhn``, ``mnist`` (torchvision; downloaded where
  the machine can), ``fashion-mnist`` (offline, Debian's idx files), ``imagenet`` (:mod:`.imagenet`, the
  official integer-label folders);
* ``folder`` (:mod:`.folder`): any image folder in the ``ImageFolder`` layout, its classes, channels,
  image size and mean/std read from the data;
* :func:`register_dataset` for user code (``imports: [my_module]`` in a config loads it).

:mod:`.splits` turns a config into the search's halves and the trainers' sets; :mod:`.cli` is
``bnas-nni data``. Constructors are plain classes/functions; :func:`traced` wraps one with ``nni.trace`` so
an NNI evaluator serialises only its arguments (trial payloads must stay under 64 KB).
"""
from __future__ import annotations

from .builtin import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_MEAN,
    CIFAR_STD,
    DEBIAN_FASHION_MNIST,
    FASHION_CLASSES,
    FASHION_MEAN,
    FASHION_STD,
    MNIST_MEAN,
    MNIST_STD,
    SVHN_MEAN,
    SVHN_STD,
    FashionMNIST32,
    cifar10,
    cifar100,
    cifar_transforms,
    fashion_mnist_root,
    mnist,
    svhn,
)
from .cli import register
from .folder import CACHE_FILE, FolderDataset, FolderScan, folder_info, scan_folder
from .imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_imagenet_layout,
    imagenet_folder,
    imagenet_transforms,
    prepare_imagenet,
)
from .registry import (
    DATA_KEYS,
    DATASETS,
    DatasetInfo,
    DatasetSpec,
    data_options,
    dataset_info,
    dataset_names,
    get_dataset_spec,
    open_dataset,
    register_dataset,
    traced,
)
from .splits import (
    DATASET_FILE,
    DatasetView,
    build_dataset,
    build_datasets,
    describe_dataset,
    record_dataset,
    search_splits,
)

__all__ = ['CIFAR_MEAN', 'CIFAR_STD', 'CIFAR100_MEAN', 'CIFAR100_STD', 'SVHN_MEAN', 'SVHN_STD', 'MNIST_MEAN',
           'MNIST_STD', 'FASHION_MEAN', 'FASHION_STD', 'FASHION_CLASSES', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'DEBIAN_FASHION_MNIST', 'fashion_mnist_root', 'FashionMNIST32', 'cifar10', 'cifar100', 'svhn', 'mnist',
           'cifar_transforms', 'imagenet_transforms', 'imagenet_folder', 'check_imagenet_layout', 'prepare_imagenet',
           'CACHE_FILE', 'FolderDataset', 'FolderScan', 'folder_info', 'scan_folder',
           'DATA_KEYS', 'DATASETS', 'DatasetInfo', 'DatasetSpec', 'data_options', 'dataset_info', 'dataset_names',
           'get_dataset_spec', 'open_dataset', 'register_dataset', 'traced',
           'DATASET_FILE', 'DatasetView', 'build_dataset', 'build_datasets', 'describe_dataset', 'record_dataset',
           'search_splits', 'register']
