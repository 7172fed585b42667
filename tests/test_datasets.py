"""The dataset registry (issue 24): every built-in name builds or says in one line where its data should
be, ``register_dataset`` for user code, and the ``folder`` dataset on ImageFolder trees rendered from real
Fashion-MNIST images (grey and RGB, ``train/`` + ``val/`` and ``val_fraction``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import CLASSES, PER_CLASS, fashion_images, render

from bnas_nni import data
from bnas_nni.config import SEARCH, TRAIN, resolve
from bnas_nni.data import folder as folder_module
from bnas_nni.errors import ConfigError, DatasetError

pytestmark = pytest.mark.usefixtures('needs_fashion')


@pytest.fixture(scope='session')
def grey_images():
    return fashion_images()


@pytest.fixture(scope='session')
def grey_folder(tmp_path_factory, grey_images):
    """5 classes x 20 grey 28x28 PNGs in class folders (no val/): split by val_fraction."""
    root = tmp_path_factory.mktemp('grey')
    return root, render(root, grey_images, rgb=False, layout='single')


@pytest.fixture(scope='session')
def rgb_folder(tmp_path_factory, grey_images):
    """The same images in colour, as train/ (15 per class) and val/ (5 per class)."""
    root = tmp_path_factory.mktemp('rgb')
    return root, render(root, grey_images, rgb=True, layout='train/val')


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert '\n' not in message
    return message


# --------------------------------------------------------------------------- the registry

@pytest.mark.parametrize('name, title', [('cifar10', 'CIFAR-10'), ('cifar100', 'CIFAR-100'), ('svhn', 'SVHN'),
                                         ('mnist', 'MNIST')])
def test_torchvision_sets_by_name_say_where_their_files_go(tmp_path, name, title):
    """Offline (download: false) a missing torchvision set is one line naming the folder and the fix; its
    fixed facts come from the registry without reading anything."""
    root = tmp_path / name
    with pytest.raises(DatasetError) as exc:
        data.build_dataset({'dataset': name, 'data': str(root), 'download': False}, 'train')
    message = _one_line(exc)
    assert message.startswith(f'{title} not found under {root}') and 'download: true' in message
    assert not root.exists()
    spec = data.get_dataset_spec(name)
    assert spec.family == 'cifar' and spec.searchable and data.dataset_info({'dataset': name}).num_classes == \
        {'cifar10': 10, 'cifar100': 100, 'svhn': 10, 'mnist': 10}[name]


@pytest.mark.parametrize('name', ['cifar100', 'svhn', 'mnist'])
def test_failed_downloads_leave_nothing_behind(tmp_path, monkeypatch, name):
    """Where the machine cannot download (here a closed local proxy port), the error is one line and the
    folders the attempt created are gone."""
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')
    monkeypatch.setenv('http_proxy', 'http://127.0.0.1:9')
    root = tmp_path / 'new' / name
    with pytest.raises(DatasetError) as exc:
        data.build_dataset({'dataset': name, 'data': str(root), 'download': True}, 'val')
    assert 'downloading it failed' in _one_line(exc) and str(root) in str(exc.value)
    assert not (tmp_path / 'new').exists()


def test_fashion_mnist_imagenet_and_folder_by_name(tmp_path):
    """fashion-mnist by name is today's Fashion-MNIST-32x3, pixel for pixel; imagenet and folder need a
    data folder and say so; a missing folder is named."""
    by_name = data.build_dataset({'dataset': 'fashion-mnist', 'val_subset': 50}, 'val')
    direct = data.FashionMNIST32(train=False, subset=50)
    assert len(by_name) == 50 and all(torch.equal(by_name[i][0], direct[i][0]) for i in (0, 17, 49))
    with pytest.raises(DatasetError, match='does not exist'):
        data.build_dataset({'dataset': 'fashion-mnist', 'data': str(tmp_path / 'no')}, 'train')
    for name in ('imagenet', 'folder'):
        with pytest.raises(DatasetError, match='needs data: PATH'):
            data.build_dataset({'dataset': name}, 'train')
        with pytest.raises(DatasetError) as exc:
            data.build_dataset({'dataset': name, 'data': str(tmp_path / 'missing')}, 'val')
        assert 'does not exist' in _one_line(exc) and str(tmp_path / 'missing') in str(exc.value)
    assert data.dataset_info({'dataset': 'imagenet'}).num_classes is None        # the model config's (1000)
    fashion = data.dataset_info({'dataset': 'fashion-mnist', 'image_size': 16})
    assert (fashion.num_classes, fashion.channels, fashion.image_size, fashion.mean) == (10, 1, 16, [0.286] * 3)


def test_config_accepts_registered_names_only():
    names = data.dataset_names()
    assert {'cifar10', 'cifar100', 'svhn', 'mnist', 'fashion-mnist', 'imagenet', 'folder'} <= set(names)
    with pytest.raises(ConfigError) as exc:
        resolve(SEARCH, None, {'dataset': 'cifar-11'})
    assert _one_line(exc) == f"unknown dataset 'cifar-11'; choose one of {', '.join(names)}"
    assert resolve(TRAIN, None, {'dataset': 'Fashion_MNIST'})['dataset'] == 'fashion-mnist'
    with pytest.raises(ConfigError, match='imagenet cannot be searched on .*search datasets: cifar10'):
        resolve(SEARCH, None, {'dataset': 'imagenet'})
    assert resolve(TRAIN, None, {'dataset': 'imagenet'})['dataset'] == 'imagenet'
    for bad, match in (({'val_fraction': 1.0}, 'val_fraction must be in'), ({'mean': [0.1, 0.2]}, 'mean must be'),
                       ({'std': [0.0]}, 'std must be > 0')):
        with pytest.raises(ConfigError, match=match):
            resolve(TRAIN, None, {'dataset': 'folder', **bad})


class NoiseImages:
    """A user dataset: seeded noise images, labels ``i % 3``."""

    classes = ('a', 'b', 'c')

    def __init__(self, n: int, side: int, seed: int) -> None:
        self.x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 3


def _noise_builder(options, split, *, augment, subset):
    return NoiseImages(subset or (40 if split == 'train' else 12), options.get('image_size') or 20,
                       seed=0 if split == 'train' else 1)


def test_register_dataset_for_user_code():
    """A registered builder is a config name like the built-ins: config validation, train/val sets, the
    classes counted from its training set into the model, and an nni.trace'd copy that rebuilds itself."""
    import nni

    from bnas_nni.train.runner import resolve_model_config, resolve_train_config

    data.register_dataset('noise-3', _noise_builder, image_size=None, description='test noise')
    try:
        with pytest.raises(ConfigError, match="dataset 'noise-3' is already registered"):
            data.register_dataset('noise_3', _noise_builder)
        cfg = resolve_train_config(overrides={'dataset': 'Noise_3', 'val_subset': 5})
        assert cfg.dataset == 'noise-3'
        train, val = data.build_datasets(cfg)
        assert len(train) == 40 and len(val) == 5 and train[4][0].shape == (3, 20, 20) and train[4][1] == 1
        assert data.dataset_info(cfg).num_classes == 3 and resolve_model_config(cfg)['num_classes'] == 3
        traced = data.build_dataset(cfg, 'train', trace=True)
        again = nni.load(nni.dump(traced))
        assert len(nni.dump(traced)) < 4000 and torch.equal(again[7][0], train[7][0])
        assert resolve(SEARCH, None, {'dataset': 'noise-3'})['dataset'] == 'noise-3'
    finally:
        data.DATASETS._items.pop('noise-3', None)
    with pytest.raises(ConfigError, match="unknown dataset 'noise-3'"):
        resolve(TRAIN, None, {'dataset': 'noise-3'})


