"""A weight binarizer written by a user in one file, loaded with ``imports:`` and chosen with
``--set binarizer=NAME``, runs in ``bnas-nni search`` (the fast cell, by its declared int8 contract) and
``bnas-nni train``."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import yaml

from bnas_nni.cli import main
from bnas_nni.paths import experiments_dir

PLUGIN = textwrap.dedent('''
    """Signs scaled by the median |w| of each filter (instead of the mean), straight-through gradient."""
    import torch

    from bnas_nni.quant import WeightBinarizer, register_binarizer

    CALLS = []


    class _MedianSign(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            scale = w.detach().abs().flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
            return torch.sign(w) * scale

        @staticmethod
        def backward(ctx, g):
            return g


    @register_binarizer('median_sign')
    class MedianSign(WeightBinarizer):
        scaled = True
        exact_ternary_signs = True        # one scale per filter times signs in {-1, 0, 1}

        def forward(self, w):
            CALLS.append(tuple(w.shape))
            return _MedianSign.apply(w)
''')

QUICK_SEARCH = str(experiments_dir() / 'search_quick_fashion.yaml')
QUICK_TRAIN = str(experiments_dir() / 'train_quick_fashion.yaml')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / 'plugins'
    folder.mkdir()
    (folder / 'my_binarizer_plugin.py').write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop('my_binarizer_plugin', None)
    from bnas_nni.quant import WEIGHT_BINARIZERS

    WEIGHT_BINARIZERS._items.pop('median_sign', None)


def test_plugin_binarizer_runs_in_search_and_train(plugin, tmp_path, capsys):
    search = tmp_path / 'search'
    assert main(['search', '--config', QUICK_SEARCH, '--epochs', '1', '--set', 'train_subset=64',
                 '--set', 'image_size=8', '--set', 'max_val_batches=1', '--set', 'imports=[my_binarizer_plugin]',
                 '--set', 'binarizer=median_sign', '--run-dir', str(search)]) == 0, capsys.readouterr().err
    import my_binarizer_plugin

    assert my_binarizer_plugin.CALLS, 'the search never binarized with the plugin'
    assert yaml.safe_load((search / 'config.yaml').read_text())['binarizer'] == 'median_sign'
    my_binarizer_plugin.CALLS.clear()

    train = tmp_path / 'train'
    assert main(['train', '--config', QUICK_TRAIN, '--epochs', '1', '--train-subset', '64', '--val-subset', '32',
                 '--max-train-batches', '1', '--init-channels', '4', '--layers', '3', '--threads', '1',
                 '--set', 'imports=[my_binarizer_plugin]', '--set', 'binarizer=median_sign',
                 '--run-dir', str(train)]) == 0, capsys.readouterr().err
    assert my_binarizer_plugin.CALLS, 'training never binarized with the plugin'
    ckpt = torch.load(train / 'checkpoint.pt', weights_only=True)
    assert ckpt['config']['binarizer'] == 'median_sign' and ckpt['config']['imports'] == ['my_binarizer_plugin']


def test_plugin_binarizer_forward_is_what_it_declares(plugin):
    import my_binarizer_plugin  # noqa: F401  (registers median_sign)

    from bnas_nni.quant import WEIGHT_BINARIZERS

    binarizer = WEIGHT_BINARIZERS.get('median_sign')()
    w = torch.randn(6, 4, 3, 3)
    out = binarizer(w)
    scale = w.abs().flatten(1).median(dim=1).values
    assert torch.equal(out, torch.sign(w) * scale.view(-1, 1, 1, 1))
    signs = out / scale.view(-1, 1, 1, 1)
    assert set(signs.unique().tolist()) <= {-1.0, 0.0, 1.0}
