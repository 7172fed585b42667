"""Datasets for the BNAS trainers and the ``bnas-nni data`` command.

* **CIFAR-10** through ``torchvision.datasets.CIFAR10`` (downloaded where the internet is reachable),
  with the official augmentation: random crop 32 / pad 4, horizontal flip, CIFAR normalisation.
* **Fashion-MNIST-32x3**, the offline default: the Debian ``dataset-fashion-mnist`` idx ``.gz`` files
  read directly (no torchvision download, no gunzip), padded 28 -> 32 and repeated to 3 channels, so
  it feeds the CIFAR network unchanged. Its numbers are *not* CIFAR-10 numbers; name them honestly.
* **ImageNet** in the official integer-label folder layout ``ROOT/{train,val}/<label>/*.JPEG`` read by
  ``torchvision.datasets.ImageFolder``; ``bnas-nni data prepare-imagenet`` renames synset folders
  (``n01440764``) into it. Label folders are unpadded integers and ImageFolder orders them as strings,
  exactly as the official scripts did, so official checkpoints see the class order they were trained
  with.

Constructors are plain classes/functions; :func:`traced` wraps one with ``nni.trace`` so an NNI
evaluator serialises only its arguments (trial payloads must stay under 64 KB).
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DatasetError
from .io import atomic_write_text

# torch, torchvision and NNI are imported inside the functions that use them: `bnas-nni --help` imports this
# module (for `bnas-nni data`), and importing them here would slow it.

__all__ = ['CIFAR_MEAN', 'CIFAR_STD', 'FASHION_MEAN', 'FASHION_STD', 'IMAGENET_MEAN', 'IMAGENET_STD',
           'fashion_mnist_root', 'FashionMNIST32', 'cifar10', 'cifar_transforms', 'imagenet_transforms',
           'imagenet_folder', 'check_imagenet_layout', 'prepare_imagenet', 'build_dataset', 'build_datasets', 'traced',
           'DatasetView', 'search_splits', 'register']

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
FASHION_MEAN = (0.286, 0.286, 0.286)
FASHION_STD = (0.353, 0.353, 0.353)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# where Debian's dataset-fashion-mnist installs its files; BNAS_FASHION_MNIST or `data:` override it
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = {True: ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                 False: ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
FASHION_CLASSES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
                   'ankle-boot')


def traced(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``nni.trace(factory)``: instances remember their constructor arguments, so NNI ships those
    instead of pickled tensors. Imports NNI only when called."""
    import nni

    return nni.trace(factory)


# --------------------------------------------------------------------------- Fashion-MNIST


def fashion_mnist_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The folder with the four Fashion-MNIST idx ``.gz`` files: ``root``, ``$BNAS_FASHION_MNIST`` or Debian's."""
    path = Path(root or os.environ.get('BNAS_FASHION_MNIST') or DEBIAN_FASHION_MNIST)
    missing = [f for pair in FASHION_FILES.values() for f in pair if not (path / f).is_file()]
    if not path.is_dir():
        raise DatasetError(f'Fashion-MNIST folder {path} does not exist; install Debian dataset-fashion-mnist '
                           'or point data: / BNAS_FASHION_MNIST at the idx .gz files')
    if missing:
        raise DatasetError(f'Fashion-MNIST folder {path} lacks {", ".join(missing)}; expected the four idx .gz files')
    return path


#: the idx header of each Fashion-MNIST file kind: magic number (unsigned bytes, number of dimensions)
#: and the dimensions after the item count
IDX_KINDS = {'images': (0x0803, (28, 28)), 'labels': (0x0801, ())}


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """The items of an idx ``.gz`` file (``kind``: images or labels), checked against its header: a file of
    the other kind (swapped names), an empty or truncated file, or labels outside 0..9 are one line."""
    magic, shape = IDX_KINDS[kind]
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f'cannot read {path}: {exc}; re-copy the Fashion-MNIST idx .gz files') from None
    header = 4 * (2 + len(shape))
    found = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
    if found != magic:
        other = next((k for k, (m, _) in IDX_KINDS.items() if m == found), None)
        what = (f'holds {other}, not {kind} (are the images and labels files swapped?)' if other else
                'is empty' if not data else f'is not an idx {kind} file (magic number {found})')
        raise DatasetError(f'{path} {what}; expected the Fashion-MNIST {kind} file')
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(1 + len(shape))]
    if len(data) < header or tuple(dims[1:]) != shape or len(data) != header + int(np.prod(dims)):
        raise DatasetError(f'{path}: its header announces {" x ".join(map(str, dims))} {kind} but it holds '
                           f'{max(len(data) - header, 0):,} bytes of data; re-copy the file')
    items = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
    if kind == 'labels' and items.size and int(items.max()) >= len(FASHION_CLASSES):
        raise DatasetError(f'{path}: label {int(items.max())} outside 0..{len(FASHION_CLASSES) - 1}; re-copy the file')
    return items