# --------------------------------------------------------------------------- folder

def _folder_cfg(root: Path, **extra):
    return resolve(TRAIN, None, {'dataset': 'folder', 'data': str(root), **extra})


def test_folder_split_by_val_fraction_reads_grey_images(grey_folder, grey_images):
    """One folder of class folders: a seeded per-class split (val_seed, not seed), both splits in a
    seeded class-mixed order, grey repeated to 3 channels, the image side and mean/std read from the data."""
    root, written = grey_folder
    cfg = _folder_cfg(root)
    train, val = data.build_datasets(cfg)
    assert len(train) == CLASSES * (PER_CLASS - 2) and len(val) == CLASSES * 2       # round(20 * 0.1) per class
    train_paths = [p for p, _ in train.samples]
    val_paths = [p for p, _ in val.samples]
    assert set(train_paths) | set(val_paths) == set(written) and not set(train_paths) & set(val_paths)
    assert sorted(np.bincount([y for _, y in val.samples]).tolist()) == [2] * CLASSES
    assert len(set(y for _, y in train.samples[:10])) > 2                           # class-mixed order
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.channels, info.image_size) == (CLASSES, 1, 28)
    assert info.classes == [f'class_{k}' for k in range(CLASSES)] and info.details['layout'] == 'val_fraction'
    # mean/std: over the training images exactly
    pixels = np.stack([grey_images[int(p.split('class_')[1][0])][int(p[-7:-4])] for p in train_paths]) / 255.0
    assert np.allclose(info.mean, [pixels.mean()] * 3, atol=1e-6) and np.allclose(info.std, [pixels.std()] * 3,
                                                                                  atol=1e-6)
    # an evaluation image is its file's pixels, normalised, in 3 equal channels
    rel, label = val.samples[3]
    x, y = val[3]
    original = torch.from_numpy(grey_images[label][int(rel[-7:-4])] / 255.0).float()
    assert y == label and x.shape == (3, 28, 28) and torch.equal(x[0], x[2])
    assert torch.allclose(x[1], (original - info.mean[1]) / info.std[1], atol=1e-5)
    # the split is val_seed's: the same again, another for another seed; the run's seed plays no part
    assert [p for p, _ in data.build_dataset(_folder_cfg(root, seed=5), 'val').samples] == val_paths
    assert [p for p, _ in data.build_dataset(_folder_cfg(root, val_seed=1), 'val').samples] != val_paths
    assert len(data.build_dataset(_folder_cfg(root, val_fraction=0.25), 'val')) == CLASSES * 5


