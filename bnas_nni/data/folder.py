"""``dataset: folder``: any image folder in torchvision's ``ImageFolder`` layout.

Two layouts are read (``data: ROOT``)::

    ROOT/train/<class>/<image>   and   ROOT/val/<class>/<image>     # given splits
    ROOT/<class>/<image>         (or ROOT/train/<class>/... alone)  # split by val_fraction

A single folder is split per class: ``val_fraction`` of each class's images (at least one, where the
class has two or more) are held out for validation, drawn with ``val_seed`` (not the run's ``seed``, so
a search and the training that follows it hold out the same images). Both splits are then put in a
seeded random order, so that ``train_subset``, the search's ``train_portion`` halves and ``val_subset``
mix the classes.

What the network needs is read from the data: the classes (sorted folder names), the channels (grey
images are repeated to 3), the image side (the images' own when they share one size; else the median
shorter side, each image resized and centre-cropped to it; ``image_size`` overrides both) and the
per-channel mean/std of the training images (``mean``/``std`` override it). Augmentation for training is
the CIFAR recipe at that side: random crop with ``side // 8`` padding and a horizontal flip.

Checking the data, before anything is written: every class folder must hold images, there must be two
or more classes, ``train/`` and ``val/`` must hold the same classes, and every image must open. Images
are checked with PIL -- header, ``verify()`` and a full decode for folders of up to
:data:`FULL_CHECK_LIMIT` images (about 0.1 ms per 28x28 PNG, a few ms per photo-sized JPEG); larger
folders get the header and ``verify()`` only (which misses a truncated JPEG until it is read). The
result (classes, sizes, mean/std) is cached beside the images in :data:`CACHE_FILE`, written atomically
and keyed by the file list, sizes and modification times, so the check and the statistics run once per
version of the folder; a read-only folder is checked on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import DatasetError
from ..io import atomic_write_text
from .registry import DatasetInfo, register_dataset

__all__ = ['IMAGE_EXTENSIONS', 'CACHE_FILE', 'FULL_CHECK_LIMIT', 'STATS_LIMIT', 'FolderScan', 'scan_folder',
           'FolderDataset', 'folder_info']

#: the file endings read as images (torchvision's ImageFolder list); other files are ignored
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
#: the cache of checks and statistics, in the dataset folder
CACHE_FILE = '.bnas-dataset.json'
#: folders with at most this many images are fully decoded by the check
FULL_CHECK_LIMIT = 20_000
#: mean/std are computed over at most this many training images (a seeded sample beyond it)
STATS_LIMIT = 20_000
_CACHE_VERSION = 1
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'F')


@dataclass(frozen=True)
class FolderScan:
    """A checked folder: classes, the two splits as ``(path relative to root, label)`` in their seeded
    order, and what was read from the images."""

    root: Path
    layout: str                                  # 'train/val' or 'val_fraction'
    classes: List[str]
    train: List[Tuple[str, int]]
    val: List[Tuple[str, int]]
    channels: int                                # 1 (all grey) or 3
    native_size: Optional[Tuple[int, int]]       # (width, height) shared by all images, or None
    image_size: int                              # the side the network sees
    mean: List[float]
    std: List[float]
    stats_source: str                            # 'config', 'cache' or 'computed'
    details: Dict[str, Any] = field(default_factory=dict)


def _class_folders(folder: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def _images_in(folder: Path) -> List[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
    return found


def _classes_of(folder: Path) -> List[str]:
    classes = _class_folders(folder)
    if not classes:
        raise DatasetError(f'{folder} has no class folders; put the images in {folder}/<class>/ (one folder per '
                           'class)')
    if len(classes) == 1:
        raise DatasetError(f'{folder} has one class folder ({classes[0]}); a classifier needs two or more: add a '
                           'folder per class')
    return classes


def _samples(folder: Path, classes: Sequence[str]) -> List[List[Path]]:
    per_class = []
    for name in classes:
        files = _images_in(folder / name)
        if not files:
            raise DatasetError(f'{folder / name} holds no images ({", ".join(IMAGE_EXTENSIONS[:3])} ...); add images '
                               'or remove the folder')
        per_class.append(files)
    return per_class


def _layout(root: Path) -> Tuple[str, Path, Optional[Path]]:
    if not root.exists():
        raise DatasetError(f'dataset folder {root} does not exist; set data: PATH to a folder of class folders '
                           '(or with train/ and val/ inside)')
    if not root.is_dir():
        raise DatasetError(f'dataset folder {root} is a file; set data: PATH to a folder of class folders')
    train, val = root / 'train', root / 'val'
    if train.is_dir() and val.is_dir():
        return 'train/val', train, val
    if val.is_dir():
        raise DatasetError(f'{root} has val/ but no train/; add {train} (same class folders) or drop val/ to '
                           'split one folder with val_fraction')
    return 'val_fraction', (train if train.is_dir() else root), None


def _fingerprint(root: Path, files: Sequence[Path]) -> str:
    """The folder's version: every image's path, size and modification time."""
    h = hashlib.sha256(f'v{_CACHE_VERSION}\n'.encode())
    for path in files:
        st = path.stat()
        h.update(f'{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def _check_image(path: Path, decode: bool) -> Tuple[Tuple[int, int], str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
    except Exception as exc:       # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        raise _unreadable(path, exc) from None
    return size, mode


def load_rgb(path: Path):
    """The image at ``path`` as RGB (grey repeated to 3 channels); an unreadable file is one line."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> DatasetError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DatasetError(f'{path}: unreadable image ({reason}); replace or remove the file')