class FashionMNIST32:
    """Fashion-MNIST as 3x32x32 float tensors (zero padding 2, grey repeated to RGB), normalised with
    mean 0.286 / std 0.353.

    ``train`` picks the 60k or 10k split; ``subset`` keeps the first N images (the files are already
    shuffled and close to class-balanced); ``augment`` applies the CIFAR recipe's crop and flip.
    """

    classes = FASHION_CLASSES

    def __init__(self, root: Optional[str] = None, train: bool = True, subset: Optional[int] = None,
                 augment: bool = False) -> None:
        import torch

        folder = fashion_mnist_root(root)
        images_file, labels_file = FASHION_FILES[bool(train)]
        images = _read_idx(folder / images_file, 'images')
        labels = _read_idx(folder / labels_file, 'labels')
        if len(images) == 0:
            raise DatasetError(f'{folder / images_file} holds no images; re-copy the Fashion-MNIST files')
        if len(images) != len(labels):
            raise DatasetError(f'{folder}: {len(images)} images but {len(labels)} labels')
        if subset is not None:
            images, labels = images[:subset], labels[:subset]
        self.images = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment
        self.train = train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        import torch
        import torch.nn.functional as F

        x = self.images[index].to(torch.float32).div_(255.0)
        x = F.pad(x, (2, 2, 2, 2))
        if self.augment:
            # RandomCrop(32, padding=4) + RandomHorizontalFlip, on the padded 32x32 image
            x = F.pad(x, (4, 4, 4, 4))
            i, j = torch.randint(0, 9, (2,)).tolist()
            x = x[i:i + 32, j:j + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - FASHION_MEAN[0]) / FASHION_STD[0]
        return x.unsqueeze(0).expand(3, -1, -1).contiguous(), int(self.targets[index])


# --------------------------------------------------------------------------- CIFAR-10


def cifar_transforms(train: bool, mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD):
    """The official CIFAR transforms (crop 32 pad 4 + flip for training), normalised with ``mean``/``std``."""
    import torchvision.transforms as T

    ops = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def cifar10(root: str | os.PathLike = 'data/cifar10', train: bool = True, download: bool = True,
            transform: Any = None, subset: Optional[int] = None, augment: Optional[bool] = None):
    """``torchvision.datasets.CIFAR10`` with the recipe transform (augmented for ``train`` unless
    ``augment`` says otherwise); a one-line error if it is missing."""
    import torchvision

    transform = transform if transform is not None else cifar_transforms(train if augment is None else augment)
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False, transform=transform)
    except RuntimeError:
        if not download:
            raise DatasetError(f'CIFAR-10 not found under {root}; run `bnas-nni data cifar10 --root {root}` '
                               'or set download: true') from None
        created = _first_missing_ancestor(Path(root))
        archive = Path(root) / torchvision.datasets.CIFAR10.filename
        archive_existed = archive.exists()
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=True, transform=transform)
        except BaseException as exc:  # URLError, socket errors, bad archives, Ctrl-C
            # remove what the failed download made: the folders it created, or its partial archive
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif not archive_existed:
                archive.unlink(missing_ok=True)
            if not isinstance(exc, Exception):
                raise
            raise DatasetError(f'CIFAR-10 is not under {root} and downloading it failed '
                               f'({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no network?"}); '
                               'copy cifar-10-batches-py there or use dataset: fashion-mnist') from None
    return _take(ds, subset)


def _first_missing_ancestor(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (what a download would create), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _take(ds: Any, subset: Optional[int]):
    if subset is None or subset >= len(ds):
        return ds
    import torch.utils.data as tud

    return tud.Subset(ds, list(range(subset)))


# --------------------------------------------------------------------------- ImageNet


def imagenet_transforms(train: bool, image_size: int = 224, val_resize: int = 256,
                        color_jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.2)):
    """Official ImageNet transforms: RandomResizedCrop/flip/ColorJitter for training, Resize/CenterCrop for val."""
    import torchvision.transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        b, c, s, h = color_jitter
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                          T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h), T.ToTensor(), norm])
    return T.Compose([T.Resize(val_resize), T.CenterCrop(image_size), T.ToTensor(), norm])


