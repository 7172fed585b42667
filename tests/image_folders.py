"""Image folders in the torchvision ImageFolder layout, rendered from real Fashion-MNIST images, for the
``folder`` dataset tests (test_datasets.py, test_dataset_e2e.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

CLASSES = 5
PER_CLASS = 20


def fashion_images(classes: int = CLASSES, per_class: int = PER_CLASS) -> Dict[int, List[np.ndarray]]:
    """The first ``per_class`` 28x28 uint8 training images of each of the first ``classes`` classes."""
    from bnas_nni.data import FashionMNIST32

    ds = FashionMNIST32(train=True, subset=60 * classes * per_class // 10)
    out: Dict[int, List[np.ndarray]] = {k: [] for k in range(classes)}
    for image, label in zip(ds.images.numpy(), ds.targets.numpy().tolist()):
        if label < classes and len(out[label]) < per_class:
            out[label].append(image)
    assert all(len(v) == per_class for v in out.values()), 'not enough images in the subset'
    return out


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A colour version of a grey image whose three channels differ (so per-channel statistics differ)."""
    return np.stack([image, image // 2, 255 - image], axis=-1)


def render(root: Path, images: Dict[int, List[np.ndarray]], *, rgb: bool, layout: str) -> Dict[str, Tuple[int, str]]:
    """Write ``images`` as PNGs under ``root``: ``layout='single'`` puts class folders in ``root``;
    ``'train/val'`` puts the last quarter of each class in ``val/``. Returns ``{relative path: (label, split)}``."""
    from PIL import Image

    written: Dict[str, Tuple[int, str]] = {}
    for label, items in images.items():
        n_val = len(items) // 4 if layout == 'train/val' else 0
        for i, image in enumerate(items):
            split = 'val' if i >= len(items) - n_val else 'train'
            folder = Path(split) if layout == 'train/val' else Path('.')
            rel = folder / f'class_{label}' / f'img_{i:03d}.png'
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(as_rgb(image) if rgb else image).save(root / rel)
            written[str(rel)] = (label, split)
    return written
