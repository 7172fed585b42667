"""Datasets and ``bnas-nni data`` (issue 4): Fashion-MNIST default, real CIFAR pixels, ImageNet layout."""
import glob
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bnas_nni import data
from bnas_nni.cli import main
from bnas_nni.errors import DatasetError

FASHION = Path(data.DEBIAN_FASHION_MNIST)
needs_fashion = pytest.mark.skipif(not (FASHION / 'train-images-idx3-ubyte.gz').is_file() and
                                   not os.environ.get('BNAS_FASHION_MNIST'),
                                   reason='Debian dataset-fashion-mnist is not installed')


def _foolbox_data():
    spec = importlib.util.find_spec('foolbox')
    if spec is None:
        pytest.skip('foolbox (pip install --no-deps foolbox==3.3.4) ships the real CIFAR-10/ImageNet samples')
    return Path(spec.submodule_search_locations[0]) / 'data'


def _jpeg(path: Path, seed: int, size=(24, 20)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)


def _synset_tree(root: Path, splits=('train', 'val'), synsets=('n01440764', 'n01443537', 'n02102040'), per=2):
    for split in splits:
        for k, wnid in enumerate(synsets):
            for i in range(per):
                _jpeg(root / split / wnid / f'{wnid}_{i}.JPEG', seed=100 * k + i)


@needs_fashion
def test_fashion_mnist_32x3_shapes_values_and_subsets():
    ds = data.FashionMNIST32(train=False, subset=200)
    assert len(ds) == 200
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])                 # grey repeated to RGB
    border = (0.0 - 0.286) / 0.353
    assert torch.allclose(x[:, :2, :], torch.full_like(x[:, :2, :], border))   # the 2-pixel zero padding
    full = data.FashionMNIST32(train=True)
    assert len(full) == 60000 and np.bincount(full.targets.numpy()).tolist() == [6000] * 10
    aug = data.FashionMNIST32(train=True, subset=8, augment=True)
    torch.manual_seed(0)
    a = torch.stack([aug[i][0] for i in range(8)])
    plain = torch.stack([data.FashionMNIST32(train=True, subset=8)[i][0] for i in range(8)])
    assert a.shape == plain.shape and not torch.equal(a, plain)                # crop/flip changed pixels


def test_fashion_mnist_missing_folder_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match='does not exist'):
        data.FashionMNIST32(str(tmp_path / 'nowhere'))
    (tmp_path / 'fm').mkdir()
    with pytest.raises(DatasetError, match='lacks train-images-idx3-ubyte.gz'):
        data.FashionMNIST32(str(tmp_path / 'fm'))


def test_cifar_transform_on_real_cifar10_images():
    """The official CIFAR normalisation applied to 20 real CIFAR-10 test images (foolbox)."""
    from PIL import Image

    files = sorted(glob.glob(str(_foolbox_data() / 'cifar10_*.png')))
    assert len(files) == 20
    tf = data.cifar_transforms(train=False)
    x = torch.stack([tf(Image.open(f).convert('RGB')) for f in files])
    assert x.shape == (20, 3, 32, 32)
    # per-channel statistics of real CIFAR images after normalisation are near 0 / 1
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.35 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.35
    raw = torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1) for f in files])
    mean = torch.tensor(data.CIFAR_MEAN)[:, None, None]
    std = torch.tensor(data.CIFAR_STD)[:, None, None]
    assert torch.allclose(x, (raw.float() / 255 - mean) / std, atol=1e-5)
    tr = data.cifar_transforms(train=True)(Image.open(files[0]).convert('RGB'))
    assert tr.shape == (3, 32, 32)


def test_cifar10_offline_missing_is_one_line(tmp_path):
    with pytest.raises(DatasetError, match='CIFAR-10 not found'):
        data.cifar10(tmp_path / 'cifar', download=False)


def test_failed_cifar10_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    """A download that fails (here: the HTTP(S) proxy is a closed local port) removes the folders it
    created, and leaves an existing folder as it was, without a partial archive."""
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')
    monkeypatch.setenv('http_proxy', 'http://127.0.0.1:9')
    root = tmp_path / 'new' / 'cifar10'
    with pytest.raises(DatasetError, match='downloading it failed'):
        data.cifar10(root, train=True, download=True)
    assert not (tmp_path / 'new').exists()
    kept = tmp_path / 'kept'
    kept.mkdir()
    (kept / 'notes.txt').write_text('mine')
    with pytest.raises(DatasetError, match='downloading it failed'):
        data.cifar10(kept, train=False, download=True)
    assert sorted(p.name for p in kept.iterdir()) == ['notes.txt']