def _subfolders(path: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def check_imagenet_layout(root: str | os.PathLike, split: str) -> Path:
    """``root/split`` must hold integer-named class folders; otherwise say what to run."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f'ImageNet root {root} does not exist; pass data: PATH (with train/ and val/ inside)')
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f'{folder} is missing; an ImageNet root needs train/ and val/ class folders')
    names = _subfolders(folder)
    if not names:
        raise DatasetError(f'{folder} has no class folders; expected {folder}/<label>/*.JPEG')
    bad = [n for n in names if not n.isdigit()]
    if bad:
        hint = (f'run `bnas-nni data prepare-imagenet {root}` first' if all(_is_synset(n) for n in bad)
                else 'class folders must be integer labels 0..999')
        raise DatasetError(f'{folder} has non-integer class folders '
                           f'({", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""}); {hint}')
    return folder


def imagenet_folder(root: str | os.PathLike, split: str, transform: Any = None, subset: Optional[int] = None,
                    **transform_kwargs: Any):
    """``ImageFolder(root/split)`` in the official integer-label layout (see the module docstring)."""
    import torchvision

    folder = check_imagenet_layout(root, split)
    transform = transform if transform is not None else imagenet_transforms(split == 'train', **transform_kwargs)
    try:
        ds = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f'{folder}: {str(exc).splitlines()[0]}') from None
    return _take(ds, subset)


def _is_synset(name: str) -> bool:
    return len(name) == 9 and name[0] == 'n' and name[1:].isdigit()


def prepare_imagenet(root: str | os.PathLike, val_only: bool = False, synsets: Optional[str | os.PathLike] = None,
                     log: Callable[[str], None] = print) -> Dict[str, int]:
    """Rename synset folders (``n01440764``) to integer labels in ``root/train`` and ``root/val``.

    The label of a synset is its line in ``synsets`` (one WordNet id per line) or, by default, its
    rank among the sorted synsets present, which for the full 1000-class set is the standard ImageNet
    index. The mapping is written to ``root/synsets.txt`` before any rename and reused on later runs,
    so an interrupted run can be repeated; folders already in the integer layout are left alone, and
    a clash (both ``n01440764/`` and ``0/`` present) stops with an error instead of merging or
    deleting anything. Returns how many folders were renamed per split.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f'ImageNet folder {root} does not exist')
    splits = ['val'] if val_only else ['train', 'val']
    for split in splits:
        if not (root / split).is_dir():
            flag = '' if val_only else ' (use --val-only if you only have val/)'
            raise DatasetError(f'{root / split} is missing{flag}')
    mapping_file = root / 'synsets.txt'
    if synsets is not None:
        order = _read_synsets(Path(synsets))
    elif mapping_file.is_file():
        order = _read_synsets(mapping_file)
    else:
        present = sorted({n for s in splits for n in _subfolders(root / s) if _is_synset(n)})
        if not present:
            already = all(all(n.isdigit() for n in _subfolders(root / s)) for s in splits)
            if already:
                log(f'{root}: already in the integer-label layout; nothing to do')
                return {s: 0 for s in splits}
            raise DatasetError(f'{root}: no synset folders (n01440764 ...) found in {", ".join(splits)}')
        order = present
    label = {wnid: i for i, wnid in enumerate(order)}
    # check everything before renaming anything
    plan: List[Tuple[Path, Path]] = []
    for split in splits:
        folder = root / split
        for name in _subfolders(folder):
            if name.isdigit():
                continue
            if not _is_synset(name):
                raise DatasetError(f'{folder / name}: neither a synset (n01440764) nor an integer label folder')
            if name not in label:
                raise DatasetError(f'{folder / name}: synset not in the mapping ({len(order)} synsets); '
                                   'pass --synsets FILE listing all classes')
            target = folder / str(label[name])
            if target.exists():
                raise DatasetError(f'both {folder / name} and {target} exist; merge or move one of them by hand')
            plan.append((folder / name, target))
    if not mapping_file.is_file() or _read_synsets(mapping_file) != order:
        if mapping_file.is_file():
            raise DatasetError(f'{mapping_file} lists a different class order than --synsets; remove one of them')
        atomic_write_text(mapping_file, ''.join(f'{w}\n' for w in order))
    counts = {s: 0 for s in splits}
    for src, dst in plan:
        os.rename(src, dst)
        counts[src.parent.name] += 1
    log(f'{root}: renamed ' + ', '.join(f'{n} {s} folders' for s, n in counts.items())
        + f' to integer labels (mapping in {mapping_file})')
    return counts


