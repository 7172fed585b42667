"""The built-in datasets and their registry entries (see :mod:`bnas_nni.data.registry`).

=================  =======  =============================================================================
name               classes  what
=================  =======  =============================================================================
``cifar10``        10       ``torchvision.datasets.CIFAR10``: crop 32 / pad 4, flip, CIFAR normalisation
``cifar100``       100      ``torchvision.datasets.CIFAR100``, the same augmentation
``svhn``           10       ``torchvision.datasets.SVHN`` (train / test splits): crop, no flip (digits)
``mnist``          10       ``torchvision.datasets.MNIST``: padded 28 -> 32, grey repeated to 3 channels
``fashion-mnist``  10       Fashion-MNIST-32x3 from Debian's idx files, offline (:class:`FashionMNIST32`)
``imagenet``       1000     the official integer-label ``train/`` ``val/`` folders (:mod:`.imagenet`)
``folder``         any      any ImageFolder tree (:mod:`.folder`)
=================  =======  =============================================================================

* **CIFAR-10** (and CIFAR-100, SVHN, MNIST) through torchvision, downloaded where the internet is
  reachable (``download: true``); otherwise a one-line error naming the folder and the fix.
* **Fashion-MNIST-32x3**, the offline default: the Debian ``dataset-fashion-mnist`` idx ``.gz`` files
  read directly (no torchvision download, no gunzip), padded 28 -> 32 and repeated to 3 channels, so
  it feeds the CIFAR network unchanged. Its numbers are *not* CIFAR-10 numbers; name them honestly.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ..errors import DatasetError
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_folder, imagenet_transforms, take
from .registry import register_dataset

# torch and torchvision are imported inside the functions that use them: `bnas-nni --help` imports this
# module (for `bnas-nni data`), and importing them here would slow it.

__all__ = ['CIFAR_MEAN', 'CIFAR_STD', 'CIFAR100_MEAN', 'CIFAR100_STD', 'SVHN_MEAN', 'SVHN_STD', 'MNIST_MEAN',
           'MNIST_STD', 'FASHION_MEAN', 'FASHION_STD', 'DEBIAN_FASHION_MNIST', 'FASHION_CLASSES', 'fashion_mnist_root',
           'FashionMNIST32', 'cifar10', 'cifar100', 'svhn', 'mnist', 'cifar_transforms']

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)
SVHN_MEAN = (0.4376821, 0.4437697, 0.47280442)
SVHN_STD = (0.19803012, 0.20101562, 0.19703614)
MNIST_MEAN = (0.1307,) * 3
MNIST_STD = (0.3081,) * 3
FASHION_MEAN = (0.286, 0.286, 0.286)
FASHION_STD = (0.353, 0.353, 0.353)

# where Debian's dataset-fashion-mnist installs its files; BNAS_FASHION_MNIST or `data:` override it
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
FASHION_FILES = {True: ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                 False: ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
FASHION_CLASSES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
                   'ankle-boot')


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
    ds = _torchvision_set(torchvision.datasets.CIFAR10, root, dict(train=train, transform=transform), download,
                          'CIFAR-10', f'run `bnas-nni data cifar10 --root {root}` or set download: true',
                          'copy cifar-10-batches-py there or use dataset: fashion-mnist')
    return take(ds, subset)


def _torchvision_set(factory: Any, root: str | os.PathLike, kwargs: Dict[str, Any], download: bool, title: str,
                     fix_offline: str, fix_failed: str):
    """``factory(root, download=False, **kwargs)``, else (``download``) the same with torchvision's download.
    A failed download removes what it made (the folders it created, or the files it added to an existing
    folder) and is one :class:`DatasetError` line."""
    try:
        return factory(str(root), download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise DatasetError(f'{title} not found under {root}; {fix_offline}') from None
    created = _first_missing_ancestor(Path(root))
    before = None if created is not None else _files_under(Path(root))
    try:
        return factory(str(root), download=True, **kwargs)
    except BaseException as exc:  # URLError, socket errors, bad archives, Ctrl-C
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for path in sorted(_files_under(Path(root)) - (before or set()), reverse=True):
                with contextlib.suppress(OSError):
                    path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        if not isinstance(exc, Exception):
            raise
        raise DatasetError(f'{title} is not under {root} and downloading it failed '
                           f'({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else "no network?"}); '
                           f'{fix_failed}') from None


def _files_under(root: Path) -> set:
    return set(root.rglob('*')) if root.is_dir() else set()


def _first_missing_ancestor(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (what a download would create), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


# --------------------------------------------------------------------------- CIFAR-100, SVHN, MNIST


def cifar100(root: str | os.PathLike = 'data/cifar100', train: bool = True, download: bool = True,
             subset: Optional[int] = None, augment: Optional[bool] = None):
    """``torchvision.datasets.CIFAR100`` (fine labels) with the CIFAR recipe and CIFAR-100 normalisation."""
    import torchvision

    transform = cifar_transforms(train if augment is None else augment, CIFAR100_MEAN, CIFAR100_STD)
    ds = _torchvision_set(torchvision.datasets.CIFAR100, root, dict(train=train, transform=transform), download,
                          'CIFAR-100', 'set download: true (needs the internet) or copy cifar-100-python there',
                          'copy cifar-100-python there')
    return take(ds, subset)


def svhn(root: str | os.PathLike = 'data/svhn', train: bool = True, download: bool = True,
         subset: Optional[int] = None, augment: Optional[bool] = None):
    """``torchvision.datasets.SVHN`` (``train`` / ``test`` splits): crop 32 / pad 4 for training, no flip
    (digits), SVHN normalisation."""
    import torchvision
    import torchvision.transforms as T

    ops = [T.RandomCrop(32, padding=4)] if (train if augment is None else augment) else []
    transform = T.Compose(ops + [T.ToTensor(), T.Normalize(SVHN_MEAN, SVHN_STD)])
    ds = _torchvision_set(torchvision.datasets.SVHN, root, dict(split='train' if train else 'test',
                                                                transform=transform), download,
                          'SVHN', 'set download: true (needs the internet) or copy train_32x32.mat and test_32x32.mat '
                          'there', 'copy train_32x32.mat and test_32x32.mat there')
    ds.classes = [str(d) for d in range(10)]
    return take(ds, subset)


def mnist(root: str | os.PathLike = 'data/mnist', train: bool = True, download: bool = True,
          subset: Optional[int] = None, augment: Optional[bool] = None):
    """``torchvision.datasets.MNIST`` as 3x32x32: zero padding 2, grey repeated to 3 channels (as
    Fashion-MNIST-32x3), crop 32 / pad 4 for training, no flip (digits)."""
    import torchvision
    import torchvision.transforms as T

    ops = [T.RandomCrop(32, padding=4)] if (train if augment is None else augment) else []
    transform = T.Compose([T.Pad(2), *ops, T.Grayscale(num_output_channels=3), T.ToTensor(),
                           T.Normalize(MNIST_MEAN, MNIST_STD)])
    ds = _torchvision_set(torchvision.datasets.MNIST, root, dict(train=train, transform=transform), download,
                          'MNIST', 'set download: true (needs the internet) or copy the MNIST/raw idx files there',
                          'copy the MNIST/raw idx files there')
    return take(ds, subset)


# --------------------------------------------------------------------------- registry entries


def _torchvision_builder(factory: Callable[..., Any], default_root: str) -> Callable[..., Any]:
    def build(options: Mapping[str, Any], split: str, *, augment: bool, subset: Optional[int], wrap: Callable):
        return wrap(factory)(options.get('data') or default_root, train=split == 'train',
                             download=bool(options.get('download')), subset=subset, augment=augment)
    return build


def _fashion_builder(options: Mapping[str, Any], split: str, *, augment: bool, subset: Optional[int],
                     wrap: Callable):
    return wrap(FashionMNIST32)(options.get('data'), train=split == 'train', subset=subset, augment=augment)


def _imagenet_builder(options: Mapping[str, Any], split: str, *, augment: bool, subset: Optional[int],
                      wrap: Callable):
    if not options.get('data'):
        raise DatasetError('dataset imagenet needs data: PATH (a folder with train/ and val/)')
    kw: Dict[str, Any] = dict(image_size=options.get('image_size') or 224, val_resize=options.get('val_resize') or 256)
    if augment:
        kw['color_jitter'] = options.get('color_jitter') or (0.4, 0.4, 0.4, 0.2)
    if split == 'train' and not augment:       # the training images with the evaluation transform
        kw['transform'] = imagenet_transforms(False, **kw)
    return wrap(imagenet_folder)(options['data'], split, subset=subset, **kw)


register_dataset('cifar10', _torchvision_builder(cifar10, 'data/cifar10'), num_classes=10,
                 description='CIFAR-10 (torchvision)', mean=CIFAR_MEAN, std=CIFAR_STD)
register_dataset('cifar100', _torchvision_builder(cifar100, 'data/cifar100'), num_classes=100,
                 description='CIFAR-100 (torchvision, fine labels)', mean=CIFAR100_MEAN, std=CIFAR100_STD)
register_dataset('svhn', _torchvision_builder(svhn, 'data/svhn'), num_classes=10,
                 description='SVHN (torchvision; train and test splits)', mean=SVHN_MEAN, std=SVHN_STD)
register_dataset('mnist', _torchvision_builder(mnist, 'data/mnist'), num_classes=10,
                 description='MNIST (torchvision), padded to 3x32x32', channels=1, mean=MNIST_MEAN,
                 std=MNIST_STD)
register_dataset('fashion-mnist', _fashion_builder, num_classes=10,
                 description='Fashion-MNIST-32x3 from the Debian idx files (offline)', channels=1,
                 mean=FASHION_MEAN, std=FASHION_STD)
register_dataset('imagenet', _imagenet_builder, family='imagenet', image_size=None, num_classes=None,
                 searchable=False, description='ImageNet, integer-label train/ and val/ folders',
                 mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 search_refusal='the paper searches on CIFAR-10 and transfers the cell to ImageNet with gamma')
