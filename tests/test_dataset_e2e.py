"""``dataset: folder`` through the commands (issue 24): bad data is one line, exit 2 and no run directory;
a search and a training on a 5-class folder of 28x28 Fashion-MNIST PNGs run end to end."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

from image_folders import CLASSES, fashion_images, render  # noqa: E402

from bnas_nni.cli import main  # noqa: E402
from bnas_nni.data import CACHE_FILE  # noqa: E402

pytestmark = pytest.mark.usefixtures('needs_fashion')


@pytest.fixture(scope='session')
def good_folder(tmp_path_factory):
    """5 classes x 20 grey 28x28 PNGs in class folders, split by val_fraction."""
    root = tmp_path_factory.mktemp('e2e-folder')
    render(root, fashion_images(), rgb=False, layout='single')
    return root


def _small_tree(root: Path, *, layout: str = 'single', classes: int = 3, per_class: int = 4) -> Path:
    images = {k: v[:per_class] for k, v in fashion_images(classes, per_class).items()}
    render(root, images, rgb=False, layout=layout)
    return root


def _truncated_jpeg(root: Path) -> Path:
    from PIL import Image

    _small_tree(root)
    bad = root / 'class_1' / 'broken.jpg'
    Image.open(root / 'class_1' / 'img_000.png').save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:-40])              # a cut-off download: the header reads, the data ends early
    return bad


def _not_an_image(root: Path) -> Path:
    _small_tree(root)
    bad = root / 'class_2' / 'notes.png'
    bad.write_text('not a picture')
    return bad


def _empty_class(root: Path) -> Path:
    _small_tree(root)
    (root / 'class_3').mkdir()
    return root / 'class_3'


def _different_classes(root: Path) -> Path:
    _small_tree(root, layout='train/val')
    shutil.move(root / 'val' / 'class_2', root / 'val' / 'class_9')
    return root / 'train'


def _one_class(root: Path) -> Path:
    _small_tree(root, classes=1)
    return root


BAD = {'truncated image': (_truncated_jpeg, 'unreadable image', 'replace or remove the file'),
       'not an image': (_not_an_image, 'unreadable image', 'replace or remove the file'),
       'empty class folder': (_empty_class, 'holds no images', 'add images or remove the folder'),
       'train and val differ': (_different_classes, 'only in train/: class_2; only in val/: class_9',
                                'give both the same class folders'),
       'one class': (_one_class, 'has one class folder (class_0)', 'add a folder per class')}


@pytest.mark.parametrize('command', ['search', 'train'])
@pytest.mark.parametrize('case', list(BAD))
def test_bad_folder_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, case, command):
    make, problem, fix = BAD[case]
    root = tmp_path / 'images'
    named = make(root)
    runs = tmp_path / 'runs'
    argv = [command, '--set', 'dataset=folder', '--set', f'data={root}', '--run-dir', str(runs / 'run'),
            '--epochs', '1']
    if command == 'search':
        argv += ['--set', 'space=bnas-tiny']
    else:
        argv += ['--config', str(Path(__file__).parent.parent / 'experiments' / 'train_quick_fashion.yaml')]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'Traceback' not in err[0], err
    assert str(named) in err[0] and problem in err[0] and fix in err[0], err[0]
    assert not runs.exists()                                           # no run directory, not even runs/
    assert not list(root.rglob(CACHE_FILE))                            # nothing written beside the images


def test_search_then_train_on_a_folder_of_five_classes(good_folder, tmp_path, capsys):
    """The search's supernet and the trained network both get the folder's 5 classes at 28x28; each run
    directory records the dataset; the genotype the search saved trains."""
    out, search_dir, train_dir = tmp_path / 'genotypes', tmp_path / 'search', tmp_path / 'train'
    rc = main(['search', '--set', 'space=bnas-tiny', '--set', 'dataset=folder', '--set', f'data={good_folder}',
               '--epochs', '1', '--set', 'batch_size=16', '--set', 'progress=never', '--set', 'tensorboard=false',
               '--run-dir', str(search_dir), '--save', 'folder5', '--out', str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert 'dataset folder: 5 classes, 1 channel(s) (fed as 3), 28x28' in printed.out + printed.err
    recorded = yaml.safe_load((search_dir / 'dataset.yaml').read_text())
    assert recorded['num_classes'] == CLASSES and recorded['channels'] == 1 and recorded['image_size'] == 28
    assert recorded['train_images'] == 90 and recorded['val_images'] == 10 and recorded['layout'] == 'val_fraction'
    state = torch.load(search_dir / 'checkpoint.pt', map_location='cpu', weights_only=False)
    weights = next(v for k, v in _tensors(state) if k.endswith('classifier.weight'))
    assert weights.shape[0] == CLASSES
    # 45 weight / 45 architecture images at batch 16: 3 iterations
    assert '45 weight / 45 architecture images' in printed.out + printed.err

    rc = main(['train', '--config', str(Path(__file__).parent.parent / 'experiments' / 'train_quick_fashion.yaml'),
               '--arch', str(out / 'folder5.yaml'), '--set', 'dataset=folder', '--set', f'data={good_folder}',
               '--epochs', '1', '--set', 'init_channels=4', '--set', 'layers=2', '--set', 'batch_size=32',
               '--set', 'progress=never', '--set', 'tensorboard=false', '--run-dir', str(train_dir)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert yaml.safe_load((train_dir / 'dataset.yaml').read_text())['num_classes'] == CLASSES
    log = (train_dir / 'log.txt').read_text()
    assert 'classes=5' in log and 'dataset folder: 5 classes' in log
    rows = (train_dir / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 2
    ckpt = torch.load(train_dir / 'checkpoint.pt', map_location='cpu', weights_only=False)
    assert next(v for k, v in _tensors(ckpt) if k.endswith('classifier.weight')).shape[0] == CLASSES


def _tensors(obj, prefix=''):
    """Every (dotted key, tensor) in a nested checkpoint."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f'{prefix}.{k}' if prefix else str(k))