def test_prepare_imagenet_renames_synsets_idempotently(tmp_path, capsys):
    root = tmp_path / 'imnet'
    _synset_tree(root)
    (root / 'README.txt').write_text('user file')
    before = sorted(p.name for p in root.rglob('*.JPEG'))
    assert main(['data', 'prepare-imagenet', str(root)]) == 0
    for split in ('train', 'val'):
        assert sorted(os.listdir(root / split)) == ['0', '1', '2']
    assert (root / 'synsets.txt').read_text().split() == ['n01440764', 'n01443537', 'n02102040']
    assert sorted(p.name for p in root.rglob('*.JPEG')) == before                # no image lost
    assert sorted(os.listdir(root / 'train' / '2')) == ['n02102040_0.JPEG', 'n02102040_1.JPEG']
    assert (root / 'README.txt').read_text() == 'user file'
    # second run: nothing to do, nothing changes
    snapshot = sorted(str(p.relative_to(root)) for p in root.rglob('*'))
    assert main(['data', 'prepare-imagenet', str(root)]) == 0
    assert sorted(str(p.relative_to(root)) for p in root.rglob('*')) == snapshot
    # the trainer's loader reads it (string-ordered integer folders, as the official ImageFolder)
    ds = data.imagenet_folder(root, 'val', image_size=16, val_resize=18)
    assert ds.classes == ['0', '1', '2'] and len(ds) == 6 and ds[0][0].shape == (3, 16, 16)


def test_prepare_imagenet_val_only_and_resume_after_partial(tmp_path):
    root = tmp_path / 'valonly'
    _synset_tree(root, splits=('val',))
    assert main(['data', 'prepare-imagenet', str(root)]) == 2                   # train/ missing
    assert main(['data', 'prepare-imagenet', str(root), '--val-only']) == 0
    assert sorted(os.listdir(root / 'val')) == ['0', '1', '2']
    # a new synset folder appearing later gets the label the mapping file gives it
    (root / 'synsets.txt').write_text('n01440764\nn01443537\nn02102040\nn09999999\n')
    _jpeg(root / 'val' / 'n09999999' / 'x.JPEG', seed=9)
    assert main(['data', 'prepare-imagenet', str(root), '--val-only']) == 0
    assert sorted(os.listdir(root / 'val')) == ['0', '1', '2', '3']


def test_prepare_imagenet_refuses_clashes_without_touching_anything(tmp_path, capsys):
    root = tmp_path / 'clash'
    _synset_tree(root)
    (root / 'val' / '0').mkdir()
    _jpeg(root / 'val' / '0' / 'mine.JPEG', seed=1)
    snapshot = sorted(str(p.relative_to(root)) for p in root.rglob('*'))
    assert main(['data', 'prepare-imagenet', str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'both' in err[0] and 'n01440764' in err[0]
    assert sorted(str(p.relative_to(root)) for p in root.rglob('*')) == snapshot


def test_unprepared_layout_names_the_fix(tmp_path):
    root = tmp_path / 'raw'
    _synset_tree(root)
    with pytest.raises(DatasetError, match='prepare-imagenet'):
        data.imagenet_folder(root, 'train')
    with pytest.raises(DatasetError, match='does not exist'):
        data.imagenet_folder(tmp_path / 'missing', 'train')


@needs_fashion
def test_traced_dataset_keeps_nni_payload_small():
    import nni

    cfg = {'dataset': 'fashion-mnist', 'data': None, 'train_subset': None, 'val_subset': 20000}
    ds = data.build_dataset(cfg, 'val', trace=True)          # val: no random augmentation
    assert len(data.build_dataset(cfg, 'train', trace=True)) == 60000
    assert len(ds) == 10000
    payload = nni.dump(ds)
    assert len(payload) < 2000 < 64 * 1024 < len(pickle.dumps(ds.images))
    again = nni.load(payload)
    assert len(again) == 10000 and torch.equal(again[5][0], ds[5][0])
