"""ImageNet in the official integer-label folder layout ``ROOT/{train,val}/<label>/*.JPEG``, read by
``torchvision.datasets.ImageFolder``; ``bnas-nni data prepare-imagenet`` renames synset folders
(``n01440764``) into it. Label folders are unpadded integers and ImageFolder orders them as strings,
exactly as the official scripts did, so official checkpoints see the class order they were trained with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import DatasetError
from ..io import atomic_write_text

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'imagenet_transforms', 'imagenet_folder', 'check_imagenet_layout',
           'prepare_imagenet', 'take']

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def take(ds: Any, subset: Optional[int]):
    """The first ``subset`` items of ``ds`` (all of them for None)."""
    if subset is None or subset >= len(ds):
        return ds
    import torch.utils.data as tud

    return tud.Subset(ds, list(range(subset)))


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
    return take(ds, subset)


def _is_synset(name: str) -> bool:
    return len(name) == 9 and name[0] == 'n' and name[1:].isdigit()


def prepare_imagenet(root: str | os.PathLike, val_only: bool = False, synsets: Optional[str | os.PathLike] = None,
                     log: Callable[[str], None] = print) -> Dict[str, int]:
    """Rename synset folders (such as n01440764) to integer labels in root/train and root/val.

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


