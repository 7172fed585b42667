"""Shared test fixtures: few threads, deterministic seeds, and real CIFAR-10 images."""
from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path

# On 2 shared cores, OpenMP threads that spin while waiting make torch ops up to ~50x slower when other
# processes compete for the CPU; passive waiting avoids that. libgomp reads this when torch is imported.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

CIFAR_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR_STD = (0.24703233, 0.24348505, 0.26158768)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state and torch's two threads, whatever ran before it (a search
    run in-process sets its own thread count; summation orders, hence float32 round-off, depend on it)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if torch.get_num_threads() != 2:
        torch.set_num_threads(2)


def _foolbox_data_dir() -> Path | None:
    # find_spec does not import foolbox (which needs eagerpy); we only want its bundled PNGs
    spec = importlib.util.find_spec('foolbox')
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / 'data'
        if d.is_dir():
            return d
    return None


@pytest.fixture(scope='session')
def foolbox_cifar():
    """The 20 CIFAR-10 test images bundled with foolbox: (images [20,3,32,32] normalised, labels [20])."""
    from PIL import Image

    d = _foolbox_data_dir()
    if d is None:
        pytest.skip('foolbox is not installed; its bundled CIFAR-10 images (foolbox/data/cifar10_*.png) are needed')
    files = sorted(d.glob('cifar10_*.png'))
    if len(files) != 20:
        pytest.skip(f'expected 20 foolbox/data/cifar10_*.png files, found {len(files)} in {d}')
    images, labels = [], []
    for f in files:
        m = re.fullmatch(r'cifar10_(\d+)_(\d+)\.png', f.name)
        assert m, f.name
        arr = np.asarray(Image.open(f).convert('RGB'), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        labels.append(int(m.group(2)))
    x = torch.stack(images)
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


@pytest.fixture
def nni_home(monkeypatch, tmp_path) -> Path:
    """HOME -> a tmp folder for NNI, including the manifest folder nnictl fixes at import time."""
    from nni.tools.nnictl import config_utils, constants

    home = tmp_path / 'home'
    monkeypatch.setenv('HOME', str(home))
    manifest = str(home / 'nni-experiments')
    monkeypatch.setattr(constants, 'NNI_HOME_DIR', manifest)
    monkeypatch.setattr(config_utils, 'NNI_HOME_DIR', manifest, raising=False)
    monkeypatch.setattr(config_utils.Experiments.__init__, '__defaults__', (manifest,))
    return home


@pytest.fixture
def needs_fashion() -> None:
    """Skip where the embedded Fashion-MNIST (Debian ``dataset-fashion-mnist``) is not installed."""
    from bnas_nni.data import fashion_mnist_root
    from bnas_nni.errors import DatasetError

    try:
        fashion_mnist_root()
    except DatasetError as exc:
        pytest.skip(str(exc))