def _side(native: Optional[Tuple[int, int]], short_sides: Sequence[int]) -> int:
    if native is not None:
        return min(native)
    return int(np.median(short_sides))


def _compute_stats(root: Path, train: Sequence[Tuple[str, int]], side: int, native: Optional[Tuple[int, int]],
                   seed: int) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std over the training images (a seeded sample of :data:`STATS_LIMIT` beyond it),
    as the network sees them before normalisation (RGB, resized to ``side`` where sizes differ)."""
    chosen = list(train)
    if len(chosen) > STATS_LIMIT:
        pick = np.random.default_rng(seed).choice(len(chosen), STATS_LIMIT, replace=False)
        chosen = [chosen[i] for i in sorted(pick)]
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for rel, _ in chosen:
        image = load_rgb(root / rel)
        if native is None or image.size != (side, side):
            image = _resize_crop(image, side)
        x = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)            # a constant channel: leave its scale alone
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _resize_crop(image: Any, side: int):
    import torchvision.transforms.functional as TF

    return TF.center_crop(TF.resize(image, side), [side, side])


def _three(values: Optional[Sequence[float]], key: str) -> Optional[List[float]]:
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise DatasetError(f'{key} must be one number or three (per RGB channel), got {len(values)}')
    return values


def _read_cache(path: Path, fingerprint: str) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get('version') != _CACHE_VERSION or data.get('fingerprint') != fingerprint:
        return None
    return data


_SCANS: Dict[Tuple[Any, ...], FolderScan] = {}


def scan_folder(root: str | os.PathLike, *, val_fraction: float = 0.1, val_seed: int = 0,
                image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> FolderScan:
    """Check the folder ``root`` and read what the network needs (see the module docstring); the first
    problem found is one :class:`DatasetError` line naming the file or folder and the fix. Cached per
    process and, beside the images, per version of the folder."""
    root = Path(root)
    layout, train_dir, val_dir = _layout(root)
    classes = _classes_of(train_dir)
    if val_dir is not None:
        val_classes = _classes_of(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            parts = ([f'only in train/: {", ".join(only_train[:5])}'] if only_train else []) + \
                    ([f'only in val/: {", ".join(only_val[:5])}'] if only_val else [])
            raise DatasetError(f'{train_dir} and {val_dir} hold different classes ({"; ".join(parts)}); give both '
                               'the same class folders')
    if not 0 < float(val_fraction) < 1 and val_dir is None:
        raise DatasetError(f'val_fraction must be in (0, 1) to split {train_dir}, got {val_fraction}')
    train_files = _samples(train_dir, classes)
    val_files = _samples(val_dir, classes) if val_dir is not None else None
    every = [p for files in train_files + (val_files or []) for p in files]
    fingerprint = _fingerprint(root, every)
    split_key = f'{layout}:{None if val_dir else float(val_fraction)}:{int(val_seed)}'
    key = (str(root.resolve()), fingerprint, split_key, image_size, tuple(mean or ()), tuple(std or ()))
    if key in _SCANS:
        return _SCANS[key]

    # the split and the seeded order (the same for every run with this val_seed)
    rng = np.random.default_rng(int(val_seed))
    train: List[Tuple[str, int]] = []
    val: List[Tuple[str, int]] = []
    for label, files in enumerate(train_files):
        rel = [str(p.relative_to(root)) for p in files]
        if val_files is None:
            order = rng.permutation(len(rel))
            n_val = min(max(int(round(len(rel) * float(val_fraction))), 1 if len(rel) >= 2 else 0), len(rel) - 1)
            val += [(rel[i], label) for i in sorted(order[:n_val])]
            train += [(rel[i], label) for i in sorted(order[n_val:])]
        else:
            train += [(r, label) for r in rel]
            val += [(str(p.relative_to(root)), label) for p in val_files[label]]
    if not val:
        raise DatasetError(f'{train_dir}: val_fraction {val_fraction} holds out no image; raise it or add val/')
    train = [train[i] for i in rng.permutation(len(train))]
    val = [val[i] for i in rng.permutation(len(val))]

    given_mean, given_std = _three(mean, 'mean'), _three(std, 'std')
    if given_std is not None and min(given_std) <= 0:
        raise DatasetError(f'std must be > 0 per channel, got {given_std}')
    cache_path = root / CACHE_FILE
    cache = _read_cache(cache_path, fingerprint)
    changed = cache is None
    if cache is None:                  # check every image (before anything is written) and read the sizes
        decode = len(every) <= FULL_CHECK_LIMIT
        sizes, grey, short_sides = set(), True, []
        for path in every:
            size, mode = _check_image(path, decode)
            sizes.add(size)
            short_sides.append(min(size))
            grey = grey and mode in _GREY_MODES
        native = next(iter(sizes)) if len(sizes) == 1 else None
        cache = {'version': _CACHE_VERSION, 'fingerprint': fingerprint, 'images': len(every),
                 'channels': 1 if grey else 3, 'native_size': list(native) if native else None,
                 'short_side': _side(native, short_sides), 'stats': {}}
    channels = int(cache['channels'])
    native = tuple(cache['native_size']) if cache['native_size'] else None
    side = int(image_size) if image_size else int(cache['short_side'])
    stats_key = f'{split_key}:{side}'
    if stats_key in cache['stats']:
        stats, source = cache['stats'][stats_key], 'cache'
    else:
        mean_, std_ = _compute_stats(root, train, side, native, int(val_seed))
        stats, source, changed = {'mean': mean_, 'std': std_}, 'computed', True
        cache['stats'][stats_key] = stats
    if changed:
        try:
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + '\n')
        except Exception:          # a read-only dataset folder: checked and computed again next time
            pass
    scan = FolderScan(root=root, layout=layout, classes=classes, train=train, val=val, channels=channels,
                      native_size=native, image_size=side, mean=given_mean or list(stats['mean']),
                      std=given_std or list(stats['std']),
                      stats_source='config' if given_mean and given_std else source,
                      details={'root': str(root), 'layout': layout, 'train_images': len(train),
                               'val_images': len(val), 'native_size': list(native) if native else None,
                               **({'val_fraction': float(val_fraction), 'val_seed': int(val_seed)}
                                  if val_dir is None else {}),
                               'stats_cache': str(cache_path)})
    _SCANS[key] = scan
    return scan


def _scan_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    if not options.get('data'):
        raise DatasetError('dataset folder needs data: PATH, a folder of class folders (or with train/ and val/)')
    return dict(val_fraction=0.1 if options.get('val_fraction') is None else options['val_fraction'],
                val_seed=int(options.get('val_seed') or 0), image_size=options.get('image_size'),
                mean=options.get('mean'), std=options.get('std'))


class FolderDataset:
    """One split of a checked image folder (:func:`scan_folder`) as ``(3 x side x side tensor, label)``.

    Its constructor takes only names and numbers, so an ``nni.trace``d instance ships in a few hundred
    bytes and re-reads the folder (its cache) in the trial process."""

    def __init__(self, root: str | os.PathLike, split: str = 'train', *, val_fraction: float = 0.1,
                 val_seed: int = 0, image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, augment: bool = False, subset: Optional[int] = None) -> None:
        import torchvision.transforms as T

        if split not in ('train', 'val'):
            raise ValueError(f'split must be train or val, not {split!r}')
        self.scan = scan_folder(root, val_fraction=val_fraction, val_seed=val_seed, image_size=image_size,
                                mean=mean, std=std)
        samples = self.scan.train if split == 'train' else self.scan.val
        self.samples = samples[:subset] if subset is not None else samples
        self.targets = [label for _, label in self.samples]
        self.classes = list(self.scan.classes)
        side = self.scan.image_size
        ops: List[Any] = []
        if self.scan.native_size is None or self.scan.native_size != (side, side):
            ops += [T.Resize(side), T.CenterCrop(side)]
        if augment:
            ops += [T.RandomCrop(side, padding=max(1, side // 8)), T.RandomHorizontalFlip()]
        self.transform = T.Compose(ops + [T.ToTensor(), T.Normalize(self.scan.mean, self.scan.std)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        rel, label = self.samples[index]
        return self.transform(load_rgb(self.scan.root / rel)), label


def folder_info(options: Mapping[str, Any]) -> DatasetInfo:
    """Classes, channels, side and mean/std of the folder ``options['data']`` (checked: bad data stops here)."""
    scan = scan_folder(options['data'], **_scan_options(options))        # _scan_options: data: must be set
    return DatasetInfo('folder', len(scan.classes), channels=scan.channels, image_size=scan.image_size,
                       mean=scan.mean, std=scan.std, classes=list(scan.classes),
                       details={**scan.details, 'stats': scan.stats_source})


def _folder_builder(options: Mapping[str, Any], split: str, *, augment: bool, subset: Optional[int],
                    wrap: Callable):
    kw = _scan_options(options)                                         # data: must be set
    return wrap(FolderDataset)(str(options['data']), split, augment=augment, subset=subset, **kw)


register_dataset('folder', _folder_builder, image_size=None, info=folder_info,
                 description='any image folder in the ImageFolder layout (train/ and val/, or split by val_fraction)')