def test_folder_with_train_and_val_reads_rgb_images(rgb_folder):
    root, written = rgb_folder
    cfg = _folder_cfg(root)
    train, val = data.build_datasets(cfg)
    assert len(train) == CLASSES * 15 and len(val) == CLASSES * 5
    assert {p for p, _ in val.samples} == {p for p, (_, split) in written.items() if split == 'val'}
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.channels, info.image_size, info.details['layout']) == (CLASSES, 3, 28, 'train/val')
    assert info.mean[0] > info.mean[1] and info.mean[2] > info.mean[0]              # channels 255-x > x > x/2
    x, _ = train[0]
    assert x.shape == (3, 28, 28) and not torch.equal(x[0], x[1])
    # training augmentation: crop (padding side // 8) and flip change pixels, shapes stay
    torch.manual_seed(0)
    augmented = data.build_dataset(cfg, 'train')
    assert any(not torch.equal(augmented[i][0], data.build_dataset(cfg, 'train-eval')[i][0]) for i in range(4))
    small = data.build_dataset(_folder_cfg(root, image_size=16), 'val')
    assert small[0][0].shape == (3, 16, 16)


def test_folder_statistics_are_cached_beside_the_images(tmp_path, grey_images):
    """mean/std and the image check run once per version of the folder (a JSON beside the images); the
    config's mean/std win; a changed image invalidates the cache."""
    root = tmp_path / 'cached'
    render(root, {k: v[:6] for k, v in grey_images.items()}, rgb=False, layout='single')
    first = folder_module.scan_folder(root)
    cache = json.loads((root / data.CACHE_FILE).read_text())
    assert first.stats_source == 'computed' and cache['channels'] == 1 and cache['native_size'] == [28, 28]
    assert list(cache['stats'].values()) == [{'mean': first.mean[:3], 'std': first.std[:3]}]
    folder_module._SCANS.clear()                                                 # a new process
    assert folder_module.scan_folder(root).stats_source == 'cache'
    given = folder_module.scan_folder(root, mean=[0.5], std=[0.25, 0.25, 0.25])
    assert given.mean == [0.5] * 3 and given.std == [0.25] * 3 and given.stats_source == 'config'
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / 'class_0' / 'img_000.png')
    folder_module._SCANS.clear()
    changed = folder_module.scan_folder(root)
    assert changed.stats_source == 'computed' and changed.mean[0] < first.mean[0]
    assert not [p for p in root.iterdir() if p.name.endswith('.tmp') or p.name.startswith('.bnas-dataset.json.')]
