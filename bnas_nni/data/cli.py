"""``bnas-nni data``: fetch, prepare, describe and check datasets."""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from .builtin import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, FashionMNIST32, cifar10, fashion_mnist_root
from .folder import CACHE_FILE, scan_folder
from .imagenet import _subfolders, check_imagenet_layout, prepare_imagenet
from .registry import DATASETS, get_dataset_spec

__all__ = ['register']


def _cmd_cifar10(args: argparse.Namespace) -> int:
    for train in (True, False):
        ds = cifar10(args.root, train=train, download=True)
        print(f'CIFAR-10 {"train" if train else "test"}: {len(ds)} images under {args.root}')
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    prepare_imagenet(args.path, val_only=args.val_only, synsets=args.synsets)
    for split in (['val'] if args.val_only else ['train', 'val']):
        folder = check_imagenet_layout(args.path, split)
        print(f'{folder}: {len(_subfolders(folder))} classes ready')
    return 0


def _cmd_fashion(args: argparse.Namespace) -> int:
    folder = fashion_mnist_root(args.root)
    for train in (True, False):
        ds = FashionMNIST32(str(folder), train=train)
        counts = np.bincount(ds.targets.numpy(), minlength=10)
        print(f'Fashion-MNIST-32x3 {"train" if train else "test"}: {len(ds)} images, 10 classes '
              f'({counts.min()}..{counts.max()} per class), 3x32x32, mean {FASHION_MEAN[0]} std {FASHION_STD[0]}, '
              f'from {folder}')
    print('classes: ' + ', '.join(FASHION_CLASSES))
    print('use it with: bnas-nni train --config experiments/train_quick_fashion.yaml  (not comparable to CIFAR-10)')
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for name in DATASETS.names():
        spec = get_dataset_spec(name)
        classes = spec.num_classes if spec.num_classes is not None else ('1000' if spec.family == 'imagenet' else
                                                                         'read')
        search = '' if spec.searchable else ', not searchable'
        print(f'{name:<16} {classes:>5} classes  {spec.family} network{search}  {spec.description}')
    return 0


def _cmd_folder(args: argparse.Namespace) -> int:
    scan = scan_folder(args.path, val_fraction=args.val_fraction, val_seed=args.val_seed, image_size=args.image_size)
    size = f'{scan.native_size[0]}x{scan.native_size[1]}' if scan.native_size else 'mixed sizes'
    print(f'{scan.root}: {len(scan.classes)} classes, {len(scan.train)} train / {len(scan.val)} val images '
          f'({scan.layout}), {scan.channels} channel(s), {size} -> {scan.image_size}x{scan.image_size}')
    print(f'mean {scan.mean} std {scan.std} ({scan.stats_source}; cached in {scan.root / CACHE_FILE})')
    print('classes: ' + ', '.join(scan.classes[:20]) + (' ...' if len(scan.classes) > 20 else ''))
    print(f'use it with: --set dataset=folder --set data={scan.root}')
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni data {cifar10,prepare-imagenet,fashion-mnist,list,folder}``."""
    p = subparsers.add_parser('data', help='fetch or prepare datasets', description='Fetch or prepare datasets.')
    sub = p.add_subparsers(dest='data_command', metavar='DATASET')
    c = sub.add_parser('cifar10', help='download CIFAR-10 with torchvision')
    c.add_argument('--root', default='data/cifar10', help='target folder (default: data/cifar10)')
    c.set_defaults(func=_cmd_cifar10)
    i = sub.add_parser('prepare-imagenet', help='rename synset folders to the integer-label layout',
                       description=prepare_imagenet.__doc__.split('\n\n')[0])
    i.add_argument('path', help='ImageNet root with train/ and val/ synset folders')
    i.add_argument('--val-only', action='store_true', help='only val/ is present')
    i.add_argument('--synsets', default=None, help='file with one WordNet id per line (line number = label)')
    i.set_defaults(func=_cmd_prepare)
    ls = sub.add_parser('list', help='the registered datasets (names for dataset:)')
    ls.set_defaults(func=_cmd_list)
    d = sub.add_parser('folder', help='check an ImageFolder tree and compute its mean/std (cached beside it)',
                       description='Check an image folder (train/ and val/, or class folders split by '
                                   '--val-fraction) as dataset: folder reads it, and print what it found.')
    d.add_argument('path', help='folder with train/ and val/ class folders, or class folders')
    d.add_argument('--val-fraction', type=float, default=0.1, help='held-out fraction without val/ (default 0.1)')
    d.add_argument('--val-seed', type=int, default=0, help='seed of that split (default 0)')
    d.add_argument('--image-size', type=int, default=None, help="network input side (default: the images')")
    d.set_defaults(func=_cmd_folder)
    f = sub.add_parser('fashion-mnist', help='describe the offline Fashion-MNIST default')
    f.add_argument('--root', default=None, help='folder with the idx .gz files (default: Debian dataset-fashion-mnist)')
    f.set_defaults(func=_cmd_fashion)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