def _read_synsets(path: Path) -> List[str]:
    if not path.is_file():
        raise DatasetError(f'synset list {path} does not exist')
    order = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(order)) != len(order):
        raise DatasetError(f'{path} lists a synset twice')
    return order


# --------------------------------------------------------------------------- search splits


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


def _search_base(cfg: Dict[str, Any], augment: bool, wrap: Callable[[Any], Any]):
    if cfg['dataset'] == 'fashion-mnist':
        return wrap(FashionMNIST32)(cfg.get('data'), train=True, subset=cfg.get('train_subset'), augment=augment)
    if cfg['dataset'] == 'cifar10':
        return wrap(cifar10)(cfg.get('data') or 'data/cifar10', train=True, download=bool(cfg.get('download')),
                             subset=cfg.get('train_subset'), augment=augment)
    raise DatasetError(f'unknown search dataset {cfg["dataset"]!r}; choose cifar10 or fashion-mnist')


def search_splits(cfg: Dict[str, Any], *, trace: bool = False):
    """``(weight half, architecture half, architecture half without augmentation)`` of the training
    split (the official search never touches the test split): the first ``train_portion`` of the
    (``train_subset`` first) training images train the weights, the rest the architecture.
    ``trace=True`` builds them ``nni.trace``'d, for NNI trials."""
    wrap = traced if trace else (lambda f: f)
    aug = _search_base(cfg, True, wrap)
    plain = _search_base(cfg, False, wrap)
    n = len(aug)
    split = int(np.floor(n * cfg['train_portion']))
    if split < 1 or split >= n:
        raise DatasetError(f'train_portion {cfg["train_portion"]} leaves an empty half of {n} images')
    view = wrap(DatasetView)
    size = cfg.get('image_size')
    return view(aug, 0, split, size), view(aug, split, n, size), view(plain, split, n, size)


# --------------------------------------------------------------------------- trainer entry


def build_dataset(cfg: Dict[str, Any], split: str, *, trace: bool = False):
    """The ``train`` or ``val`` dataset of a resolved trainer config (keys ``dataset``, ``data``,
    ``train_subset``/``val_subset``, image sizes); ``train-eval`` is the training images with the
    evaluation transform (BN re-estimation: the statistics of what the network sees when evaluated).
    ``trace=True`` returns an ``nni.trace``d instance."""
    if split not in ('train', 'val', 'train-eval'):
        raise ValueError(f'split must be train, val or train-eval, not {split!r}')
    wrap = traced if trace else (lambda f: f)
    plain = split == 'train-eval'
    train = split != 'val'
    augment = train and not plain
    subset = cfg.get('train_subset' if train else 'val_subset')
    name = cfg['dataset']
    size = cfg.get('image_size')
    if name in ('fashion-mnist', 'cifar10'):
        if name == 'fashion-mnist':
            ds = wrap(FashionMNIST32)(cfg.get('data'), train=train, subset=subset, augment=augment)
        else:
            ds = wrap(cifar10)(cfg.get('data') or 'data/cifar10', train=train, download=cfg.get('download', True),
                               subset=subset, augment=augment)
        return wrap(DatasetView)(ds, image_size=size) if size and size != 32 else ds
    if name == 'imagenet':
        if not cfg.get('data'):
            raise DatasetError('dataset imagenet needs data: PATH (a folder with train/ and val/)')
        kw = dict(image_size=size or 224, val_resize=cfg.get('val_resize') or 256)
        if augment:
            kw['color_jitter'] = cfg.get('color_jitter') or (0.4, 0.4, 0.4, 0.2)
        if plain:
            kw['transform'] = imagenet_transforms(False, **kw)
        return wrap(imagenet_folder)(cfg['data'], 'train' if train else 'val', subset=subset, **kw)
    raise DatasetError(f'unknown dataset {name!r}; choose cifar10, fashion-mnist or imagenet')


def build_datasets(cfg: Dict[str, Any], *, trace: bool = False):
    """``(train, val)`` datasets for a resolved trainer config; the first problem found is one
    :class:`DatasetError` line."""
    return build_dataset(cfg, 'train', trace=trace), build_dataset(cfg, 'val', trace=trace)


# --------------------------------------------------------------------------- CLI


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


def register(subparsers: Any) -> None:
    """Add ``bnas-nni data {cifar10,prepare-imagenet,fashion-mnist}``."""
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
    f = sub.add_parser('fashion-mnist', help='describe the offline Fashion-MNIST default')
    f.add_argument('--root', default=None, help='folder with the idx .gz files (default: Debian dataset-fashion-mnist)')
    f.set_defaults(func=_cmd_fashion)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
